"""Data prep throughput: ≤720p JPEG → 384² → JPEG → tokenize → MDS, per core, vs a plain webdataset writer.

Synthetic img2dataset tars (:mod:`bench.synthetic`) go through the real converter,
:func:`data_prep.pretrain.build_pretrain` (PT template, tiny BPE tokenizer built with
:func:`pipeline.model.tokenizer.build_tiny_tokenizer`, ``--size``'s image size and N), once per
``--workers`` value. With one worker it runs in this process; with more it starts a spawn pool; its start-up
(timed separately: a pool that only imports the converter) is reported and taken out of the per-core and
scaling figures, which a long job amortises. The baseline is the straightforward pipeline:
``webdataset.WebDataset(...).decode("pil")`` → resize → JPEG → tokenizer → ``webdataset.TarWriter``, in
this process. A per-image breakdown of the image step is reported as well.

    python -m bench.prep --samples 512 --workers 1 2
"""
from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import tempfile
import time
from typing import Sequence

import numpy as np

from bench.common import Figure, Result, add_common_args, command_line, report, usable_cores
from bench.synthetic import raw_samples, write_img2dataset_tars

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_real(inputs: str, out: str, tokenizer_path: str, size: str, workers: int) -> tuple[float, float, int]:
    """Wall seconds, this process's CPU seconds and samples written by ``build_pretrain`` with ``workers``
    processes (the CPU seconds count the work only with one worker, which runs in this process)."""
    from data_prep.pretrain import build_pretrain
    from data_prep.writer import EncodeSettings

    settings = EncodeSettings(tokenizer_path=tokenizer_path, model_size=size, max_text_tokens=128)
    start, cpu_start = time.perf_counter(), time.process_time()
    manifest = build_pretrain([inputs], out, "kale", settings, workers=workers, tars_per_part=1)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    if manifest is None or manifest.samples == 0:
        raise RuntimeError(f"build_pretrain wrote nothing into {out}; see its manifest")
    return seconds, cpu_seconds, manifest.samples


def _import_converter(_: int) -> int:
    import data_prep.pretrain  # noqa: F401  (what a spawned worker imports before its first sample)

    return os.getpid()


def spawn_startup_seconds(workers: int) -> float:
    """Wall seconds for a spawn pool of ``workers`` processes to start and import the converter."""
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(_import_converter, range(workers))
    return time.perf_counter() - start


def run_webdataset(tars: list[str], out: str, tokenizer_path: str, image_size: int) -> tuple[float, int]:
    """The baseline: decode with webdataset's PIL decoder, resize, re-encode, tokenize, write a tar."""
    import webdataset as wds
    from PIL import Image

    from pipeline.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    count = 0
    start = time.perf_counter()
    with wds.TarWriter(out) as sink:
        for sample in wds.WebDataset(tars, shardshuffle=False).decode("pil"):
            img = sample["jpg"].convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=95)
            ids = np.asarray(tokenizer(sample["txt"])["input_ids"], np.int32)
            sink.write({"__key__": sample["__key__"], "jpg": buf.getvalue(), "input_ids.npy": ids,
                        "txt": sample["txt"]})
            count += 1
    return time.perf_counter() - start, count


def image_step_ms(jpegs: list[bytes], image_size: int) -> dict[str, float]:
    """Milliseconds per image of the image step, and of its parts (decode, resize, encode)."""
    from PIL import Image

    from data_prep.images import to_encoder_jpeg

    def per_image(fn) -> float:
        start = time.perf_counter()
        for item in items:
            fn(item)
        return 1e3 * (time.perf_counter() - start) / len(items)

    items = jpegs
    out = {"to_encoder_jpeg": per_image(lambda j: to_encoder_jpeg(j, image_size))}
    out["decode"] = per_image(lambda j: Image.open(io.BytesIO(j)).convert("RGB"))
    items = [Image.open(io.BytesIO(j)).convert("RGB") for j in jpegs]
    out["resize (bicubic)"] = per_image(lambda im: im.resize((image_size, image_size), Image.Resampling.BICUBIC))
    items = [im.resize((image_size, image_size)) for im in items]
    out["encode (JPEG q95)"] = per_image(lambda im: im.save(io.BytesIO(), format="JPEG", quality=95))
    return out


def main(argv: Sequence[str] | None = None) -> Result:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=512, help="synthetic raw samples")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    parser.add_argument("--size", default="aki-4b", help="model size: image size and N visual tokens")
    parser.add_argument("--work-dir", default=None, help="scratch folder (default: a temporary one)")
    add_common_args(parser)
    args = parser.parse_args(argv)

    from pipeline.model.sizes import get_model_size
    from pipeline.model.tokenizer import build_tiny_tokenizer

    image_size = get_model_size(args.size).image_size
    full = image_size == get_model_size("aki-4b").image_size
    why = "" if full else f"{image_size}² output, the goal is for 384²"
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        raw = raw_samples(args.samples)
        per_tar = max(1, args.samples // (4 * max(args.workers)))
        tars = write_img2dataset_tars(os.path.join(work, "raw"), raw, per_tar)
        tokenizer_path = build_tiny_tokenizer([text for _, text in raw], os.path.join(work, "tokenizer"))
        # Warm the in-process converter (tokenizer load) so the 1-worker figure is the steady state.
        run_real(tars[0], os.path.join(work, "warm"), tokenizer_path, args.size, 1)
        figures: list[Figure] = []
        rates: dict[int, float] = {}
        for w in args.workers:
            seconds, cpu_seconds, n = run_real(os.path.join(work, "raw"), os.path.join(work, f"mds-{w}"),
                                               tokenizer_path, args.size, w)
            startup = spawn_startup_seconds(w) if w > 1 else 0.0
            rates[w] = n / (seconds - startup if seconds > 2 * startup else seconds)   # noisy start-up: keep it
            figures.append(Figure(f"real pipeline, {w} worker(s): samples/s, end to end", n / seconds, "samples/s",
                                  note="in-process" if w == 1 else "spawn pool, start-up included"))
            if w > 1:
                figures.append(Figure(f"spawn pool of {w}: start-up and imports", startup, "s"))
            figures.append(Figure(f"real pipeline, {w} worker(s): samples/s per core, start-up excluded",
                                  rates[w] / w, "samples/s/core", goal="prep.samples_per_core" if w == 1 else None,
                                  comparable=full, note=why))
            if w == 1:   # CPU time is what other processes on a shared machine disturb least
                figures.append(Figure("real pipeline, 1 worker: samples per CPU-second of the process", n / cpu_seconds,
                                      "samples/s/core", note="process CPU time, not wall time"))
        base_s, base_n = run_webdataset(tars, os.path.join(work, "baseline.tar"), tokenizer_path, image_size)
        base = base_n / base_s
        figures.append(Figure("webdataset baseline, 1 process: samples/s per core", base, "samples/s/core"))
        if 1 in rates:
            figures.append(Figure("real pipeline (1 worker) over the webdataset baseline", rates[1] / base, "×"))
            most = max(args.workers)
            if most > 1:
                figures.append(Figure(f"parallel efficiency, {most} workers vs 1, start-up excluded",
                                      rates[most] / (most * rates[1]),
                                      "(1 = linear)", goal="prep.parallel_efficiency",
                                      comparable=full and most <= usable_cores(),
                                      note=why or ("" if most <= usable_cores() else "more workers than cores")))
        for part, ms in image_step_ms([j for j, _ in raw[:32]], image_size).items():
            figures.append(Figure(f"image step per ≤720p image: {part}", ms, "ms"))
    result = Result(
        "prep", command_line("bench.prep", argv),
        {"samples": args.samples, "workers": args.workers, "size": args.size, "image_size": image_size,
         "tars": len(tars), "samples_per_tar": per_tar},
        figures,
        notes=[f"{args.samples} synthetic samples (JPEG ≤ 1280×720, q90), tiny BPE tokenizer, {usable_cores()} "
               "usable cores shared with other work (timings are noisy)"])
    report(result, args.out, write=not args.no_write)
    return result


if __name__ == "__main__":
    main()
