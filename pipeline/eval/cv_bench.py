"""CV-Bench evaluation: ``python -m pipeline.eval.cv_bench --model EXPORT --data CV-Bench/ --out DIR``.

Reads the released ``test_2d.jsonl`` / ``test_3d.jsonl`` + ``img/`` (see :mod:`pipeline.eval.readers`),
asks each question with AKI's prompt — the chat template around the SFT multiple-choice input::

    Answer with the option's letter from the given choices directly. {question}
    Options:
    A. c1
    B. c2
    …

— generates greedily in batches (sharded over ``torchrun`` ranks), extracts the option letter
(:mod:`pipeline.eval.answers`) and scores as the benchmark defines it (:mod:`pipeline.eval.metrics`).
Writes ``predictions.jsonl`` (one line per question) and ``scores.json`` into ``--out``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Mapping, Sequence

from data_prep.sft.common import SftOptions, lettered_options, task_input
from pipeline.chat import Chat
from pipeline.eval.answers import LETTERS, extract_choice
from pipeline.eval.metrics import cv_bench_scores
from pipeline.eval.readers import CVBenchItem, read_cv_bench
from pipeline.eval.runner import Benchmark, add_run_args, run_cli


def question_input(item: CVBenchItem) -> str:
    """The user input: SFT's multiple-choice input with the options lettered in their stored order."""
    options, _ = lettered_options(item.choices, LETTERS.index(item.answer), SftOptions(), item.key)
    return task_input("multiple_choice", question=item.question, options=options)


def prompt(item: CVBenchItem) -> Chat:
    """The question with an open assistant turn (laid out in the model's text layout, one image)."""
    return Chat(((question_input(item), None),))


def score_outputs(items: Sequence[CVBenchItem], outputs: Mapping[str, str]) -> tuple[list[dict], dict]:
    """Per-question prediction records and the benchmark scores."""
    records = []
    for item in items:
        raw = outputs[item.key]
        letter = extract_choice(raw, item.choices)
        records.append({"idx": item.idx, "type": item.type, "source": item.source, "task": item.task,
                        "prompt": question_input(item), "output": raw, "letter": letter,
                        "answer": item.answer, "correct": letter == item.answer})
    return records, cv_bench_scores(records)


def format_scores(scores: Mapping, title: str = "CV-Bench") -> str:
    """A small text table of the scores."""
    def pct(v):
        return "  n/a" if v is None else f"{100 * v:5.1f}"
    lines = [f"{title}: {scores['n']} questions ({scores['unanswered']} without a recognisable option)"]
    for src, acc in scores["per_source"].items():
        lines.append(f"  {src:<10} {pct(acc)}  (n={scores['counts'][src]})")
    for task, acc in scores["per_task"].items():
        lines.append(f"  task {task:<9} {pct(acc)}")
    lines.append(f"  2D {pct(scores['2D'])}   3D {pct(scores['3D'])}   overall {pct(scores['overall'])}")
    return "\n".join(lines)


BENCHMARK = Benchmark("CV-Bench", prompt, score_outputs, format_scores)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.eval.cv_bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True,
                   help="CV-Bench folder (test_2d.jsonl, test_3d.jsonl, img/) or one .jsonl/.parquet file")
    return add_run_args(p)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(BENCHMARK, args, lambda: read_cv_bench(args.data))


if __name__ == "__main__":
    sys.exit(main())
