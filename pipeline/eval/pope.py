"""POPE evaluation: ``python -m pipeline.eval.pope --model EXPORT --data POPE/ --images val2014/ --out DIR``.

Reads ``coco_pope_{random,popular,adversarial}.json`` (JSON Lines) and the COCO val2014 images, asks
each question with the SFT short-answer input (``Answer the question using a single word or phrase.
{question}``) inside the chat template, reads yes/no from the output and reports accuracy, precision,
recall, F1 and yes-ratio per split (:func:`pipeline.eval.metrics.binary_scores`) and their mean over the
splits (``mean``; its F1 is the paper's POPE number). Writes ``predictions.jsonl`` and ``scores.json``
into ``--out``. lmms-eval's ``pope`` tasks ask the same question text with the same post-prompt
(``\nAnswer the question using a single word or phrase.`` after the question, where ours puts the
instruction before it) and count only an answer that is exactly ``yes`` or ``no``.
"""
from __future__ import annotations

import argparse
from typing import Mapping, Sequence

from pipeline.chat import Chat
from pipeline.eval.answers import extract_yes_no
from pipeline.eval.metrics import binary_scores, pope_mean_over_splits
from pipeline.eval.readers import POPE_SPLITS, PopeItem, read_pope
from pipeline.eval.runner import Benchmark, add_run_args, run_cli
from pipeline.templates import task_input


def prompt(item: PopeItem) -> Chat:
    """The short-answer input with an open assistant turn (the model's text layout, one image)."""
    return Chat(((task_input("short_answer", question=item.question), None),))


def score_outputs(items: Sequence[PopeItem], outputs: Mapping[str, str]) -> tuple[list[dict], dict]:
    """Per-question records and ``{split: scores}`` for the splits present."""
    records = []
    for item in items:
        pred = extract_yes_no(outputs[item.key])
        records.append({"split": item.split, "question_id": item.question_id, "question": item.question,
                        "output": outputs[item.key], "prediction": pred, "label": item.label,
                        "correct": pred == item.label})
    scores = {}
    for split in POPE_SPLITS:
        mine = [r for r in records if r["split"] == split]
        if mine:
            scores[split] = binary_scores([r["prediction"] for r in mine], [r["label"] for r in mine]).as_dict()
    return records, {**scores, "mean": pope_mean_over_splits(scores)}


def format_scores(scores: Mapping[str, Mapping]) -> str:
    lines = [f"POPE {'split':<12} {'n':>5} {'acc':>6} {'prec':>6} {'rec':>6} {'f1':>6} {'yes%':>6}"]
    for split, s in scores.items():
        if split == "mean":
            split = "mean/splits"      # the paper's POPE figure is this F1
        lines.append(f"     {split:<12} {s['n']:>5} " + " ".join(
            f"{100 * s[k]:6.1f}" for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")))
    return "\n".join(lines)


BENCHMARK = Benchmark("POPE", prompt, score_outputs, format_scores)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.eval.pope", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder holding coco_pope_{random,popular,adversarial}.json")
    p.add_argument("--images", default=None, help="COCO val2014 image folder (default: --data)")
    p.add_argument("--splits", nargs="+", default=list(POPE_SPLITS), choices=POPE_SPLITS)
    return add_run_args(p)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(BENCHMARK, args, lambda: read_pope(args.data, args.images, tuple(args.splits)))


if __name__ == "__main__":
    from pipeline.process import run_command

    run_command(main)
