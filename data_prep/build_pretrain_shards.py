"""Pre-training shards: img2dataset webdataset tars (BLIP3-Kale, BLIP3-OCR-200m) → MDS.

    python data_prep/build_pretrain_shards.py RAW/kale/ --source kale --out data/pt/kale \
        --tokenizer PATH --model-size aki-4b [--workers N] [--job-index I --num-jobs K] [--holdout 0.001]

See data_prep/pretrain.py for the output layout.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep.pretrain import main  # noqa: E402

if __name__ == "__main__":
    from pipeline.process import run_command

    run_command(main)
