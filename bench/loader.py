"""Loader throughput: MDS → decode the 384² JPEG → tensors → packed batch, per core, vs plain webdataset.

The same synthetic PT samples (captions + photo-like JPEGs already at the encoder's size, written by the
real converter :class:`data_prep.writer.Converter`) are stored twice: as an MDS dataset
(:class:`data_prep.writer.DatasetWriter`) and as webdataset tars (``.jpg`` + ``.input_ids.npy`` +
``.modality_ids.npy``). Timed, one epoch each, for every ``--workers`` value:

* ``real``: :class:`pipeline.data.dataset.AKIStreamingDataset` + :class:`~pipeline.data.dataset.AKIDataLoader`
  with the model's image processor and the packing :class:`~pipeline.data.collate.Collator`;
* ``webdataset``: ``WebDataset(tars).decode("pil")`` → transformers' ``SiglipImageProcessor`` → a torch
  ``DataLoader`` with the same collator: the straightforward loader a webdataset pipeline would use.

Both give the same pixels (checked on the first batch: ``max |pixel difference|``); the real loader's
:class:`~pipeline.model.images.ImageProcessor` skips the resize of images already at the input size.

samples/s per core = samples/s ÷ max(1, workers) (with workers, the main process only receives batches).

    python -m bench.loader --samples 1024 --workers 0 2
"""
from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch

from bench.common import Figure, Result, add_common_args, command_line, report, usable_cores
from bench.synthetic import caption, raw_image

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
UNIQUE_IMAGES = 64   # distinct pictures, cycled over the samples (decoding cost does not depend on repeats)


def write_datasets(work: str, samples: int, size_name: str, per_tar: int) -> tuple[str, list[str], int]:
    """The same samples as an MDS dataset and as webdataset tars; returns (mds folder, tars, pad id)."""
    import webdataset as wds

    from data_prep.records import Sample
    from data_prep.writer import Converter, DatasetWriter, EncodeSettings
    from pipeline.chat import Caption
    from pipeline.model.sizes import get_model_size
    from pipeline.model.tokenizer import build_tiny_tokenizer

    rng = np.random.default_rng(0)
    side = get_model_size(size_name).image_size
    pictures = [raw_image(rng, side, side) for _ in range(min(samples, UNIQUE_IMAGES))]
    texts = [caption(rng) for _ in range(samples)]
    tokenizer_path = build_tiny_tokenizer(texts, os.path.join(work, "tokenizer"))
    converter = Converter(EncodeSettings(tokenizer_path, size_name, max_text_tokens=128))
    mds = os.path.join(work, "mds")
    os.makedirs(os.path.join(work, "wds"))
    pattern = os.path.join(work, "wds", "%05d.tar")
    with DatasetWriter(mds, converter.new_manifest("bench", "synthetic")) as writer, \
            wds.ShardWriter(pattern, maxcount=per_tar, verbose=0) as sink:
        for i, text in enumerate(texts):
            row = converter.convert(Sample(f"{i:09d}", [pictures[i % len(pictures)]], Caption(text)),
                                    "bench")
            sink.write({"__key__": row["id"], "jpg": row["images"], "input_ids.npy": row["input_ids"],
                        "modality_ids.npy": row["modality_ids"]})
            writer.add(row)
    tars = sorted(os.path.join(work, "wds", f) for f in os.listdir(os.path.join(work, "wds")))
    pad_id = converter.tokenizer.pad_token_id
    return mds, tars, pad_id


class SiglipProcessor:
    """The baseline's image processing: transformers' ``SiglipImageProcessor`` on PIL images (picklable)."""

    def __init__(self, image_size: int):
        from pipeline.compat import SiglipImageProcessor

        self.processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})

    def __call__(self, images: Sequence[Any]) -> torch.Tensor:
        return self.processor([img.convert("RGB") for img in images], return_tensors="pt")["pixel_values"]


def epoch(loader: Any) -> tuple[float, int, int]:
    """Seconds, samples and real tokens of one pass over ``loader``."""
    samples = tokens = 0
    start = time.perf_counter()
    for batch in loader:
        samples += batch["num_samples"] if "num_samples" in batch else len(batch["sources"])
        tokens += int((batch["modality_ids"] != 0).sum())
    return time.perf_counter() - start, samples, tokens


def real_loader(mds: str, processor: Callable, size_name: str, collator: Any, batch: int, workers: int):
    from streaming import Stream

    from pipeline.data.dataset import AKIDataLoader, AKIStreamingDataset
    from pipeline.data.registration import one_registration_at_a_time
    from pipeline.model.sizes import get_model_size

    size = get_model_size(size_name)
    with one_registration_at_a_time():
        dataset = AKIStreamingDataset(image_processor=processor, image_size=size.image_size,
                                      num_visual_tokens=size.num_visual_tokens, streams=[Stream(local=mds)],
                                      batch_size=batch, shuffle=False)
    return AKIDataLoader(dataset, batch_size=batch, collate_fn=collator, num_workers=workers)


class _WebdatasetSample:
    """Map a decoded webdataset sample to what the collator takes (picklable for worker processes)."""

    def __init__(self, processor: Callable):
        self.processor = processor

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        return {"input_ids": sample["input_ids.npy"].astype(np.int64),
                "modality_ids": sample["modality_ids.npy"].astype(np.int64),
                "pixel_values": self.processor([sample["jpg"]]), "source": "bench"}


def webdataset_loader(tars: list[str], processor: Callable, collator: Any, batch: int, workers: int):
    import webdataset as wds

    dataset = wds.WebDataset(tars, shardshuffle=False, empty_check=False).decode("pil").map(
        _WebdatasetSample(processor))
    return torch.utils.data.DataLoader(dataset, batch_size=batch, collate_fn=collator, num_workers=workers)


def main(argv: Sequence[str] | None = None) -> Result:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts")
    parser.add_argument("--size", default="aki-4b", help="model size: image size and N visual tokens")
    parser.add_argument("--batch", type=int, default=16, help="samples per micro batch")
    parser.add_argument("--pack-tokens", type=int, default=2048)
    parser.add_argument("--work-dir", default=None, help="scratch folder (default: a temporary one)")
    add_common_args(parser)
    args = parser.parse_args(argv)

    from streaming.base.util import clean_stale_shared_memory

    from pipeline.data.collate import Collator
    from pipeline.model.images import ImageProcessor
    from pipeline.model.sizes import get_model_size

    torch.set_num_threads(1)
    side = get_model_size(args.size).image_size
    full = side == get_model_size("aki-4b").image_size
    why = "" if full else f"{side}² images, the goal is for 384²"
    figures: list[Figure] = []
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        mds, tars, pad_id = write_datasets(work, args.samples, args.size,
                                           per_tar=max(1, args.samples // (2 * max(max(args.workers), 1))))
        collator = Collator("pack", pad_id, max_length=args.pack_tokens, pack_tokens=args.pack_tokens,
                            image_size=side)
        check = next(iter(real_loader(mds, ImageProcessor(side), args.size, collator, args.batch, 0)))
        gc.collect()
        clean_stale_shared_memory()
        baseline = next(iter(webdataset_loader(tars, SiglipProcessor(side), collator, args.batch, 0)))
        pixel_gap = float((check["pixel_values"] - baseline["pixel_values"]).abs().max())
        runs: list[tuple[str, int]] = [(name, w) for w in args.workers for name in ("real", "webdataset")]
        for name, w in runs:
            if name == "webdataset":
                loader = webdataset_loader(tars, SiglipProcessor(side), collator, args.batch, w)
            else:
                loader = real_loader(mds, ImageProcessor(side), args.size, collator, args.batch, w)
            seconds, n, tokens = epoch(loader)
            del loader
            gc.collect()
            clean_stale_shared_memory()
            if n != args.samples:
                raise RuntimeError(f"{name} loader with {w} workers gave {n} samples, expected {args.samples}")
            per_core = n / seconds / max(1, w)
            rates[f"{name}/{w}"] = per_core
            figures.append(Figure(f"{name}, {w} workers: samples/s per core", per_core, "samples/s/core",
                                  goal="loader.samples_per_core" if name == "real" else None,
                                  comparable=full and max(1, w) <= usable_cores(), note=why))
            figures.append(Figure(f"{name}, {w} workers: packed tokens/s", tokens / seconds, "tokens/s"))
        for w in args.workers:
            figures.append(Figure(f"real over webdataset, {w} workers", rates[f"real/{w}"] / rates[f"webdataset/{w}"],
                                  "×", goal="loader.speedup_vs_webdataset", comparable=full, note=why))
        figures.append(Figure("max |pixel difference| real loader vs webdataset baseline", pixel_gap, "abs"))
    result = Result(
        "loader", command_line("bench.loader", argv),
        {"samples": args.samples, "workers": args.workers, "size": args.size, "image_size": side,
         "batch": args.batch, "pack_tokens": args.pack_tokens, "tars": len(tars)},
        figures,
        notes=[f"{args.samples} synthetic PT samples, {side}² JPEG q95 each, packed into rows of {args.pack_tokens}; "
               f"{usable_cores()} usable cores shared with other work (timings are noisy)"])
    report(result, args.out, write=not args.no_write)
    return result


if __name__ == "__main__":
    main()
