"""Checks that the weights a run loads, saves and exports are sound, so that no run ends "successfully"
with broken weights.

* :func:`nonfinite_tensors` — every parameter (this rank's ZeRO-3 partition, or the whole tensor) and every
  optimizer state tensor checked for NaN/Inf, summed over ranks: after every checkpoint load.
* :func:`frozen_digest` — a SHA-256 of the frozen parameters (the vision tower), whole and in name order, so
  the same weights give the same digest on any number of ranks. The trainer records it at start, writes it
  into every checkpoint and compares it after every resume.
* :func:`check_finite_state_dict` — a consolidated state dict (an export) refused when any tensor is not
  finite.
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterator

import torch


class BrokenWeights(RuntimeError):
    """Weights that must not be trained on or written: not finite, or frozen parts changed."""


def _local(param: torch.Tensor) -> torch.Tensor:
    """This rank's values of a parameter: its ZeRO-3 partition when it has one."""
    return param.ds_tensor if hasattr(param, "ds_tensor") else param


def _optimizer_tensors(engine: Any) -> Iterator[tuple[str, torch.Tensor]]:
    optimizer = getattr(engine, "optimizer", None)
    inner = getattr(optimizer, "optimizer", optimizer)
    for i, state in enumerate(getattr(inner, "state", {}).values()):
        for key, value in state.items():
            if torch.is_tensor(value) and value.is_floating_point():
                yield f"optimizer state {i}.{key}", value
    for i, flat in enumerate(getattr(optimizer, "fp32_partitioned_groups_flat", []) or []):
        yield f"fp32 master partition {i}", flat


def nonfinite_tensors(engine: Any) -> list[str]:
    """Names of the parameters and optimizer tensors that hold a NaN or Inf on any rank (one all-reduce)."""
    import torch.distributed as dist

    bad = [name for name, p in engine.module.named_parameters() if not torch.isfinite(_local(p).detach()).all()]
    bad += [name for name, t in _optimizer_tensors(engine) if not torch.isfinite(t.detach()).all()]
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[list[str]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, bad)
        bad = sorted({name for names in gathered for name in names})
    return bad


def frozen_digest(module: torch.nn.Module) -> str | None:
    """SHA-256 over the frozen parameters (name, dtype, shape, bytes), whole, in name order; None when
    nothing is frozen. Under ZeRO-3 each parameter is gathered in turn (every rank takes part, rank 0
    hashes) and the digest is broadcast, so every rank returns the same value."""
    import deepspeed
    import torch.distributed as dist

    frozen = [(n, p) for n, p in module.named_parameters() if not p.requires_grad]
    if not frozen:
        return None
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    h = hashlib.sha256()
    for name, param in frozen:
        with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
            if rank0:
                value = param.detach().cpu().contiguous()
                h.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
                h.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    digest = [h.hexdigest() if rank0 else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(digest, src=0)
    return digest[0]


def check_loaded(engine: Any, checkpoint: str, saved_digest: str | None) -> str | None:
    """After a checkpoint load: every tensor finite, and the frozen parameters equal to those the saving run
    recorded (``saved_digest``; None for checkpoints that recorded none). Returns the current digest."""
    bad = nonfinite_tensors(engine)
    if bad:
        raise BrokenWeights(f"checkpoint {checkpoint} loaded with non-finite values in {len(bad)} tensors "
                            f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}); resume from an earlier "
                            f"checkpoint (--resume CKPT_DIR)")
    digest = frozen_digest(engine.module)
    if saved_digest is not None and digest != saved_digest:
        raise BrokenWeights(f"checkpoint {checkpoint}: the frozen parameters after loading differ from those the "
                            f"run saved (SHA-256 {digest} != recorded {saved_digest}); the checkpoint or its "
                            f"loader is damaged. Resume on the number of ranks that saved it, or from another "
                            f"checkpoint")
    return digest


def check_finite_state_dict(state: dict[str, torch.Tensor], what: str) -> None:
    """Refuse a state dict with any non-finite floating-point tensor, naming them."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise BrokenWeights(f"{what}: {len(bad)} tensors hold NaN or Inf ({', '.join(bad[:5])}"
                            f"{', ...' if len(bad) > 5 else ''}); nothing written. Export an earlier checkpoint")


__all__ = ["BrokenWeights", "nonfinite_tensors", "frozen_digest", "check_loaded", "check_finite_state_dict"]
