"""The paper's Tables 1–2 through lmms-eval: ``python -m pipeline.eval.paper --model EXPORT --out DIR``.

Runs the twelve benchmarks of the paper with the ``aki`` lmms-eval model (:mod:`pipeline.eval.lmms`),
one lmms-eval evaluation (``simple_evaluate``) per task in one process — ``accelerate launch`` of this
command over the GPUs when there are several, each rank its shard — so a task that crashes does not
take the others with it. Each task leaves lmms-eval's own result files (``<date>_results.json`` and
``<date>_samples_<task>.jsonl``) under ``DIR/lmms_eval/<task>/<model>/``. Then one row is printed in the paper's column order beside the
paper's rows for AKI-4B (Table 2) and the MMA model (Table 1), as markdown and JSON
(``DIR/paper_table.md`` / ``.json``):

* MME-P and MME-C are sums of the subtask scores (lmms-eval's ``mme`` metrics); the others in percent;
* POPE is the F1 averaged over the random, popular and adversarial splits (three lmms-eval tasks);
* benchmarks judged by a GPT model (LLaVA-W, MathVista, MM-Vet) run only with an API key
  (``OPENAI_API_KEY``, or ``API_TYPE=azure`` with ``AZURE_API_KEY``) and lmms-eval's own judge settings;
  without one they read "not judged". MMBench without a key uses lmms-eval's static (no-GPT) answer
  extraction, ``mmbench_en_dev_static``, and says so in the cell.

lmms-eval logs a crashed task and still exits 0, so success is judged from the result files: a task
without its metric in a results file is "crashed" and the command exits 1. ``--task DEFAULT=OTHER``
swaps a task for another one (e.g. a copy of its YAML reading local data, found through
``--include-path``); ``--columns`` runs a subset (the rest read "not run").
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import subprocess
import sys
from typing import Mapping, Sequence



@dataclasses.dataclass(frozen=True)
class Column:
    """One column of the paper's table: the lmms-eval tasks and metric it is read from."""

    name: str
    tasks: tuple[str, ...]          # the column is the mean of ``metric`` over these tasks
    metric: str
    scale: float = 1.0              # lmms-eval's value x scale = the paper's unit
    judged: bool = False            # needs a GPT judge
    unjudged_tasks: tuple[str, ...] | None = None   # run instead when there is no judge
    note: str = ""                  # how the figure differs from the paper's, printed with the table


CV_BENCH_NOTE = ("lmms-eval's cv_bench_acc pools the questions; the official 2D score averages ADE20K and COCO "
                 "(python -m pipeline.eval.cv_bench reports the official figures)")

# The paper's column order (Tables 1 and 2).
COLUMNS: tuple[Column, ...] = (
    Column("MMEP", ("mme",), "mme_perception_score"),
    Column("MMEC", ("mme",), "mme_cognition_score"),
    Column("MMB", ("mmbench_en_dev",), "gpt_eval_score", judged=True, unjudged_tasks=("mmbench_en_dev_static",)),
    Column("SEEDI", ("seedbench",), "seed_image", 100.0),
    Column("LLaVAW", ("llava_in_the_wild",), "gpt_eval_llava_all", judged=True),
    Column("MMMU", ("mmmu_val",), "mmmu_acc", 100.0),
    Column("MathVmini", ("mathvista_testmini_format",), "llm_as_judge_eval", judged=True),
    Column("POPE", ("pope_random", "pope_pop", "pope_adv"), "pope_f1_score", 100.0),
    Column("MM-Vet", ("mmvet",), "gpt_eval_score", judged=True),
    Column("RealWorldQA", ("realworldqa",), "exact_match", 100.0),
    Column("CV-Bench2D", ("cv_bench_2d",), "cv_bench_acc", 100.0, note=CV_BENCH_NOTE),
    Column("CV-Bench3D", ("cv_bench_3d",), "cv_bench_acc", 100.0, note=CV_BENCH_NOTE),
)
COLUMN_NAMES = tuple(c.name for c in COLUMNS)

# The paper's rows (aki_model_card.txt / aki_paper.txt, Tables 2 and 1), in COLUMNS order.
PAPER_ROWS: dict[str, tuple[float, ...]] = {
    "AKI-4B (paper, Table 2)": (1491.9, 362.9, 73.1, 69.4, 74.6, 38.7, 32.1, 86.9, 40.8, 58.9, 62.1, 71.8),
    "MMA (paper, Table 1)": (1363.7, 315.4, 71.8, 67.1, 59.6, 37.3, 26.4, 82.7, 30.2, 52.3, 57.8, 64.1),
}

NOT_JUDGED, NOT_RUN, CRASHED = "not judged", "not run", "crashed"
RESULTS_DIR = "lmms_eval"
TABLE_FILE = "paper_table"


def judge_available(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether lmms-eval's GPT judge has a key (its own variables: OPENAI_API_KEY / AZURE_API_KEY)."""
    if environ.get("API_TYPE", "openai") == "azure":
        return bool(environ.get("AZURE_API_KEY"))
    return bool(environ.get("OPENAI_API_KEY"))


@dataclasses.dataclass
class Plan:
    """What to run for each selected column, and the status of the columns that are not run."""

    tasks: dict[str, tuple[str, ...]]      # column -> lmms-eval tasks (after --task overrides)
    status: dict[str, str]                 # column -> NOT_JUDGED / NOT_RUN for columns not run
    notes: dict[str, str]

    @property
    def all_tasks(self) -> list[str]:
        return list(dict.fromkeys(t for tasks in self.tasks.values() for t in tasks))


def plan(columns: Sequence[str], overrides: Mapping[str, str], judged: bool) -> Plan:
    """Tasks per column: the GPT-judged ones only with a judge, ``overrides`` swapping task names."""
    unknown = sorted(set(columns) - set(COLUMN_NAMES))
    if unknown:
        raise ValueError(f"unknown column(s) {unknown}; the paper's columns are {', '.join(COLUMN_NAMES)}")
    known_tasks = {t for c in COLUMNS for t in c.tasks + (c.unjudged_tasks or ())}
    stray = sorted(set(overrides) - known_tasks)
    if stray:
        raise ValueError(f"--task overrides {stray} name no task of the table; its tasks are "
                         f"{', '.join(sorted(known_tasks))}")
    result = Plan({}, {}, {})
    for col in COLUMNS:
        if col.judged and not judged and col.unjudged_tasks is None:
            result.status[col.name] = NOT_JUDGED          # cannot be scored, selected or not
            continue
        if col.name not in columns:
            result.status[col.name] = NOT_RUN
            continue
        tasks = col.tasks
        if col.judged and not judged:
            tasks = col.unjudged_tasks
            result.notes[col.name] = f"no GPT judge: {', '.join(tasks)} (static answer extraction)"
        result.tasks[col.name] = tuple(overrides.get(t, t) for t in tasks)
        if col.note:
            result.notes[col.name] = "; ".join(filter(None, (result.notes.get(col.name), col.note)))
    return result


def run_tasks(tasks: Sequence[str], model_args: str, out: str, include_path: str | None, limit: int | None,
              batch_size: int) -> None:
    """One lmms-eval evaluation per task (its evaluator, task definitions and result writer), the task
    index built once; a task that raises is logged and the next one runs. Each rank runs this (lmms-eval
    gives every rank its shard); rank 0 writes ``OUT/lmms_eval/<task>/<model>/<date>_results.json`` and
    the samples. The tasks run inside ``out``: files lmms-eval writes to the working directory (MMBench's
    ``submissions/`` for the official server) land there, not wherever the command was started."""
    import contextlib
    import traceback

    from lmms_eval import evaluator
    from lmms_eval.loggers import EvaluationTracker
    from lmms_eval.tasks import TaskManager
    from lmms_eval.utils import get_datetime_str

    include_path = os.path.abspath(include_path) if include_path else None
    task_manager = TaskManager("INFO", include_path=include_path, model_name="aki")
    for task in tasks:
        tracker = EvaluationTracker(output_path=os.path.join(out, RESULTS_DIR, task))
        stamp = get_datetime_str()
        try:
            with contextlib.chdir(out):
                results = evaluator.simple_evaluate(
                    model="aki", model_args=model_args, tasks=[task], batch_size=batch_size, limit=limit,
                    log_samples=True, evaluation_tracker=tracker, task_manager=task_manager, datetime_str=stamp)
        except Exception:       # noqa: BLE001 — one broken task must not stop the table
            traceback.print_exc()
            print(f"lmms-eval task {task} crashed (traceback above)", file=sys.stderr)
            continue
        if results is not None:                 # rank 0
            samples = results.pop("samples")
            tracker.save_results_aggregated(results=results, samples=samples, datetime_str=stamp)
            for name in results["configs"]:
                tracker.save_results_samples(task_name=name, samples=samples[name])


def read_task_metrics(out: str, task: str) -> dict | None:
    """The newest lmms-eval results file's metrics for ``task`` (``None`` when there is none)."""
    files = sorted(glob.glob(os.path.join(out, RESULTS_DIR, task, "*", "*_results.json")), key=os.path.getmtime)
    for path in reversed(files):
        with open(path) as f:
            results = json.load(f).get("results", {})
        if task in results:
            return {k.split(",")[0]: v for k, v in results[task].items() if k != "alias"}
    return None


def column_values(plan_: Plan, metrics: Mapping[str, dict | None]) -> tuple[dict, dict]:
    """(column -> value in the paper's unit or None, column -> status) from each task's metrics."""
    values: dict[str, float | None] = {}
    status = dict(plan_.status)
    by_name = {c.name: c for c in COLUMNS}
    for name, tasks in plan_.tasks.items():
        col = by_name[name]
        found = [(metrics.get(t) or {}).get(col.metric) for t in tasks]
        if any(not isinstance(v, (int, float)) for v in found):
            status[name] = CRASHED
            values[name] = None
            continue
        values[name] = col.scale * sum(found) / len(found)
        status[name] = "ok"
    for name in status:
        values.setdefault(name, None)
    return values, status


def _cell(value: float | None, status: str) -> str:
    return f"{value:.1f}" if value is not None else status


def markdown_table(label: str, values: Mapping[str, float | None], status: Mapping[str, str]) -> str:
    """The paper's rows and ours, one column per benchmark in the paper's order."""
    lines = ["| model | " + " | ".join(COLUMN_NAMES) + " |", "|---" * (len(COLUMN_NAMES) + 1) + "|"]
    for name, row in PAPER_ROWS.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in row) + " |")
    lines.append(f"| {label} | " + " | ".join(_cell(values[c], status[c]) for c in COLUMN_NAMES) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.eval.paper", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported model folder (AKIModel.save_pretrained)")
    p.add_argument("--out", required=True, help="output folder (lmms-eval results, paper_table.md/.json)")
    p.add_argument("--model-args", default="", help="more aki model arguments, e.g. max_new_tokens=512")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch on each rank")
    p.add_argument("--columns", nargs="+", default=list(COLUMN_NAMES), metavar="COLUMN",
                   help=f"columns to run (default: all of {' '.join(COLUMN_NAMES)})")
    p.add_argument("--task", action="append", default=[], metavar="DEFAULT=OTHER",
                   help="run lmms-eval task OTHER in place of DEFAULT (repeatable)")
    p.add_argument("--include-path", default=None, help="folder of extra lmms-eval task YAMLs")
    p.add_argument("--limit", type=int, default=None, help="lmms-eval --limit (testing only)")
    p.add_argument("--num-processes", type=int, default=None,
                   help="ranks (accelerate launch; default: the visible GPUs, 1 without GPUs)")
    p.add_argument("--label", default=None, help="name of our row (default: the model folder)")
    return p


def _overrides(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        default, sep, other = pair.partition("=")
        if not sep or not default or not other:
            raise SystemExit(f"--task {pair!r}: expected DEFAULT=OTHER, e.g. --task mme=mme_local")
        out[default] = other
    return out


def _visible_gpus() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        todo = plan(args.columns, _overrides(args.task), judge_available())
    except ValueError as err:
        raise SystemExit(f"pipeline.eval.paper: {err}") from None
    nproc = args.num_processes or max(_visible_gpus(), 1)
    if nproc > 1 and "WORLD_SIZE" not in os.environ:      # start the ranks: accelerate launch of this command
        return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(nproc),
                               "-m", "pipeline.eval.paper", *(argv if argv is not None else sys.argv[1:])]).returncode
    os.makedirs(args.out, exist_ok=True)
    model_args = f"pretrained={os.path.abspath(args.model)}" + (f",{args.model_args}" if args.model_args else "")
    run_tasks(todo.all_tasks, model_args, os.path.abspath(args.out), args.include_path, args.limit,
              args.batch_size)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    metrics = {t: read_task_metrics(args.out, t) for t in todo.all_tasks}
    values, status = column_values(todo, metrics)
    label = args.label or os.path.basename(os.path.normpath(args.model))
    table = markdown_table(label, values, status)
    crashed = sorted(t for t, m in metrics.items() if m is None)
    summary = {"columns": list(COLUMN_NAMES), "model": os.path.abspath(args.model),
               "rows": {**{k: dict(zip(COLUMN_NAMES, v)) for k, v in PAPER_ROWS.items()}, label: values},
               "status": status, "tasks": {c: list(t) for c, t in todo.tasks.items()}, "notes": todo.notes,
               "crashed_tasks": crashed}
    with open(os.path.join(args.out, TABLE_FILE + ".md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, TABLE_FILE + ".json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(table)
    for name, note in todo.notes.items():
        print(f"{name}: {note}")
    print(json.dumps(summary))
    if crashed:
        print(f"tasks without results (crashed; see the log above): {', '.join(crashed)}",
              file=sys.stderr)
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
