"""Summaries of finished runs: the results table, ``report.md`` and the loss-curve PNG.

Inputs are what the CLIs leave on disk: each training run's ``metrics.jsonl`` (one record per step,
events mixed in, the evaluations while training among them) and each evaluation's ``scores.json`` /
``predictions.jsonl`` (:mod:`pipeline.eval.cv_bench`).
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Sequence


def read_loss_curve(metrics_path: str) -> tuple[list[int], list[float]]:
    """(steps, losses) of the step records in a ``metrics.jsonl`` (events and skipped steps left out)."""
    steps, losses = [], []
    if not os.path.exists(metrics_path):
        return steps, losses
    with open(metrics_path) as f:
        for line in f:
            rec = json.loads(line)
            if "event" in rec or rec.get("skipped") or rec.get("loss") is None or "step" not in rec:
                continue
            steps.append(int(rec["step"]))
            losses.append(float(rec["loss"]))
    return steps, losses


def read_eval_curves(metrics_path: str) -> dict[str, tuple[list[int], list[float]]]:
    """``{metric: (steps, values)}`` of the ``eval`` events in a ``metrics.jsonl`` (pipeline.train_eval):
    ``heldout/<source>``, ``heldout/overall`` and the benchmark's scores."""
    curves: dict[str, tuple[list[int], list[float]]] = {}
    if not os.path.exists(metrics_path):
        return curves
    with open(metrics_path) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("event") != "eval":
                continue
            for key, value in rec.items():
                if "/" in key and isinstance(value, (int, float)):
                    steps, values = curves.setdefault(key, ([], []))
                    steps.append(int(rec["step"]))
                    values.append(float(value))
    return curves


def plot_eval_curves(runs: Mapping[str, Mapping[str, tuple[list[int], list[float]]]], path: str,
                     benchmark: str = "cv_bench/overall", chance: float | None = None) -> str:
    """Evaluation while training, one panel each: the held-out loss per source of every run (one colour per
    source, one line style per run) and the benchmark's accuracy of every run against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = ["-", "--", ":", "-."]
    sources = sorted({k.split("/", 1)[1] for curves in runs.values() for k in curves
                      if k.startswith("heldout/") and k != "heldout/overall"})
    colours = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(sources)}
    fig, (loss_ax, bench_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for style, (run, curves) in zip(styles * 4, runs.items()):
        for source in sources:
            if f"heldout/{source}" in curves:
                loss_ax.plot(*curves[f"heldout/{source}"], style, color=colours[source],
                             label=f"{source} ({run})")
        if benchmark in curves:
            steps, values = curves[benchmark]
            bench_ax.plot(steps, [100 * v for v in values], style, marker="o", label=run)
    if chance is not None:
        bench_ax.axhline(100 * chance, color="grey", lw=1, label="chance")
    loss_ax.set(title="held-out loss per source", xlabel="optimizer step", ylabel="loss (mean over target tokens)")
    bench_ax.set(title=f"{benchmark} while training", xlabel="optimizer step", ylabel=f"{benchmark} (%)")
    for ax in (loss_ax, bench_ax):
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7, ncol=2 if ax is loss_ax else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def chance_accuracy(predictions: Sequence[Mapping], choices_per_key: Mapping[str, int]) -> float:
    """Expected accuracy of uniform guessing: the mean of 1 / (number of options) over the questions."""
    if not predictions:
        return 0.0
    return sum(1.0 / choices_per_key[f"{p['type']}/{p['idx']}"] for p in predictions) / len(predictions)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def results_table(rows: Mapping[str, Mapping], chance: float) -> str:
    """Markdown table: one row per model (``scores`` dict of :func:`pipeline.eval.metrics.cv_bench_scores`
    plus ``final_loss``)."""
    tasks = sorted({t for r in rows.values() for t in r["scores"]["per_task"]})
    head = ["model", "overall", "2D", "3D", *tasks, "answered", "final SFT loss"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        s = r["scores"]
        answered = f"{s['n'] - s['unanswered']}/{s['n']}"
        loss = "n/a" if r.get("final_loss") is None else f"{r['final_loss']:.3f}"
        cells = [name, _pct(s["overall"]), _pct(s["2D"]), _pct(s["3D"]),
                 *(_pct(s["per_task"].get(t)) for t in tasks), answered, loss]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| chance | " + " | ".join([f"{100 * chance:.1f}"] + [""] * (len(head) - 2)) + " |")
    return "\n".join(lines)


def plot_loss_curves(curves: Mapping[str, tuple[list[int], list[float]]], path: str) -> str:
    """One panel per stage (PT, SFT): loss against optimizer step. Written with matplotlib's Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = {"pretraining": {k: v for k, v in curves.items() if k.startswith("pt")},
              "finetuning": {k: v for k, v in curves.items() if not k.startswith("pt")}}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (title, group) in zip(axes, stages.items()):
        for name, (steps, losses) in group.items():
            ax.plot(steps, losses, label=name)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (mean over target tokens)")
        ax.grid(alpha=0.3)
        if group:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(path: str, title: str, table: str, timings: Mapping[str, float], settings: Mapping,
                 notes: Sequence[str] = (), figures: Sequence[tuple[str, str]] = ()) -> str:
    """``report.md``: the results table with its notes, the loss curves and ``figures`` ((caption, path
    relative to the report) each), what was run, and how long each step took."""
    total = sum(timings.values())
    lines = [f"# {title}", "", "## Results (synthetic CV-Bench-style evaluation)", "", table, "",
             *[line for note in notes for line in (note, "")], "![loss curves](loss_curves.png)", "",
             *[line for caption, figure in figures for line in (f"![{caption}]({figure})", "")], "## Steps", "",
             "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    lines += [f"| **total** | **{total:.1f}** |", "", "## Settings", "", "```json",
              json.dumps(settings, indent=2), "```", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


__all__ = ["chance_accuracy", "plot_eval_curves", "plot_loss_curves", "read_eval_curves", "read_loss_curve",
           "results_table", "write_report"]
