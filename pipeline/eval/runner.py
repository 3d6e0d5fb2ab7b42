"""Batched, sharded answer generation shared by the benchmark CLIs.

Each benchmark turns its questions into :class:`Request` objects (a key, the chat segments of the
prompt, the image). :func:`generate_all` runs them through :mod:`pipeline.generate` in batches
(greedy, KV cache, left padding). Under ``torchrun`` (``WORLD_SIZE`` > 1) rank r takes every
world_size-th request starting at r and the outputs are gathered on rank 0 (gloo on CPU, NCCL on GPU);
the other ranks get an empty dict back.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline.chat import Segment


@dataclasses.dataclass
class Request:
    """One prompt to answer: its result key, chat segments and image bytes (one per image slot)."""

    key: str
    segments: list[Segment]
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
                 max_new_tokens: int = 16, desc: str = "generate") -> dict[str, str]:
    """Answer text for every request key (complete on rank 0)."""
    from pipeline.generate import generate

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    mine = shard(requests, ctx)
    out: dict[str, str] = {}
    bar = tqdm(total=len(mine), desc=f"{desc} [rank {ctx.rank}/{ctx.world_size}]",
               disable=not ctx.is_main and ctx.world_size > 1, unit="q")
    for start in range(0, len(mine), batch_size):
        batch = mine[start:start + batch_size]
        texts = generate(model, tokenizer, [r.segments for r in batch], [r.images for r in batch],
                         max_new_tokens=max_new_tokens)
        out.update({r.key: t for r, t in zip(batch, texts)})
        bar.update(len(batch))
    bar.close()
    return gather(out, ctx)


__all__ = ["DistContext", "Request", "gather", "generate_all", "init_distributed", "load_model", "shard"]
