"""Resumable checkpoints: layout, atomic completion, choosing the newest complete one, pruning, and
conversion to DeepSpeed's universal format for resuming on another number of ranks.

Layout of one checkpoint (``{output_dir}/checkpoints/step_{N:08d}/``)::

    zero_pp_rank_*_mp_rank_00_{model,optim}_states.pt   DeepSpeed engine state (engine.save_checkpoint)
    rank_00000.json ...     per rank: data loader state_dict and RNG states (torch, CUDA, numpy, python)
    trainer_state.json      step, world size, wandb run id, skipped-step count, recipe
    model/                  aki_config.json + tokenizer (what ``python -m pipeline.export`` rebuilds from)
    COMPLETE                written last (atomic rename); lists every file with its size
    universal/              made on demand: the same state in DeepSpeed's universal format

A checkpoint counts as complete only when ``COMPLETE`` exists and every file it lists still has the
recorded size, so a directory cut off by ``kill -9`` (no marker) or damaged afterwards (a truncated
file) is never chosen by ``--resume auto``. Our own files are JSON (no pickles); DeepSpeed reads its
own ``.pt`` files.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
UNIVERSAL = "universal"
SKELETON = "model"      # aki_config.json + tokenizer: rebuilds the model without weights (for export)
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoints_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINTS


def step_tag(step: int) -> str:
    """The directory name of the checkpoint after ``step`` optimizer steps."""
    return f"step_{step:08d}"


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Every ``step_N`` directory (complete or not), sorted by step number (numerically)."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def is_complete(path: str | os.PathLike) -> bool:
    """True when the COMPLETE marker exists and every file it lists has its recorded size."""
    marker = Path(path) / COMPLETE
    try:
        listed = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all((Path(path) / name).is_file() and (Path(path) / name).stat().st_size == size
               for name, size in listed.items())


def latest_complete(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    for _, path in reversed(list_checkpoints(output_dir)):
        if is_complete(path):
            return path
    return None


def resolve_resume(resume: str | None, output_dir: str | os.PathLike) -> Path | None:
    """``--resume`` → a checkpoint directory. ``auto``: the newest complete one (None on a fresh run)."""
    if resume is None:
        return None
    if resume == "auto":
        return latest_complete(output_dir)
    path = Path(resume)
    if not is_complete(path):
        raise ValueError(f"--resume {resume}: not a complete checkpoint (no valid {COMPLETE} marker in it); "
                         f"use --resume auto to pick the newest complete one under {checkpoints_root(output_dir)}")
    return path


def check_start(resume_from: str | os.PathLike | None, output_dir: str | os.PathLike) -> None:
    """Refuse a start whose checkpoints would mix with later ones already in ``output_dir``.

    Pruning ranks checkpoints by step number, so a new run (or a resume from an earlier step) in a folder
    that holds a later run's checkpoints would see its own new checkpoints deleted in their favour.
    """
    root, existing = checkpoints_root(output_dir), list_checkpoints(output_dir)
    if resume_from is None:
        if existing:
            names = ", ".join(p.name for _, p in existing)
            raise ValueError(f"{root} already holds checkpoints of an earlier run ({names}); "
                             f"continue that run with --resume auto, or start this one in another --output-dir "
                             f"(or delete {root})")
        return
    start = int(read_json(Path(resume_from) / TRAINER_STATE)["step"])
    later = [p.name for s, p in existing if s > start and is_complete(p)]
    if later:
        raise ValueError(f"--resume {resume_from} starts at step {start}, but {root} holds later checkpoints "
                         f"({', '.join(later)}) that pruning would keep instead of this run's new ones; move "
                         f"them out of {root} or train into another --output-dir")


def mark_complete(path: str | os.PathLike) -> None:
    """Write COMPLETE (list of files and sizes) through a temporary file and an atomic rename."""
    path = Path(path)
    files = {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*"))
             if p.is_file() and p.name != COMPLETE and not p.name.endswith(".tmp")}
    tmp = path / (COMPLETE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / COMPLETE)


def prune(output_dir: str | os.PathLike, keep_last: int, protect: Iterable[int] = ()) -> list[Path]:
    """Delete every checkpoint older than the ``keep_last`` newest complete ones, except the steps in
    ``protect`` (the best checkpoint of the run's evaluation); returns what was deleted."""
    complete = [(s, p) for s, p in list_checkpoints(output_dir) if is_complete(p)]
    if len(complete) <= keep_last:
        return []
    oldest_kept, protect = complete[-keep_last][0], set(protect)
    doomed = [p for s, p in list_checkpoints(output_dir) if s < oldest_kept and s not in protect]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


# --------------------------------------------------------------------------- small JSON states


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON through a temporary file and an atomic rename."""
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.json"


def rng_state() -> dict[str, Any]:
    """Every RNG the trainer draws from, as JSON-serialisable lists."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "python": {"version": version, "internal": list(internal), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# --------------------------------------------------------------------------- universal conversion


def saved_world_size(path: str | os.PathLike) -> int:
    return int(read_json(Path(path) / TRAINER_STATE)["world_size"])


def ensure_universal(path: str | os.PathLike) -> Path:
    """Convert a checkpoint to DeepSpeed's universal format once (``path/universal``); returns that folder.

    Run on one rank (others wait at a barrier). The conversion is DeepSpeed's own ``ds_to_universal``;
    its output is marked complete like a checkpoint, so a conversion cut off midway is redone.
    """
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = Path(path) / UNIVERSAL
    if is_complete(out):
        return out
    shutil.rmtree(out, ignore_errors=True)
    ds_to_universal(argparse.Namespace(input_folder=str(path), output_folder=str(out), num_extract_workers=1,
                                       num_merge_workers=1, keep_temp_folder=False, strict=True,
                                       inject_missing_state=False))
    mark_complete(out)
    return out


# --------------------------------------------------------------------------- save / load with the engine


def save(engine: Any, output_dir: str | os.PathLike, step: int, trainer_state: dict[str, Any],
         rank_state: dict[str, Any], keep_last: int, write_extra: Callable[[Path], None] | None = None,
         trainable_only: bool = False, protect: Iterable[int] = ()) -> Path:
    """Save a resumable checkpoint from every rank; rank 0 completes it and prunes old ones.

    ``rank_state`` (JSON) is this rank's data loader state; the RNG states are added here.
    ``write_extra(path)`` runs on rank 0 before the checkpoint is marked complete. ``trainable_only``:
    leave the frozen parameters out (LoRA runs: the frozen base is re-read from ``train.init_from``).
    ``protect``: steps :func:`prune` keeps whatever their age.
    """
    import torch.distributed as dist

    rank = dist.get_rank()
    root, tag = checkpoints_root(output_dir), step_tag(step)
    path = root / tag
    if rank == 0 and path.exists():
        shutil.rmtree(path)          # a partial directory left by an earlier attempt at this step
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False, exclude_frozen_parameters=trainable_only)
    write_json(path / rank_file(rank), {**rank_state, "rng": rng_state()})
    dist.barrier()
    if rank == 0:
        if write_extra is not None:
            write_extra(path)
        write_json(path / TRAINER_STATE, {**trainer_state, "step": step, "world_size": dist.get_world_size()})
        mark_complete(path)
        prune(output_dir, keep_last, protect)
    dist.barrier()
    return path


def load(engine: Any, path: str | os.PathLike, seed: int = 0,
         load_module: Callable[[dict[str, Any], torch.nn.Module], None] | None = None
         ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a checkpoint into ``engine`` (built with ``checkpoint.load_universal`` when
    :func:`needs_universal`); restores this rank's RNG states. Returns (trainer state, rank state).

    On another number of ranks, DeepSpeed's universal loader is completed by
    :func:`pipeline.ds_universal.complete_universal_load` (frozen parameters, ZeRO-3 optimizer steps and
    group settings). Either way the loaded weights are then checked (:func:`pipeline.weights_check.check_loaded`:
    all finite, frozen parts equal to those the saving run recorded). ``load_module(state, module)`` replaces
    DeepSpeed's strict module load (a checkpoint of the trainable parameters only:
    :func:`pipeline.lora.load_trainable`).
    """
    import torch.distributed as dist

    from pipeline.weights_check import check_loaded

    path = Path(path)
    trainer_state = read_json(path / TRAINER_STATE)
    if engine.load_universal_checkpoint():
        from pipeline.ds_universal import complete_universal_load

        load_path, _ = engine.load_checkpoint(str(path), tag=UNIVERSAL, custom_load_fn=load_module)
        if load_path is not None:
            trainer_state["universal_repairs"] = complete_universal_load(engine, path, path / UNIVERSAL)
    else:
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, custom_load_fn=load_module)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    trainer_state["frozen_sha256"] = check_loaded(engine, str(path), trainer_state.get("frozen_sha256"))
    return trainer_state, restore_rank_state(path, dist.get_rank(), seed)


def restore_rank_state(path: str | os.PathLike, rank: int, seed: int) -> dict[str, Any]:
    """This rank's saved state (data loader) with its RNG states restored.

    The data loader state is global (streaming resumes any world size): a new rank reads rank 0's. RNG states
    are per process: a rank that existed in the saving run gets its own, a new rank a seeded stream of its
    own (:func:`seed_new_rank`), never another rank's copy.
    """
    trainer_state = read_json(Path(path) / TRAINER_STATE)
    existed = rank < int(trainer_state["world_size"])
    rank_state = read_json(Path(path) / rank_file(rank if existed else 0))
    saved_rng = rank_state.pop("rng")
    if existed:
        set_rng_state(saved_rng)
    else:
        seed_new_rank(seed, rank, int(trainer_state["step"]))
    return rank_state


def seed_new_rank(seed: int, rank: int, step: int) -> None:
    """Seed every RNG of a rank that did not exist in the saving run from (seed, rank, step): its own
    stream, reproducible, and never another rank's copy."""
    derived = int.from_bytes(hashlib.sha256(f"{seed}/{rank}/{step}".encode()).digest()[:8], "little") >> 1
    torch.manual_seed(derived)
    np.random.seed(derived % 2**32)
    random.seed(derived)


def needs_universal(path: str | os.PathLike, world_size: int) -> bool:
    """True when the checkpoint was saved by another number of ranks than ``world_size``."""
    return saved_world_size(path) != world_size


__all__ = ["CHECKPOINTS", "COMPLETE", "TRAINER_STATE", "UNIVERSAL", "checkpoints_root", "step_tag",
           "list_checkpoints", "is_complete", "latest_complete", "resolve_resume", "mark_complete", "prune",
           "write_json", "read_json", "rank_file", "rng_state", "set_rng_state", "saved_world_size",
           "ensure_universal", "save", "load", "restore_rank_state", "seed_new_rank", "needs_universal", "SKELETON"]
