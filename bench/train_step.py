"""One AKI training step (forward, backward, grad clip, AdamW): samples/s, tokens/s, MFU, peak memory.

Builds ``AKIModel(--size)`` with random weights (no downloads) and times warm-up + ``--iters`` steps on a
fixed synthetic batch already on the device, for each run of :data:`RUNS`: PT and SFT, each padded
(``--pt-batch`` / ``--sft-batch`` samples) and packed (as many samples as fill ``--pack-rows`` rows of
``--pack-tokens``) by the real collator (:mod:`pipeline.data.collate`). Data loading is not part of the timed step
(``bench.loader`` measures it). Single process, plain PyTorch (no DeepSpeed): the step a one-GPU run
makes, without ZeRO's communication.

MFU = model FLOPs of the step (:mod:`pipeline.flops`, formula in its docstring) / (step seconds × peak),
peak = 989 TFLOP/s (H100/H200 dense bf16); "useful" MFU counts only real (non-PAD) tokens. On CPU the
achieved FLOP/s is reported and MFU only against ``--peak-flops``.

On GPU the weights are bf16 (``--precision bf16``: bf16 weights, gradients and AdamW states, fused AdamW)
or fp32 with bf16 autocast (``--precision amp``: the 16 bytes/parameter a mixed-precision run holds), the
LLM runs FlexAttention (``flex_attention``, block-sparse compiled kernel) and the host syncs of one step are
counted with torch's sync debug mode.

    python -m bench.train_step                                   # aki-4b on the GPU
    python -m bench.train_step --device cpu --size small --iters 3
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import torch

from bench.common import (H100_BF16_PEAK_FLOPS, Figure, Result, add_common_args, command_line, measure,
                          peak_memory_gib, report, reset_peak_memory)
from pipeline.flops import BatchShape, batch_shape, count_model, step_flops
from bench.layouts import fill_rows, make_sample, pt_sample, sft_sample
from pipeline.data.collate import MODEL_INPUTS, collate
from pipeline.model.aki import AKIModel


@dataclasses.dataclass(frozen=True)
class Run:
    """One timed configuration: which samples, how they are batched."""

    name: str
    stage: str          # "pt" or "sft"
    collate_mode: str   # "pad" or "pack"


RUNS: dict[str, Run] = {r.name: r for r in (
    Run("pt-padded", "pt", "pad"),
    Run("pt-packed", "pt", "pack"),
    Run("sft-padded", "sft", "pad"),
    Run("sft-packed", "sft", "pack"),
)}
SAMPLERS: dict[str, Callable[..., np.ndarray]] = {
    "pt": lambda rng, n, text_mean: pt_sample(rng, n),
    "sft": lambda rng, n, text_mean: sft_sample(rng, n, text_mean),
}


def build_batch(run: Run, args: argparse.Namespace, vocab: int, image_size: int, n_visual: int) -> dict[str, Any]:
    """A batch of the stage's seeded sample stream, collated on CPU: ``--pt-batch`` / ``--sft-batch``
    samples when padded, as many samples as fill ``--pack-rows`` rows of ``--pack-tokens`` when packed."""
    rng = np.random.default_rng({"pt": 1, "sft": 2}[run.stage])

    def draw() -> np.ndarray:
        return SAMPLERS[run.stage](rng, n_visual, args.text_mean)

    if run.collate_mode == "pack":
        layouts = fill_rows(draw, args.pack_rows, args.pack_tokens)
    else:
        layouts = [draw() for _ in range(args.pt_batch if run.stage == "pt" else args.sft_batch)]
    decoded = [make_sample(m, rng, vocab, image_size, n_visual) for m in layouts]
    multiple = args.pack_tokens if run.collate_mode == "pack" else 8   # packed: one static width
    return collate(decoded, run.collate_mode, pad_id=0, pack_tokens=args.pack_tokens,
                   pad_to_multiple_of=multiple)


def count_syncs(step: Callable[[], None]) -> int:
    """Host-device synchronisations torch reports during one call of ``step`` (GPU only)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def make_step(model: AKIModel, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
              inputs: dict[str, Any], autocast: bool) -> Callable[[], None]:
    """Forward (loss over TEXT_TARGET tokens, no full logits), backward, clip to 1.0, AdamW step."""
    def step() -> None:
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            loss = model(**inputs, return_logits=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def build_model(args: argparse.Namespace) -> tuple[AKIModel, list[torch.nn.Parameter], torch.optim.Optimizer]:
    on_gpu = args.device.startswith("cuda")
    torch.manual_seed(0)
    model = AKIModel(args.size, attention_mode=args.mode, attn_implementation=args.attn)
    if on_gpu and args.precision == "bf16":
        model.to(torch.bfloat16)
    model.to(args.device).train()
    if args.checkpointing == "full":
        model.gradient_checkpointing_enable()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-4, fused=True if on_gpu else None)
    return model, params, optimizer


def time_run(run: Run, model: AKIModel, params, optimizer, args: argparse.Namespace) -> dict[str, Any]:
    size = model.size
    batch = build_batch(run, args, model.llm.config.vocab_size, size.image_size,
                        size.num_visual_tokens)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    inputs = {k: (None if batch[k] is None else batch[k].to(args.device)) for k in MODEL_INPUTS}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    shape: BatchShape = batch_shape(batch["modality_ids"], batch["document_ids"], args.mode,
                                    size.num_visual_tokens, len(batch["pixel_values"]))
    step = make_step(model, optimizer, params, inputs, autocast=args.precision == "amp"
                     and args.device.startswith("cuda"))
    reset_peak_memory(args.device)
    seconds = measure(step, args.device, args.warmup, args.iters)
    out = {"seconds": seconds, "samples": len(batch["sources"]), "rows": batch["input_ids"].shape[0],
           "width": batch["input_ids"].shape[1], "shape": shape, "peak_gib": peak_memory_gib(args.device)}
    if args.device.startswith("cuda"):
        out["host_syncs"] = count_syncs(step)
    return out


def gemm_flops(device: str, dtype: torch.dtype, n: int = 1024, seconds: float = 1.0) -> float:
    """FLOP/s of square ``n``×``n`` matmuls on ``device`` now: a yardstick of what the machine delivers."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    iters = 1
    while True:
        t = measure(lambda: a @ b, device, warmup=1, iters=iters)
        if t * iters >= seconds or iters >= 1 << 14:
            return 2 * n ** 3 / t
        iters *= 4


def main(argv: Sequence[str] | None = None) -> Result:
    on_gpu_default = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if on_gpu_default else "cpu")
    parser.add_argument("--size", default=None, help="model size (default: aki-4b on GPU, small on CPU)")
    parser.add_argument("--mode", default="mma", help="attention mode")
    parser.add_argument("--attn", default=None, help="attn_implementation (default: flex_attention on GPU, "
                                                     "sdpa on CPU)")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--pt-batch", type=int, default=None, help="PT samples per step (GPU 32, CPU 8)")
    parser.add_argument("--sft-batch", type=int, default=None, help="SFT samples per step (GPU 16, CPU 8)")
    parser.add_argument("--pack-tokens", type=int, default=2048, help="tokens per packed row")
    parser.add_argument("--pack-rows", type=int, default=None, help="packed rows per step (GPU 4, CPU 1)")
    parser.add_argument("--text-mean", type=float, default=150.0, help="mean SFT text tokens per sample")
    parser.add_argument("--precision", choices=("bf16", "amp"), default="bf16", help="GPU weights (see above)")
    parser.add_argument("--checkpointing", choices=("none", "full"), default="none",
                        help="activation checkpointing of the LLM layers")
    parser.add_argument("--peak-flops", type=float, default=None,
                        help="peak FLOP/s for MFU (default 989e12 on GPU; none on CPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    add_common_args(parser)
    args = parser.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    args.size = args.size or ("aki-4b" if on_gpu else "small")
    args.attn = args.attn or ("flex_attention" if on_gpu else "sdpa")
    args.pt_batch = args.pt_batch or (32 if on_gpu else 8)
    args.sft_batch = args.sft_batch or (16 if on_gpu else 8)
    args.pack_rows = args.pack_rows or (4 if on_gpu else 1)
    peak = args.peak_flops or (H100_BF16_PEAK_FLOPS if on_gpu else None)

    model, params, optimizer = build_model(args)
    counts = count_model(model)
    full = on_gpu and args.size == "aki-4b"
    goals = {"pt-packed": "train_step.pt_mfu", "sft-packed": "train_step.sft_useful_mfu"}
    figures: list[Figure] = []
    settings: dict[str, Any] = {k: v for k, v in vars(args).items() if k not in ("out", "no_write")}
    settings["params"] = dataclasses.asdict(counts)
    for name in args.runs:
        run = RUNS[name]
        r = time_run(run, model, params, optimizer, args)
        s, shape = r["seconds"], r["shape"]
        useful, total = step_flops(counts, shape, useful=True), step_flops(counts, shape, useful=False)
        settings[name] = {"samples": r["samples"], "rows": r["rows"], "width": r["width"],
                          "step_s": s, **dataclasses.asdict(shape), "useful_flops": useful}
        figures += [
            Figure(f"{name}: samples/s", r["samples"] / s, "samples/s"),
            Figure(f"{name}: tokens/s (padding included)", shape.grid_tokens / s, "tokens/s"),
            Figure(f"{name}: useful tokens/s (non-PAD)", shape.tokens / s, "tokens/s"),
            Figure(f"{name}: achieved model FLOP/s (useful)", useful / s / 1e12, "TFLOP/s"),
            Figure(f"{name}: peak memory{'' if on_gpu else ' (process RSS)'}", r["peak_gib"], "GiB",
                   goal="train_step.sft_peak_memory" if name == "sft-packed" else None, comparable=full),
        ]
        if peak:
            figures += [Figure(f"{name}: MFU, useful tokens", 100 * useful / s / peak, "% of peak",
                               goal=goals.get(name), comparable=full and peak == H100_BF16_PEAK_FLOPS),
                        Figure(f"{name}: MFU, padding counted", 100 * total / s / peak, "% of peak")]
        if "host_syncs" in r:
            figures.append(Figure(f"{name}: host syncs in one step", r["host_syncs"], "syncs"))
    notes = [f"size {args.size}, mode {args.mode}, attn {args.attn}, precision "
             f"{args.precision if on_gpu else 'fp32'}, checkpointing {args.checkpointing}; single process, plain "
             "PyTorch AdamW (no DeepSpeed); synthetic batch already on the device, data loading not timed",
             "MFU formula: pipeline/flops.py (6·N·tokens for trainable weights, LM head only where a target is "
             "predicted, visible attention pairs, frozen vision forward)"]
    if not on_gpu:
        yardstick = gemm_flops(args.device, torch.float32)
        best = max(f.value for f in figures if f.name.endswith("achieved model FLOP/s (useful)")) * 1e12
        figures += [Figure("fp32 1024² matmul FLOP/s of this CPU (yardstick)", yardstick / 1e12, "TFLOP/s"),
                    Figure("best run's model FLOP/s over the matmul yardstick", best / yardstick, "fraction")]
    if not peak:
        notes.append("MFU n/a on CPU (pass --peak-flops to get one); the GPU goals are to be taken on H100/H200")
    result = Result("train_step", command_line("bench.train_step", argv), settings, figures, args.device, notes)
    report(result, args.out, write=not args.no_write)
    return result


if __name__ == "__main__":
    main()
