"""Attention kernels for every mode: FlexAttention with a ``BlockMask`` vs SDPA with a dense mask.

One LLM attention layer's core (softmax(QKᵀ/√d)·V, heads and head size of ``--size``) on SFT-like packed
rows (``--seq-len`` tokens each, documents of N image slots + ≈150 text tokens), for each attention mode:

* ``flex``: ``torch.compile(flex_attention)`` with :func:`pipeline.model.attention.block_mask` (built with
  the compiled mask kernel on GPU): fully masked 128×128 blocks are skipped and no score matrix is stored;
* ``sdpa``: ``scaled_dot_product_attention`` with :func:`pipeline.model.attention.sdpa_mask` ([B,1,L,L]).

On GPU the timed call is forward + backward in bf16 and the peak memory of each path is reported in units
of one batch×heads×L² bf16 tensor. On CPU, FlexAttention has no backward, so the CPU figures are forward
only (float32) — a correctness and relative-speed check, not the GPU goal.

    python -m bench.attention                         # GPU if present, else CPU
    python -m bench.attention --device cpu --size tiny --seq-len 256 --iters 2
"""
from __future__ import annotations

import argparse
import math
import warnings
from typing import Sequence

import numpy as np
import torch

from bench.common import (GIB, Figure, Result, add_common_args, command_line, measure, peak_memory_gib, report,
                          reset_peak_memory, result_name, synchronize)
from bench.layouts import packed_layout
from pipeline.model.attention import MODES, block_mask, sdpa_mask
from pipeline.model.sizes import get_model_size


def _inputs(batch: int, heads: int, length: int, head_dim: int, device: str, dtype: torch.dtype,
            grad: bool) -> list[torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype, generator=gen,
                        requires_grad=grad) for _ in range(3)]


def _step(attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backward: bool):
    """One timed call: forward, and backward into q/k/v when ``backward``."""
    def run() -> None:
        out = attend(q, k, v)
        if backward:
            out.backward(torch.ones_like(out))
    return run


def bench_mode(mode: str, mods: torch.Tensor, docs: torch.Tensor, n_visual: int, heads: int, head_dim: int,
               device: str, warmup: int, iters: int, compile: bool = True) -> dict[str, float]:
    """Time both kernels for one mode; returns milliseconds, speed-up, memory and the max output gap."""
    from torch.nn.attention.flex_attention import flex_attention

    on_gpu = device.startswith("cuda")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    batch, length = mods.shape
    compiled = torch.compile(flex_attention, dynamic=False) if compile else flex_attention

    bm = block_mask(mods, mode, docs, num_visual_tokens=n_visual, compile=on_gpu)
    build_ms = 1e3 * measure(lambda: block_mask(mods, mode, docs, num_visual_tokens=n_visual, compile=on_gpu),
                             device, warmup=1, iters=max(1, iters // 2))
    dense = sdpa_mask(mods, mode, docs, num_visual_tokens=n_visual)
    scale = 1.0 / math.sqrt(head_dim)

    def flex(q, k, v):
        with warnings.catch_warnings():   # --no-compile asks for the unfused kernel: no warning per call
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return compiled(q, k, v, block_mask=bm, scale=scale)

    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=scale)

    out: dict[str, float] = {"mask_build_ms": build_ms, "block_sparsity": float(bm.sparsity()) / 100.0}
    score_tensor_gib = batch * heads * length * length * 2 / GIB
    results = {}
    for name, attend in (("flex", flex), ("sdpa", sdpa)):
        q, k, v = _inputs(batch, heads, length, head_dim, device, dtype, grad=on_gpu)
        synchronize(device)
        before = peak_memory_gib(device)
        reset_peak_memory(device)
        base = torch.cuda.memory_allocated(device) / GIB if on_gpu else before
        out[f"{name}_ms"] = 1e3 * measure(_step(attend, q, k, v, backward=on_gpu), device, warmup, iters)
        if on_gpu:
            out[f"{name}_peak_in_score_tensors"] = (peak_memory_gib(device) - base) / score_tensor_gib
        with torch.no_grad():
            results[name] = attend(q, k, v).float()
    real = (mods != 0)[:, None, :, None]          # compare non-PAD query rows only
    out["max_abs_diff"] = float(((results["flex"] - results["sdpa"]).abs() * real).max())
    out["speedup"] = out["sdpa_ms"] / out["flex_ms"]
    return out


def main(argv: Sequence[str] | None = None) -> Result:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", default="aki-4b", help="model size whose LLM heads/head size and N are used")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per packed row")
    parser.add_argument("--batch", type=int, default=None, help="packed rows (default: 4 on GPU, 1 on CPU)")
    parser.add_argument("--text-mean", type=float, default=150.0, help="mean text tokens per SFT sample")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--no-compile", action="store_true",
                        help="run flex_attention uncompiled (it then materialises the scores: checks only)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    add_common_args(parser)
    args = parser.parse_args(argv)

    size = get_model_size(args.size)
    heads = size.llm["num_attention_heads"]
    head_dim = size.llm["hidden_size"] // heads
    on_gpu = args.device.startswith("cuda")
    batch = args.batch or (4 if on_gpu else 1)
    mods, docs = packed_layout(np.random.default_rng(0), batch, args.seq_len, size.num_visual_tokens,
                               args.text_mean)
    mods_np, docs_np = mods.numpy(), docs.numpy()
    mods, docs = mods.to(args.device), docs.to(args.device)
    what = "fwd+bwd, bf16" if on_gpu else "forward only, fp32: no FlexAttention backward on CPU"
    if args.no_compile:
        what += ", flex uncompiled"
    full_size = args.size == "aki-4b" and on_gpu and not args.no_compile
    figures: list[Figure] = []
    per_mode = {}
    for mode in args.modes:
        r = bench_mode(mode, mods, docs, size.num_visual_tokens, heads, head_dim, args.device, args.warmup, args.iters,
                       compile=not args.no_compile)
        per_mode[mode] = r
        is_mma = mode == "mma"
        figures += [
            Figure(f"{mode}: FlexAttention ms", r["flex_ms"], "ms"),
            Figure(f"{mode}: SDPA dense-mask ms", r["sdpa_ms"], "ms"),
            Figure(f"{mode}: speed-up Flex over SDPA", r["speedup"], "×",
                   goal="attention.mma_speedup" if is_mma else None, comparable=full_size,
                   note="" if full_size else f"size {args.size} on {args.device}"),
            Figure(f"{mode}: block mask build ms", r["mask_build_ms"], "ms"),
            Figure(f"{mode}: block sparsity (share of 128×128 blocks skipped)", r["block_sparsity"], "fraction"),
            Figure(f"{mode}: max |flex − sdpa| on real tokens", r["max_abs_diff"], "abs"),
        ]
        if on_gpu:
            figures.append(Figure(f"{mode}: FlexAttention peak memory in B×H×L² bf16 tensors",
                                  r["flex_peak_in_score_tensors"], "tensors",
                                  goal="attention.flex_peak_in_score_tensors" if is_mma else None,
                                  comparable=full_size))
            figures.append(Figure(f"{mode}: SDPA peak memory in B×H×L² bf16 tensors",
                                  r["sdpa_peak_in_score_tensors"], "tensors"))
    tokens = int((mods_np != 0).sum())
    result = Result(
        benchmark=result_name("attention", args), command=command_line("bench.attention", argv), device=args.device,
        settings={"size": args.size, "heads": heads, "head_dim": head_dim, "batch": batch,
                  "seq_len": args.seq_len, "real_tokens": tokens, "documents": int(docs_np.max(1).sum()),
                  "warmup": args.warmup, "iters": args.iters, "modes": args.modes, "timed_call": what,
                  "compiled": not args.no_compile},
        figures=figures,
        notes=[f"{batch} packed row(s) of {args.seq_len} tokens, {int(docs_np.max(1).sum())} SFT documents, "
               f"{tokens} real tokens; {heads} heads × {head_dim}; timed call: {what}"])
    report(result, args.out, write=not args.no_write)
    return result


if __name__ == "__main__":
    main()
