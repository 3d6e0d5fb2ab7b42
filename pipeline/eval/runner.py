"""What every benchmark CLI shares: batched, sharded generation and the command-line flow.

A benchmark is a :class:`Benchmark`: how to prompt one item, how to score the outputs, how to print the
scores. Its items become :class:`Request` objects (a key, the chat segments of the prompt, the image);
:func:`generate_all` runs them through :mod:`pipeline.generate` in batches (greedy, KV cache, left
padding). Under ``torchrun`` (``WORLD_SIZE`` > 1) rank r takes every world_size-th request starting at r
and the outputs are gathered on rank 0 (gloo on CPU, NCCL on GPU); the other ranks get an empty dict
back. :func:`run_cli` is the whole command: read → generate → score → ``predictions.jsonl`` +
``scores.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline.chat import Chat


@dataclasses.dataclass
class Request:
    """One prompt to answer: its result key, chat content and image bytes (one per image)."""

    key: str
    prompt: Chat
    images: list[bytes]


@dataclasses.dataclass(frozen=True)
class DistContext:
    """Where this process sits among the evaluation processes."""

    rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistContext:
    """Join the ``torchrun`` process group when ``WORLD_SIZE`` > 1; a plain run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device != "cpu" and os.environ.get("DS_ACCELERATOR") != "cpu"
    dev = device or (f"cuda:{local_rank}" if use_cuda else "cpu")
    if world > 1 and not dist.is_initialized():
        if dev.startswith("cuda"):
            torch.cuda.set_device(torch.device(dev))
        dist.init_process_group(backend="nccl" if dev.startswith("cuda") else "gloo")
    return DistContext(rank=rank, world_size=world, device=dev)


def shard(items: Sequence, ctx: DistContext) -> list:
    """This rank's share: every ``world_size``-th item starting at ``rank``."""
    return list(items[ctx.rank::ctx.world_size])


def gather(results: dict[str, str], ctx: DistContext) -> dict[str, str]:
    """All ranks' results merged on rank 0 (other ranks get ``{}``)."""
    if ctx.world_size == 1:
        return results
    parts: list[dict[str, str] | None] = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(results, parts, dst=0)
    if not ctx.is_main:
        return {}
    merged: dict[str, str] = {}
    for part in parts:
        merged.update(part or {})
    return merged


def load_model(folder: str, device: str, attn_implementation: str = "sdpa"):
    """An exported model (its attention mode comes from the folder) and its tokenizer, ready on ``device``.

    bf16 on GPU, fp32 on CPU; ``sdpa`` runs everywhere (a folder trained with FlexAttention keeps its
    attention mode, only the kernel changes).
    """
    from pipeline.model.aki import AKIModel

    dtype = torch.bfloat16 if device.startswith("cuda") else None
    model = AKIModel.from_pretrained(folder, attn_implementation=attn_implementation, dtype=dtype).to(device)
    if model.tokenizer is None:
        raise ValueError(f"export folder {folder} holds no tokenizer; export it with AKIModel.save_pretrained "
                         "after set_tokenizer (pipeline.export does)")
    return model, model.tokenizer


def generate_all(model, tokenizer, requests: Sequence[Request], ctx: DistContext, batch_size: int = 8,
                 max_new_tokens: int = 16, desc: str = "generate", synced: bool = False,
                 progress: bool = True) -> dict[str, str]:
    """Answer text for every request key (complete on rank 0).

    ``synced`` (a model whose parameters are partitioned over the ranks, ZeRO-3): every rank runs the same
    number of batches (a rank out of questions repeats its first one and drops the answer) and decodes until
    every rank is done.
    """
    from pipeline.generate import generate

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    mine = shard(requests, ctx)
    rounds = math.ceil(math.ceil(len(requests) / ctx.world_size) / batch_size) if synced else \
        math.ceil(len(mine) / batch_size)
    out: dict[str, str] = {}
    bar = tqdm(total=len(mine), desc=f"{desc} [rank {ctx.rank}/{ctx.world_size}]",
               disable=not progress or (not ctx.is_main and ctx.world_size > 1), unit="q")
    for start in range(0, rounds * batch_size, batch_size):
        batch = mine[start:start + batch_size]
        filler = batch or requests[:1]          # synced: this rank has no question left this round
        texts = generate(model, tokenizer, [r.prompt for r in filler], [r.images for r in filler],
                         max_new_tokens=max_new_tokens, synced=synced)
        out.update({r.key: t for r, t in zip(batch, texts)})
        bar.update(len(batch))
    bar.close()
    return gather(out, ctx)


PREDICTIONS_FILE = "predictions.jsonl"
SCORES_FILE = "scores.json"


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One benchmark's parts; its items have a ``key`` and ``load_image()``."""

    name: str
    prompt: Callable[[Any], Chat]
    score_outputs: Callable[[Sequence[Any], Mapping[str, str]], tuple[list[dict], dict]]
    format_scores: Callable[[Mapping], str]


def evaluate(benchmark: Benchmark, model, tokenizer, items: Sequence[Any], ctx: DistContext = DistContext(),
             batch_size: int = 8, max_new_tokens: int = 8, synced: bool = False,
             progress: bool = True) -> tuple[list[dict], dict] | None:
    """Generate and score; returns (records, scores) on rank 0, None elsewhere (``synced``, ``progress``:
    as :func:`generate_all`)."""
    requests = [Request(i.key, benchmark.prompt(i), [i.load_image()]) for i in items]
    outputs = generate_all(model, tokenizer, requests, ctx, batch_size=batch_size, max_new_tokens=max_new_tokens,
                           desc=benchmark.name, synced=synced, progress=progress)
    return benchmark.score_outputs(items, outputs) if ctx.is_main else None


def write_results(out_dir: str, records: Sequence[dict], scores: Mapping) -> None:
    """``predictions.jsonl`` (one line per item) and ``scores.json`` in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, PREDICTIONS_FILE), "w") as f:
        f.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)
    with open(os.path.join(out_dir, SCORES_FILE), "w") as f:
        json.dump(scores, f, indent=2)


def add_run_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options every benchmark CLI takes besides its data."""
    p.add_argument("--model", required=True, help="exported model folder (AKIModel.save_pretrained)")
    p.add_argument("--out", required=True, help="output folder for predictions.jsonl and scores.json")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N questions")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    return p


def run_cli(benchmark: Benchmark, args: argparse.Namespace, read: Callable[[], tuple[Sequence[Any], Any]]) -> int:
    """The benchmark command: ``read()`` gives (items, report with ``skipped`` and ``summary()``)."""
    ctx = init_distributed(args.device)
    items, report = read()
    if ctx.is_main:
        print(report.summary(f"{benchmark.name} {args.data}"), file=sys.stderr)
    items = items[:args.limit] if args.limit else items
    model, tokenizer = load_model(args.model, ctx.device)
    result = evaluate(benchmark, model, tokenizer, items, ctx, args.batch_size, args.max_new_tokens)
    if result is not None:
        records, scores = result
        print(benchmark.format_scores(scores))
        write_results(args.out, records, {**scores, "skipped": dict(report.skipped)})
        print(f"wrote {os.path.join(args.out, PREDICTIONS_FILE)} and {SCORES_FILE}")
    return 0


__all__ = ["Benchmark", "DistContext", "Request", "add_run_args", "evaluate", "gather", "generate_all",
           "init_distributed", "load_model", "run_cli", "shard", "write_results"]
