"""CV-Bench evaluation: ``python -m pipeline.eval.cv_bench --model EXPORT --data CV-Bench/ --out DIR``.

Reads the released ``test_2d.jsonl`` / ``test_3d.jsonl`` + ``img/`` (see :mod:`pipeline.eval.readers`),
asks each question with AKI's prompt — the chat template around the SFT multiple-choice input::

    Answer with the option's letter from the given choices directly. {question}
    Options:
    A. c1
    B. c2
    …

— generates greedily in batches (sharded over ``torchrun`` ranks) and scores as the benchmark defines it
(:mod:`pipeline.eval.metrics`) twice, labelled: *strict*, the official script's exact letter match (the
output is the letter and nothing else), and *lenient*, the letter read by :mod:`pipeline.eval.answers`
(patterns, then option texts). lmms-eval's ``cv_bench`` task asks differently: ``Note: You only need to
respond with A, B, C, or D without providing any additional information.`` + the dataset's ``prompt``
field, no chat template of ours, and it reads the first letter of the output.
Writes ``predictions.jsonl`` (one line per question) and ``scores.json`` into ``--out``.
"""
from __future__ import annotations

import argparse
from typing import Mapping, Sequence

from pipeline.chat import Chat
from pipeline.eval.answers import extract_choice, strict_letter
from pipeline.eval.metrics import cv_bench_strict_and_lenient
from pipeline.eval.readers import CVBenchItem, read_cv_bench
from pipeline.eval.runner import Benchmark, add_run_args, run_cli
from pipeline.templates import format_options, task_input


def question_input(item: CVBenchItem) -> str:
    """The user input: SFT's multiple-choice input with the options lettered in their stored order."""
    return task_input("multiple_choice", question=item.question, options=format_options(item.choices))


def prompt(item: CVBenchItem) -> Chat:
    """The question with an open assistant turn (laid out in the model's text layout, one image)."""
    return Chat(((question_input(item), None),))


def score_outputs(items: Sequence[CVBenchItem], outputs: Mapping[str, str]) -> tuple[list[dict], dict]:
    """Per-question prediction records and the benchmark scores."""
    records = []
    for item in items:
        raw = outputs[item.key]
        letter, strict = extract_choice(raw, item.choices), strict_letter(raw, item.choices)
        records.append({"idx": item.idx, "type": item.type, "source": item.source, "task": item.task,
                        "prompt": question_input(item), "output": raw, "letter": letter,
                        "answer": item.answer, "correct": letter == item.answer,
                        "strict_letter": strict, "strict_correct": strict == item.answer})
    return records, cv_bench_strict_and_lenient(records)


def format_scores(scores: Mapping, title: str = "CV-Bench") -> str:
    """A small text table of the scores."""
    def pct(v):
        return "  n/a" if v is None else f"{100 * v:5.1f}"
    lines = [f"{title}: {scores['n']} questions ({scores['unanswered']} without a recognisable option)"]
    for src, acc in scores["per_source"].items():
        lines.append(f"  {src:<10} {pct(acc)}  (n={scores['counts'][src]})")
    for task, acc in scores["per_task"].items():
        lines.append(f"  task {task:<9} {pct(acc)}")
    for s in (scores["strict"], scores) if "strict" in scores else (scores,):
        lines.append(f"  2D {pct(s['2D'])}   3D {pct(s['3D'])}   overall {pct(s['overall'])}   "
                     f"[{s.get('scoring', 'lenient')}]")
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
    from pipeline.process import run_command

    run_command(main)
