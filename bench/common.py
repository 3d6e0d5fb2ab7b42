"""Shared pieces of the benchmarks: the goals, timing, machine description and the results files.

Every benchmark produces a :class:`Result` (a list of :class:`Figure` objects plus the machine, date,
command and settings) and calls :func:`write_result`, which stores ``<out>/<benchmark>-<cpu|gpu>.json``
and regenerates ``<out>/README.md`` from every JSON file in that folder. A figure names the goal it is
compared with (:data:`GOALS`, the one place the targets are written); a goal measured on the wrong
machine (a GPU goal on a CPU) or at the wrong size is reported as not applicable, never as met.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NO_GPU = "not measured (no GPU): run bench/gpu_check.sh on an H100/H200"
GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Goal:
    """A target a figure is compared with."""

    what: str
    target: float
    unit: str
    higher_is_better: bool = True
    needs_gpu: bool = False

    def describe(self) -> str:
        return f"{'≥' if self.higher_is_better else '≤'} {self.target:g} {self.unit}"

    def met_by(self, value: float) -> bool:
        return value >= self.target if self.higher_is_better else value <= self.target


GOALS: dict[str, Goal] = {
    "attention.mma_speedup": Goal(
        "MMA attention fwd+bwd, FlexAttention BlockMask vs SDPA with a dense mask, SFT-like packed rows "
        "(AKI-4B heads)", 2.5, "×", needs_gpu=True),
    "attention.flex_peak_in_score_tensors": Goal(
        "FlexAttention fwd+bwd peak memory above its inputs, in units of one batch×heads×L² bf16 tensor",
        1.0, "tensors", higher_is_better=False, needs_gpu=True),
    "train_step.pt_mfu": Goal(
        "PT model-FLOPs utilisation, AKI-4B (random init), one H100/H200, bf16", 50.0,
        "% of the GPU's dense bf16 peak (989 TFLOP/s on H100 SXM / H200)",
        needs_gpu=True),
    "train_step.sft_useful_mfu": Goal(
        "SFT MFU on useful (non-pad) tokens, packed batches, AKI-4B", 45.0, "% of the GPU's dense bf16 peak",
        needs_gpu=True),
    "train_step.sft_peak_memory": Goal(
        "peak GPU memory, full SFT step of AKI-4B on one H100", 75.0, "GiB", higher_is_better=False,
        needs_gpu=True),
    "loader.samples_per_core": Goal(
        "loader: MDS → decode 384 JPEG → tensors → pack, per CPU core", 300.0, "samples/s/core"),
    "loader.speedup_vs_webdataset": Goal(
        "loader speed over a plain webdataset loader on the same samples", 1.5, "×"),
    "prep.samples_per_core": Goal(
        "data prep: ≤720p JPEG → 384 → JPEG → tokenize → MDS, per core", 100.0, "samples/s/core"),
    "prep.parallel_efficiency": Goal(
        "data prep scaling: samples/s/core with the most workers over samples/s with one", 0.8, "(1 = linear)"),
}


@dataclasses.dataclass
class Figure:
    """One measured number. ``goal`` is a key of :data:`GOALS`; ``comparable`` is False when the run's
    conditions differ from the goal's (e.g. a tiny model), with the reason in ``note``."""

    name: str
    value: float | None
    unit: str
    goal: str | None = None
    comparable: bool = True
    note: str = ""


@dataclasses.dataclass
class Result:
    """The outcome of one benchmark run."""

    benchmark: str
    command: str
    settings: dict[str, Any]
    figures: list[Figure]
    device: str = "cpu"
    notes: list[str] = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------------------------------------------
# Machine, timing, memory
# ---------------------------------------------------------------------------------------------------

def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine(device: str = "cpu") -> dict[str, Any]:
    """What the figures were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": usable_cores(), "python": platform.python_version(),
                            "torch": torch.__version__, "gpu": None,
                            # other processes competing for the cores when the result was written
                            "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / GIB, 1)
    return info


def machine_summary(info: dict[str, Any]) -> str:
    gpu = f"1× {info['gpu']} ({info['gpu_memory_gib']} GiB)" if info.get("gpu") else "no GPU"
    load = info.get("load_average_1min")
    busy = f", load average {load:g}" if load is not None and load > 0.5 * info["cores"] else ""
    return f"{info['cores']}-core {info['cpu']}, {gpu}{busy}"


def synchronize(device: str) -> None:
    """Wait for queued GPU work (a no-op on CPU). Called only around timed regions, never inside a step."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], device: str, warmup: int, iters: int) -> float:
    """Mean seconds per call of ``fn`` over ``iters`` calls after ``warmup`` calls.

    The device is synchronised once before and once after the timed loop, so asynchronous GPU work is
    counted without adding a host sync per call.
    """
    if iters < 1:
        raise ValueError(f"iters must be ≥ 1, got {iters}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / iters


def gemm_flops(device: str, dtype: torch.dtype, n: int = 1024, seconds: float = 1.0) -> float:
    """FLOP/s of square ``n``×``n`` matmuls on ``device`` now: a yardstick of what the machine delivers."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    iters = 1
    while True:
        t = measure(lambda: a @ b, device, warmup=1, iters=iters)
        if t * iters >= seconds or iters >= 1 << 14:
            return 2 * n ** 3 / t
        iters *= 4


def reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: str) -> float:
    """Peak allocated GPU memory since the last :func:`reset_peak_memory`; on CPU the process's peak RSS."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated(device) / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


# ---------------------------------------------------------------------------------------------------
# Command line and results
# ---------------------------------------------------------------------------------------------------

def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=str(RESULTS_DIR),
                        help="folder for <benchmark>-<cpu|gpu>.json and the README.md table")
    parser.add_argument("--no-write", action="store_true", help="print the figures, write nothing")
    parser.add_argument("--tag", default="", help="suffix of the benchmark's name and result file, to keep "
                                                  "several settings side by side (e.g. --tag L4096)")


def result_name(benchmark: str, args: argparse.Namespace) -> str:
    """``benchmark``, or ``benchmark-TAG`` with ``--tag``."""
    return f"{benchmark}-{args.tag}" if args.tag else benchmark


def command_line(module: str, argv: Sequence[str] | None) -> str:
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", "-m", module, *map(shlex.quote, args)])


def verdict(fig: Figure, device: str) -> str:
    """'yes', 'no', or why the figure cannot be held against its goal."""
    if fig.goal is None:
        return "–"
    goal = GOALS[fig.goal]
    if fig.value is None:
        return "not measured"
    if goal.needs_gpu and not device.startswith("cuda"):
        return "n/a (CPU figure; goal is for H100/H200)"
    if not fig.comparable:
        return "n/a (" + (fig.note or "conditions differ from the goal's") + ")"
    return "yes" if goal.met_by(fig.value) else "no"


def write_result(result: Result, out: str | os.PathLike) -> Path:
    """Store ``result`` as JSON and refresh the README table of ``out``. Returns the JSON path."""
    info = machine(result.device)
    tag = "gpu" if result.device.startswith("cuda") else "cpu"
    record = {
        "benchmark": result.benchmark, "date": datetime.date.today().isoformat(), "command": result.command,
        "device": result.device, "machine": info, "machine_summary": machine_summary(info),
        "settings": result.settings, "notes": result.notes,
        "figures": [{**dataclasses.asdict(f), "goal_text": GOALS[f.goal].describe() if f.goal else None,
                     "met": verdict(f, result.device)} for f in result.figures],
    }
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{result.benchmark}-{tag}.json"
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    (folder / "README.md").write_text(render_readme(folder))
    return path


def load_results(folder: str | os.PathLike) -> list[dict[str, Any]]:
    records = []
    for path in sorted(Path(folder).glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "figures" in data:
            records.append(data)
    return records


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def render_readme(folder: str | os.PathLike) -> str:
    """The markdown summary: every goal with its best comparable figure, then every figure measured."""
    records = load_results(folder)
    lines = ["# Benchmark results", "",
             "Generated by `bench/common.py` from the JSON files in this folder (one per benchmark and "
             "device); re-run a benchmark to refresh it. Figures from a CPU are not the GPU goals: those "
             "rows say so and stay open until measured on an H100/H200.", "",
             "## Goals", "", "| goal | target | figure | machine | met? |", "|---|---|---|---|---|"]
    for key, goal in GOALS.items():
        hits = [(rec, fig) for rec in records for fig in rec["figures"] if fig["goal"] == key]
        decided = [h for h in hits if h[1]["met"] in ("yes", "no")]
        if decided:
            rec, fig = max(decided, key=lambda h: h[1]["value"] if goal.higher_is_better else -h[1]["value"])
            row = f"{_fmt(fig['value'])} {fig['unit']} | {rec['machine_summary']}, {rec['date']} | {fig['met']}"
        elif hits:
            rec, fig = hits[0]
            row = (f"{_fmt(fig['value'])} {fig['unit']} (indicative) | {rec['machine_summary']}, "
                   f"{rec['date']} | {fig['met']}")
        else:
            row = "– | – | not measured"
        if goal.needs_gpu and not decided:
            row = row.rsplit("|", 1)[0] + f"| {NO_GPU}"
        lines.append(f"| {goal.what} | {goal.describe()} | {row} |")
    lines += ["", "GPU figures are taken by `bench/gpu_check.sh` on one H100/H200 in under 10 minutes: "
              "`python -m bench.attention` (FlexAttention vs SDPA, every mode, rows of 2,048 and 4,096 tokens), "
              "`python -m bench.train_step` for `pt-packed` and `sft-packed` at AKI-4B, single process (upper "
              "bound) and `--engine deepspeed` (the trainer's step: the recipe's tuned ZeRO-3, and ZeRO-2 for the "
              "cost of sharding), with peak memory, and its LoRA and QLoRA variants (`--lora`, `--qlora`: trainable "
              "parameters, optimizer and gradient memory); each JSON names the GPU and the command. The CPU benchmarks: "
              "`python -m bench.loader` and `python -m bench.prep`.", ""]
    if not any(rec["device"].startswith("cuda") for rec in records):
        lines += ["No GPU figure yet: every GPU goal above is " + NO_GPU.split(":")[0] + ".", ""]
    lines += ["## All figures", ""]
    for rec in records:
        lines += [f"### `{rec['benchmark']}` on {rec['device']}", "",
                  f"- machine: {rec['machine_summary']} (torch {rec['machine']['torch']})",
                  f"- date: {rec['date']}", f"- command: `{rec['command']}`"]
        lines += [f"- note: {n}" for n in rec.get("notes", [])]
        lines += ["", "| figure | value | unit | goal | met? |", "|---|---|---|---|---|"]
        for fig in rec["figures"]:
            note = f" ({fig['note']})" if fig.get("note") and fig["met"] in ("–", "yes", "no") else ""
            lines.append(f"| {fig['name']}{note} | {_fmt(fig['value'])} | {fig['unit']} | "
                         f"{fig['goal_text'] or '–'} | {fig['met']} |")
        lines.append("")
    return "\n".join(lines)


def report(result: Result, out: str, write: bool = True) -> Path | None:
    """Print the figures and (unless ``write`` is False) store them."""
    print(f"{result.benchmark} ({result.device}): {result.command}")
    for fig in result.figures:
        print(f"  {fig.name:60s} {_fmt(fig.value):>12s} {fig.unit:18s} {verdict(fig, result.device)}")
    for note in result.notes:
        print(f"  note: {note}")
    return write_result(result, out) if write else None
