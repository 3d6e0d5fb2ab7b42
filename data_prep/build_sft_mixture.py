"""SFT mixture: each source's original files → one MDS dataset per source + mixture.yaml.

    python data_prep/build_sft_mixture.py --sources sources.yaml --out data/sft \
        --tokenizer PATH --model-size aki-4b [--ratio vsr=0.05] [--ratios-yaml FILE] [--whole-conversations] \
        [--holdout 1000 | --holdout 0.01]

See data_prep/sft/build.py for the sources file and pipeline/data/mixture.py for mixture.yaml.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep.sft.build import main  # noqa: E402

if __name__ == "__main__":
    from pipeline.process import run_command

    run_command(main)
