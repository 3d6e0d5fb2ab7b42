"""POPE evaluation: ``python -m pipeline.eval.pope --model EXPORT --data POPE/ --images val2014/ --out DIR``.

Reads ``coco_pope_{random,popular,adversarial}.json`` (JSON Lines) and the COCO val2014 images, asks
each question with the SFT short-answer input (``Answer the question using a single word or phrase.
{question}``) inside the chat template, reads yes/no from the output and reports accuracy, precision,
recall, F1 and yes-ratio per split (:func:`pipeline.eval.metrics.binary_scores`). Writes
``predictions.jsonl`` and ``scores.json`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Mapping, Sequence

from data_prep.sft.common import task_input
from pipeline.chat import Segment, chat_segments
from pipeline.eval.answers import extract_yes_no
from pipeline.eval.metrics import binary_scores
from pipeline.eval.readers import POPE_SPLITS, PopeItem, read_pope
from pipeline.eval.runner import DistContext, Request, generate_all, init_distributed

PREDICTIONS_FILE = "predictions.jsonl"
SCORES_FILE = "scores.json"


def prompt_segments(item: PopeItem) -> list[Segment]:
    """Chat template with one image and the short-answer input."""
    return chat_segments([(task_input("short_answer", question=item.question), None)], num_images=1)


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
    return records, scores


def format_scores(scores: Mapping[str, Mapping]) -> str:
    lines = [f"POPE {'split':<12} {'n':>5} {'acc':>6} {'prec':>6} {'rec':>6} {'f1':>6} {'yes%':>6}"]
    for split, s in scores.items():
        lines.append(f"     {split:<12} {s['n']:>5} " + " ".join(
            f"{100 * s[k]:6.1f}" for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")))
    return "\n".join(lines)


def evaluate(model, tokenizer, items: Sequence[PopeItem], ctx: DistContext = DistContext(),
             batch_size: int = 8, max_new_tokens: int = 8) -> tuple[list[dict], dict] | None:
    """Generate and score; returns (records, scores) on rank 0, None elsewhere."""
    requests = [Request(i.key, prompt_segments(i), [i.load_image()]) for i in items]
    outputs = generate_all(model, tokenizer, requests, ctx, batch_size=batch_size,
                           max_new_tokens=max_new_tokens, desc="POPE")
    return score_outputs(items, outputs) if ctx.is_main else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.eval.pope", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="exported model folder (AKIModel.save_pretrained)")
    p.add_argument("--data", required=True, help="folder holding coco_pope_{random,popular,adversarial}.json")
    p.add_argument("--images", default=None, help="COCO val2014 image folder (default: --data)")
    p.add_argument("--splits", nargs="+", default=list(POPE_SPLITS), choices=POPE_SPLITS)
    p.add_argument("--out", required=True, help="output folder for predictions.jsonl and scores.json")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N questions")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.eval.runner import load_model

    ctx = init_distributed(args.device)
    items, report = read_pope(args.data, args.images, tuple(args.splits))
    if ctx.is_main:
        print(report.summary(f"POPE {args.data}"), file=sys.stderr)
    items = items[:args.limit] if args.limit else items
    model, tokenizer = load_model(args.model, ctx.device)
    result = evaluate(model, tokenizer, items, ctx, args.batch_size, args.max_new_tokens)
    if result is not None:
        records, scores = result
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, PREDICTIONS_FILE), "w") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with open(os.path.join(args.out, SCORES_FILE), "w") as f:
            json.dump({**scores, "skipped": dict(report.skipped)}, f, indent=2)
        print(format_scores(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
