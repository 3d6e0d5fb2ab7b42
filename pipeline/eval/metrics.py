"""Benchmark scores from per-sample results: CV-Bench accuracies and POPE's yes/no metrics.

CV-Bench (as its official evaluation and AKI's ``eval_cv_bench/eval.py`` define it)::

    acc(source)  = correct / total over the questions of one source (ADE20K, COCO, Omni3D)
    2D           = (acc(ADE20K) + acc(COCO)) / 2
    3D           = acc(Omni3D)
    overall      = (2D + 3D) / 2

A source with no questions is left out of the means (and 2D or 3D is ``None`` when none of its
sources is present), so a subset still gets the scores it can support.

POPE: "yes" is the positive class; an answer that is neither yes nor no counts as wrong and as a
non-"yes" prediction (it lowers recall when the label is yes).
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Iterable, Mapping, Sequence

CV_BENCH_SOURCES = {"ADE20K": "2D", "COCO": "2D", "Omni3D": "3D"}


def accuracy(correct: Sequence[bool]) -> float:
    """Share of True values (0.0 for an empty sequence)."""
    return sum(bool(c) for c in correct) / len(correct) if correct else 0.0


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def cv_bench_scores(results: Iterable[Mapping]) -> dict:
    """CV-Bench scores from records with ``source``, ``task`` and ``correct`` keys.

    Returns ``{"per_source": {src: acc}, "per_task": {task: acc}, "counts": {src: n},
    "2D": acc, "3D": acc, "overall": acc, "accuracy": pooled acc, "n": total, "unanswered": k}``
    ("accuracy" pools all questions, unlike the benchmark's "overall"; k = records whose output had no
    recognisable option, recorded as ``letter`` None).
    """
    by_source: dict[str, list[bool]] = defaultdict(list)
    by_task: dict[str, list[bool]] = defaultdict(list)
    unanswered = n = correct = 0
    for r in results:
        source = r["source"]
        if source not in CV_BENCH_SOURCES:
            raise ValueError(f"CV-Bench record {r.get('idx')!r} has source {source!r}; "
                             f"expected one of {sorted(CV_BENCH_SOURCES)}")
        by_source[source].append(bool(r["correct"]))
        by_task[str(r.get("task", "?"))].append(bool(r["correct"]))
        unanswered += r.get("letter", "") is None
        correct += bool(r["correct"])
        n += 1
    per_source = {s: accuracy(v) for s, v in sorted(by_source.items())}
    dims = {dim: _mean(per_source.get(s) for s, d in CV_BENCH_SOURCES.items() if d == dim)
            for dim in ("2D", "3D")}
    return {
        "per_source": per_source,
        "per_task": {t: accuracy(v) for t, v in sorted(by_task.items())},
        "counts": {s: len(v) for s, v in sorted(by_source.items())},
        **dims,
        "overall": _mean(dims.values()),
        "accuracy": correct / n if n else 0.0,
        "n": n,
        "unanswered": unanswered,
    }


@dataclasses.dataclass(frozen=True)
class BinaryScores:
    """POPE's metrics for one split ("yes" = positive)."""

    n: int
    accuracy: float
    precision: float
    recall: float
    f1: float
    yes_ratio: float
    unanswered: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def binary_scores(predictions: Sequence[str | None], labels: Sequence[str]) -> BinaryScores:
    """Accuracy, precision, recall, F1 and yes-ratio of yes/no ``predictions`` against ``labels``."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    bad = sorted({lab for lab in labels if lab not in ("yes", "no")})
    if bad:
        raise ValueError(f"labels must be 'yes' or 'no', found {bad}")
    tp = sum(p == "yes" and y == "yes" for p, y in zip(predictions, labels))
    fp = sum(p == "yes" and y == "no" for p, y in zip(predictions, labels))
    tn = sum(p == "no" and y == "no" for p, y in zip(predictions, labels))
    fn = sum(p != "yes" and y == "yes" for p, y in zip(predictions, labels))
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return BinaryScores(n=n, accuracy=(tp + tn) / n if n else 0.0, precision=precision, recall=recall,
                        f1=f1, yes_ratio=(tp + fp) / n if n else 0.0,
                        unanswered=sum(p is None for p in predictions))


__all__ = ["CV_BENCH_SOURCES", "BinaryScores", "accuracy", "binary_scores", "cv_bench_scores"]
