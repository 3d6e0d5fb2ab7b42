"""Resuming on another number of ranks: what DeepSpeed's universal-checkpoint loader leaves out, put back.

A checkpoint saved by N ranks is resumed on M ≠ N ranks through DeepSpeed's universal format
(``ds_to_universal``, then ``engine.load_checkpoint`` with ``checkpoint.load_universal``). Checked on
DeepSpeed 0.19.8 (:data:`CHECKED_VERSIONS`), that loader has three gaps, closed here right after it runs
(:func:`complete_universal_load`) and nowhere else:

1. **Frozen parameters are not loaded.** The universal folder holds the optimizer's (trainable) parameters
   only, and the engine skips the module state of a universal checkpoint, so frozen parameters (the SigLIP
   tower) keep whatever they held after construction: uninitialised memory under ``zero.Init`` when the
   weights were to come from the checkpoint. :func:`restore_frozen_parameters` reads them from the
   checkpoint's model-state files (the fragments each saving rank wrote, merged by DeepSpeed's own
   ``zero_to_fp32`` parser) and writes them into the (partitioned) model.
2. **ZeRO-3: one shared ``step`` tensor.** ``load_hp_checkpoint_state_from_checkpoint_dir_stage3`` hands the
   same ``step`` tensor to every optimizer sub-group; AdamW increments it in place once per sub-group per
   step, so Adam's bias correction is wrong from then on.
3. **ZeRO-3: group hyper-parameters.** The same function copies ``param_groups[0]``'s values (weight decay
   among them) to every group, so the no-decay group decays.

:func:`repair_stage3_optimizer` gives each sub-group its own step (the saved value) and each group its own
saved hyper-parameters. Every DeepSpeed internal it relies on is checked first; if one is missing or has
another shape (a DeepSpeed upgrade), :class:`UnsupportedDeepSpeed` stops the resume and names it, rather
than resuming wrongly. A minimal stand-alone reproduction of gaps 2 and 3, fit to report upstream, is
``tests/upstream/ds_universal_stage3_optimizer.py``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

CHECKED_VERSIONS = ("0.19.8",)     # DeepSpeed versions whose universal loader this module was written against
UNIVERSAL_OPTIMIZER_STATE = Path("zero") / "optimizer_state.pt"


class UnsupportedDeepSpeed(RuntimeError):
    """DeepSpeed's internals do not have the shape this module repairs; resuming would be wrong."""


def _unsupported(what: str) -> UnsupportedDeepSpeed:
    import deepspeed

    return UnsupportedDeepSpeed(
        f"resume on another number of ranks: DeepSpeed {deepspeed.__version__} {what}; pipeline/ds_universal.py "
        f"was written against DeepSpeed {', '.join(CHECKED_VERSIONS)}. Resume on the number of ranks that saved "
        f"the checkpoint, or pin deepspeed=={CHECKED_VERSIONS[-1]}")


def _zero_stage(engine: Any) -> int:
    return int(engine.zero_optimization_stage())


# --------------------------------------------------------------------------- frozen parameters


def frozen_state_dict(checkpoint_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The frozen parameters saved in a ZeRO checkpoint folder, whole (as saved: dtype unchanged), by name.

    Read with DeepSpeed's ``zero_to_fp32`` parser from the model-state files only (the optimizer shards,
    by far the largest files, are not opened)."""
    from deepspeed.utils import zero_to_fp32 as z

    files = z.get_model_state_files(str(checkpoint_dir))
    states = z.parse_model_states(files)
    if not states or states[0].frozen_param_shapes is None:
        return {}
    fragments = [s.frozen_param_fragments for s in states]
    if any(f is None for f in fragments):
        raise _unsupported("saves frozen_param_shapes without frozen_param_fragments in its model-state files")
    merged: dict[str, torch.Tensor] = {}
    for name, shape in states[0].frozen_param_shapes.items():
        parts = [f[name] for f in fragments if name in f]
        numel = torch.Size(shape).numel()
        if len(parts) == len(states) and all(p.dim() == 1 for p in parts) and sum(p.numel() for p in parts) >= numel:
            merged[name] = torch.cat(parts).narrow(0, 0, numel).view(shape)   # ZeRO-3: one flat piece per rank
        elif parts and tuple(parts[0].shape) == tuple(shape):
            merged[name] = parts[0]                                          # ZeRO-1/2: whole tensors
        else:
            raise _unsupported(f"saved frozen parameter {name!r} as pieces {[tuple(p.shape) for p in parts]} "
                               f"that do not make its shape {tuple(shape)}")
    return merged


def restore_frozen_parameters(engine: Any, checkpoint_dir: str | os.PathLike) -> list[str]:
    """Copy the checkpoint's frozen parameters into ``engine.module``; returns their names (none when the
    checkpoint was saved without them: a LoRA run's, whose frozen base the trainer loads from ``init_from``).

    ZeRO-3: rank 0 reads the files and writes each parameter inside ``GatheredParameters`` (DeepSpeed
    re-partitions it to every rank). ZeRO-1/2: every rank holds whole parameters and reads them itself.
    """
    import deepspeed
    import torch.distributed as dist

    frozen = [(n, p) for n, p in engine.module.named_parameters() if not p.requires_grad]
    if not frozen:
        return []
    partitioned = _zero_stage(engine) == 3
    reader = not partitioned or dist.get_rank() == 0
    saved = frozen_state_dict(checkpoint_dir) if reader else {}
    held = [bool(saved)]
    if partitioned and dist.get_world_size() > 1:
        dist.broadcast_object_list(held, src=0)
    if not held[0]:       # saved without them (exclude_frozen_parameters: LoRA): they are built from init_from
        return []
    if reader:
        missing = [n for n, _ in frozen if n not in saved]
        if missing:
            raise ValueError(f"checkpoint {checkpoint_dir} holds no frozen values for {missing[:5]} "
                             f"({len(missing)} parameters) but holds others: it does not match this model")
    for name, param in frozen:
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0, enabled=partitioned), torch.no_grad():
            if reader:
                value = saved[name]
                if tuple(value.shape) != tuple(getattr(param, "ds_shape", param.shape)):
                    raise ValueError(f"checkpoint {checkpoint_dir}: frozen {name!r} has shape {tuple(value.shape)}, "
                                     f"the model {tuple(param.shape)}")
                param.data.copy_(value.to(param.dtype))
    return [n for n, _ in frozen]


# --------------------------------------------------------------------------- ZeRO-3 optimizer state


def read_universal_optimizer_state(universal_dir: str | os.PathLike) -> dict[str, Any]:
    """``universal/zero/optimizer_state.pt`` (written by ``ds_to_universal``), loaded with ``weights_only``:
    tensors, plain containers and the two DeepSpeed classes it holds, nothing else."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum]):
        return torch.load(Path(universal_dir) / UNIVERSAL_OPTIMIZER_STATE, map_location="cpu", weights_only=True)


def _saved_step(saved_state: dict[Any, dict[str, Any]]) -> torch.Tensor | int | float:
    steps = {float(s["step"]) for s in saved_state.values() if "step" in s}
    if len(steps) != 1:
        raise _unsupported(f"wrote the universal optimizer state with step values {sorted(steps)} (one expected)")
    return next(s["step"] for s in saved_state.values() if "step" in s)


def repair_stage3_optimizer(engine: Any, universal_dir: str | os.PathLike) -> dict[str, Any]:
    """Give every ZeRO-3 optimizer sub-group its own saved ``step`` and every param group its own saved
    hyper-parameters (gaps 2 and 3 of the module docstring). Returns what was set, for the run's log."""
    zero = engine.optimizer
    inner = getattr(zero, "optimizer", None)
    flats = getattr(zero, "fp32_partitioned_groups_flat", None)
    if inner is None or flats is None or not hasattr(inner, "state") or not hasattr(inner, "param_groups"):
        raise _unsupported("has no ZeRO-3 optimizer with .optimizer.state and .fp32_partitioned_groups_flat")
    saved = read_universal_optimizer_state(universal_dir)
    try:
        saved_groups = saved["optimizer_state_dict"]["param_groups"]
        saved_state = saved["optimizer_state_dict"]["state"]
    except (KeyError, TypeError) as err:
        raise _unsupported(f"wrote {UNIVERSAL_OPTIMIZER_STATE} without optimizer_state_dict.{err}") from err
    if len(saved_groups) != len(inner.param_groups):
        raise _unsupported(f"saved {len(saved_groups)} param groups where the optimizer has {len(inner.param_groups)}")
    for group, saved_group in zip(inner.param_groups, saved_groups):
        for key, value in saved_group.items():
            if key != "params":
                group[key] = value
    step = _saved_step(saved_state)
    shared = {id(inner.state[f].get("step")) for f in flats if f in inner.state}
    for flat in flats:
        state = inner.state.get(flat)
        if state is None or "step" not in state:
            raise _unsupported("loaded a sub-group without an optimizer state")
        current = state["step"]
        state["step"] = (torch.as_tensor(step, dtype=current.dtype, device=current.device).clone()
                         if torch.is_tensor(current) else type(current)(float(step)))
    return {"step": float(step), "sub_groups": len(flats), "step_was_shared": len(shared) < len(flats),
            "weight_decay": [g["weight_decay"] for g in inner.param_groups]}


def complete_universal_load(engine: Any, checkpoint_dir: str | os.PathLike,
                            universal_dir: str | os.PathLike) -> dict[str, Any]:
    """Everything DeepSpeed's universal loader leaves out, after ``engine.load_checkpoint``: the frozen
    parameters (from ``checkpoint_dir``) and, under ZeRO-3, the optimizer's steps and group settings."""
    report: dict[str, Any] = {"frozen_restored": len(restore_frozen_parameters(engine, checkpoint_dir))}
    if _zero_stage(engine) == 3:
        report.update(repair_stage3_optimizer(engine, universal_dir))
    return report


__all__ = ["CHECKED_VERSIONS", "UnsupportedDeepSpeed", "frozen_state_dict", "restore_frozen_parameters",
           "read_universal_optimizer_state", "repair_stage3_optimizer", "complete_universal_load"]
