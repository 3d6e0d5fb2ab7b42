"""Benchmark scores from per-sample results: CV-Bench accuracies and POPE's yes/no metrics.

CV-Bench (as its official evaluation and AKI's ``eval_cv_bench/eval.py`` define it)::

    acc(source)  = correct / total over the questions of one source (ADE20K, COCO, Omni3D)
    2D           = (acc(ADE20K) + acc(COCO)) / 2
    3D           = acc(Omni3D)
    overall      = (2D + 3D) / 2

A source with no questions is left out of the means (and 2D or 3D is ``None`` when none of its
sources is present), so a subset still gets the scores it can support.

CV-Bench is scored twice (:func:`cv_bench_strict_and_lenient`): *strict* counts an answer only when the
output is exactly the option letter (the official script's exact match), *lenient* reads the letter
with :func:`pipeline.eval.answers.extract_choice` (patterns, then option texts).

POPE: "yes" is the positive class; an answer that is neither yes nor no counts as wrong and as a
non-"yes" prediction (it lowers recall when the label is yes). The paper reports the F1 averaged over
the three splits (:func:`pope_mean_over_splits`).
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


def cv_bench_strict_and_lenient(results: Sequence[Mapping]) -> dict:
    """Lenient scores (records' ``correct``, at the top level) plus ``strict`` ones (records'
    ``strict_correct``), each as :func:`cv_bench_scores` gives them."""
    strict = cv_bench_scores([{**r, "correct": r["strict_correct"], "letter": r["strict_letter"]} for r in results])
    return {**cv_bench_scores(results), "scoring": "lenient (letter extraction)",
            "strict": {**strict, "scoring": "strict (exact letter, official script)"}}


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


POPE_AVERAGED = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def pope_mean_over_splits(per_split: Mapping[str, Mapping]) -> dict:
    """Each metric averaged over the splits (the paper's POPE number is the mean F1), with the splits."""
    if not per_split:
        raise ValueError("no POPE split to average")
    return {**{k: sum(s[k] for s in per_split.values()) / len(per_split) for k in POPE_AVERAGED},
            "n": sum(s["n"] for s in per_split.values()), "splits": list(per_split)}


__all__ = ["CV_BENCH_SOURCES", "BinaryScores", "accuracy", "binary_scores", "cv_bench_scores",
           "cv_bench_strict_and_lenient", "pope_mean_over_splits"]
