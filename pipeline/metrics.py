"""Per-step training metrics: throughput, MFU, memory, data-wait share; written to JSON lines and wandb.

Every optimizer step produces one record (see :class:`StepMetrics`); rank 0 appends it to
``{output_dir}/metrics.jsonl`` and logs it to Weights & Biases. wandb runs offline unless the user asks
for ``online`` (``WANDB_MODE`` in the environment wins over the recipe's ``train.wandb_mode``), so no
run ever touches the network by default; offline runs are synced later with ``wandb sync``.

Dropped samples (an undecodable image, an image count that does not match the text, a sample longer
than ``data.max_length``, ...) are counted by the collator per record source and reason, summed over
the ranks every step (:class:`DroppedSamples`) and reported where people look: each step record has
that step's ``dropped`` count and ``dropped_by_source`` (``{source: {reason: n}}``, empty when none; wandb:
``train/dropped`` and ``train/dropped_by_source/<source>/<reason>``), and the run ends with a
``dropped_samples`` event holding the run's totals (also printed as one line and set in the wandb
summary). Past ``data.max_skip_fraction`` of the samples read the run stops with an error.

MFU (model FLOPs utilisation) = achieved model FLOPs / peak FLOPs of the hardware, with the model FLOPs
counted analytically (:func:`pipeline.flops.step_flops`, formula written there) — the PaLM convention (Chowdhery
et al. 2022, appendix B): rematerialisation for activation checkpointing is not counted.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch


# Dense (no sparsity) tensor-core peak FLOP/s by the exact name torch.cuda.get_device_name() reports, from
# NVIDIA's data sheets: bf16, and fp32 inputs on TF32 tensor cores. The H100 variants differ (SXM 989,
# NVL 835, PCIe 756 TFLOP/s bf16: clocks and power), so a substring such as "H100" cannot choose the peak.
_H100_SXM = {"bf16": 989e12, "fp32": 494e12}
_H100_NVL = {"bf16": 835e12, "fp32": 418e12}
_H100_PCIE = {"bf16": 756e12, "fp32": 378e12}
_A100 = {"bf16": 312e12, "fp32": 156e12}
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "NVIDIA H100 80GB HBM3": _H100_SXM,          # H100 SXM5
    "NVIDIA H100 PCIe": _H100_PCIE,
    "NVIDIA H100 NVL": _H100_NVL,
    "NVIDIA H200": _H100_SXM,                    # H200 SXM: H100 SXM compute, 141 GB HBM3e
    "NVIDIA H200 NVL": _H100_NVL,
    "NVIDIA GH200 480GB": _H100_SXM,
    "NVIDIA A100-SXM4-80GB": _A100,
    "NVIDIA A100-SXM4-40GB": _A100,
    "NVIDIA A100 80GB PCIe": _A100,
    "NVIDIA A100-PCIE-40GB": _A100,
    "NVIDIA L40S": {"bf16": 362e12, "fp32": 183e12},
    "NVIDIA A10G": {"bf16": 125e12, "fp32": 62.5e12},
}
PEAK_FLOPS_ENV = "AKI_PEAK_TFLOPS"   # override (per device, in TFLOP/s) for hardware not listed above


def device_peak_flops(device_name: str, precision: str = "bf16") -> float | None:
    """Peak FLOP/s of a device by its exact name (:data:`PEAK_FLOPS`); None when the name is not listed."""
    table = PEAK_FLOPS.get(device_name.strip())
    return None if table is None else table[precision]


def peak_flops(precision: str) -> float | None:
    """Peak FLOP/s of this process's device, from ``AKI_PEAK_TFLOPS`` or :data:`PEAK_FLOPS`; None when unknown
    (CPU, or a GPU not listed: set ``AKI_PEAK_TFLOPS`` for it)."""
    if os.environ.get(PEAK_FLOPS_ENV):
        return float(os.environ[PEAK_FLOPS_ENV]) * 1e12
    if not torch.cuda.is_available():
        return None
    return device_peak_flops(torch.cuda.get_device_name(), precision)


def peak_memory_gb(reset: bool = True) -> float:
    """Peak accelerator memory allocated since the last call (GiB); on CPU the process's peak RSS."""
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
        if reset:
            torch.cuda.reset_peak_memory_stats()
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # Linux reports KiB


@dataclasses.dataclass
class StepMetrics:
    """One optimizer step, as logged (fields of ``metrics.jsonl``)."""

    step: int
    loss: float              # token-mean cross-entropy over every TEXT_TARGET token of the global batch
    lr: float
    grad_norm: float | None  # global gradient norm before clipping (None when the step was skipped)
    samples_per_s: float
    tokens_per_s: float      # non-pad tokens (text + image slots) per second, whole job
    target_tokens: int       # TEXT_TARGET tokens the loss averaged over
    mfu: float | None        # model FLOPs utilisation, 0..1; None when the peak FLOP/s is unknown
    peak_mem_gb: float       # peak memory on rank 0 since the previous step
    data_wait_share: float   # share of the step's wall time rank 0 spent waiting for batches
    step_time_s: float
    skipped: bool = False    # non-finite loss: no optimizer update
    data_digest: str = ""    # hash of the global batch's sample ids, in order (same data ⇔ same digest)
    dropped: int = 0         # samples of this step's global batch dropped by the loader (all ranks)
    dropped_by_source: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)   # {source: {reason: n}}


class MetricsLogger:
    """Rank 0's sink for step records: ``metrics.jsonl`` plus wandb (offline by default)."""

    def __init__(self, output_dir: str | os.PathLike, enabled: bool, wandb_project: str, wandb_mode: str,
                 run_id: str, run_name: str, config: dict[str, Any]):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.wandb_run = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mode = os.environ.get("WANDB_MODE") or wandb_mode
        if mode != "disabled":
            import wandb

            wandb_dir = Path(output_dir) / "wandb"
            wandb_dir.mkdir(parents=True, exist_ok=True)
            self.wandb_run = wandb.init(project=wandb_project, id=run_id, name=run_name, resume="allow",
                                        mode=mode, dir=str(wandb_dir), config=config)

    def log(self, metrics: StepMetrics) -> None:
        if not self.enabled:
            return
        record = dataclasses.asdict(metrics)
        self.event(record)
        values = {f"train/{k}": v for k, v in record.items()
                  if k not in ("step", "data_digest", "dropped_by_source") and v is not None}
        values.update({f"train/dropped_by_source/{source}/{reason}": n
                       for source, reasons in metrics.dropped_by_source.items() for reason, n in reasons.items()})
        self._wandb("log", values, step=metrics.step)

    def log_eval(self, record: dict[str, Any]) -> None:
        """An evaluation (:mod:`pipeline.train_eval`): one ``eval`` event, its figures in wandb under ``eval/``
        (one chart per held-out source and benchmark score), the best so far in the run's summary."""
        if not self.enabled:
            return
        self.event(record)
        values = {f"eval/{k}": v for k, v in record.items()
                  if "/" in k and isinstance(v, (int, float)) and v is not None}
        values.update({f"eval/{k}": record[k] for k in ("eval_s", "eval_share") if record.get(k) is not None})
        self._wandb("log", values, step=record["step"])
        if record.get("best"):
            self._wandb("summary.update", {f"eval/best/{k}": v for k, v in record["best"].items()})

    def summary(self, record: dict[str, Any], line: str) -> None:
        """The run's totals: one event in metrics.jsonl, one printed line, the wandb run's summary."""
        if not self.enabled:
            return
        self.event(record)
        print(line, file=sys.stderr, flush=True)
        if self.wandb_run is not None:
            self._wandb("summary.update", {f"data/{k}": v for k, v in record.items() if k not in ("event", "step")})

    def _wandb(self, method: str, *args: Any, **kwargs: Any) -> None:
        """Call the wandb run's ``method``. When wandb fails (its service process killed by a job-wide
        SIGTERM, a full disk), it is switched off with a warning: metrics.jsonl still has every record,
        and the step or the checkpoint in progress is not lost to a logging error."""
        if self.wandb_run is None:
            return
        try:
            target = self.wandb_run
            for name in method.split("."):          # "log", "finish", "summary.update"
                target = getattr(target, name)
            target(*args, **kwargs)
        except Exception as err:  # noqa: BLE001  (wandb raises many kinds; none may stop training)
            self.wandb_run = None
            print(f"warning: wandb {method} failed ({type(err).__name__}: {err}); wandb is off for the rest of "
                  f"this run, {self.path} keeps every step", file=sys.stderr, flush=True)

    def event(self, record: dict[str, Any]) -> None:
        """Append one JSON line (a step record, or an event such as a skipped step or a save)."""
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        clean["time"] = time.time()
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (logged by a run that died before its next checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        keep = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def close(self) -> None:
        self._wandb("finish")
        self.wandb_run = None


MIN_DROPPED_TO_STOP = 10   # data.max_skip_fraction stops a run from this many dropped samples on (not on a few)


class DroppedSamples:
    """The samples the loader dropped in this run, by source and reason, summed over the ranks; the stop
    rule of ``data.max_skip_fraction``. Its state goes into every checkpoint, so the totals and the rule
    span a resumed run."""

    def __init__(self, max_fraction: float | None):
        self.max_fraction = max_fraction
        self.read = 0                              # samples read (kept + dropped) by all ranks
        self.counts: Counter[tuple[str, str]] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, batches: Sequence[dict[str, Any]], read: int, dropped: int) -> dict[str, dict[str, int]]:
        """Count one step: ``batches`` this rank's micro-batches, ``read`` / ``dropped`` the step's samples
        read and dropped by all ranks (already summed). Returns the step's drops by source over all ranks;
        gathers them from the ranks (a collective every rank makes: ``dropped`` is the same on all) only
        when some sample was dropped."""
        from pipeline.data.collate import by_source

        self.read += int(read)
        if not dropped:
            return {}
        local = [(source, reason, n) for b in batches for source, reasons in b["skipped"].items()
                 for reason, n in reasons.items()]
        step: Counter[tuple[str, str]] = Counter()
        for source, reason, n in _gather_from_ranks(local):
            step[source, reason] += n
        self.counts.update(step)
        return by_source(step)

    def too_many(self) -> str | None:
        """The error message when the dropped share exceeds ``data.max_skip_fraction``, else None."""
        if self.max_fraction is None or self.total < MIN_DROPPED_TO_STOP or self.total <= self.max_fraction * self.read:
            return None
        return (f"{self.total} of the {self.read} samples read were dropped ({self.total / self.read:.1%} > "
                f"data.max_skip_fraction={self.max_fraction}): {self.describe()}. Check or rebuild these datasets "
                f"(or raise data.max_skip_fraction), then resume from the last checkpoint with --resume auto")

    def describe(self) -> str:
        """``source: reason n, reason n; source: ...`` (``none`` when nothing was dropped)."""
        from pipeline.data.collate import by_source

        return "; ".join(f"{source or '(no source)'}: " + ", ".join(f"{reason} {n}" for reason, n in reasons.items())
                         for source, reasons in by_source(self.counts).items()) or "none"

    def summary(self, step: int) -> tuple[dict[str, Any], str]:
        """The ``dropped_samples`` event of the run's totals, and its printed line."""
        from pipeline.data.collate import by_source

        fraction = self.total / self.read if self.read else 0.0
        record = {"event": "dropped_samples", "step": step, "read": self.read, "dropped": self.total,
                  "fraction": fraction, "by_source": by_source(self.counts)}
        return record, f"dropped samples: {self.total} of {self.read} read ({fraction:.2%}): {self.describe()}"

    def state_dict(self) -> dict[str, Any]:
        from pipeline.data.collate import by_source

        return {"read": self.read, "by_source": by_source(self.counts)}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Resume the totals (None: a checkpoint written before they were kept: start from 0)."""
        state = state or {}
        self.read = int(state.get("read", 0))
        self.counts = Counter({(source, reason): int(n) for source, reasons in state.get("by_source", {}).items()
                               for reason, n in reasons.items()})


def _gather_from_ranks(local: list) -> list:
    """Every rank's list, concatenated in rank order (one rank when there is no process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(local)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return [item for part in gathered for item in part]


def read_metrics(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The step records of ``{output_dir}/metrics.jsonl`` (events left out), in file order."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if "event" not in r]
