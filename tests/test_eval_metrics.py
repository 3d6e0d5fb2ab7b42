"""CV-Bench and POPE scores against values computed by hand."""
from __future__ import annotations

import pytest

from pipeline.eval.metrics import binary_scores, cv_bench_scores


def _records(source, task, n_correct, n_wrong, unanswered=0):
    out = [{"source": source, "task": task, "correct": True, "letter": "A"} for _ in range(n_correct)]
    out += [{"source": source, "task": task, "correct": False, "letter": "B"} for _ in range(n_wrong)]
    out += [{"source": source, "task": task, "correct": False, "letter": None} for _ in range(unanswered)]
    return out


def test_cv_bench_scores_follow_the_benchmark_definition():
    # ADE20K 3/4 = 0.75, COCO 1/2 = 0.5, Omni3D 2/5 = 0.4 (one of the wrong ones unanswered)
    records = (_records("ADE20K", "Count", 2, 1) + _records("ADE20K", "Relation", 1, 0)
               + _records("COCO", "Count", 1, 1) + _records("Omni3D", "Depth", 2, 2, unanswered=1))
    s = cv_bench_scores(records)
    assert s["per_source"] == {"ADE20K": 0.75, "COCO": 0.5, "Omni3D": 0.4}
    assert s["2D"] == pytest.approx(0.625)            # (0.75 + 0.5) / 2, not 4/6 pooled
    assert s["3D"] == pytest.approx(0.4)
    assert s["overall"] == pytest.approx(0.5125)      # (0.625 + 0.4) / 2
    assert s["accuracy"] == pytest.approx(6 / 11)     # pooled over all questions
    assert s["per_task"] == {"Count": pytest.approx(3 / 5), "Depth": 0.4, "Relation": 1.0}
    assert s["counts"] == {"ADE20K": 4, "COCO": 2, "Omni3D": 5}
    assert s["n"] == 11 and s["unanswered"] == 1


def test_cv_bench_subset_without_3d_reports_2d_only():
    s = cv_bench_scores(_records("COCO", "Count", 1, 3))
    assert s["2D"] == 0.25 and s["3D"] is None and s["overall"] == 0.25


def test_cv_bench_unknown_source_is_refused():
    with pytest.raises(ValueError, match="source 'KITTI'"):
        cv_bench_scores([{"source": "KITTI", "task": "Depth", "correct": True, "idx": 7}])


def test_pope_binary_scores_by_hand():
    labels = ["yes", "yes", "yes", "yes", "no", "no", "no", "no", "no", "no"]
    preds = ["yes", "yes", "yes", "no", "yes", "no", "no", "no", None, "no"]
    # TP=3 FN=1 FP=1 TN=4, one unanswered "no" label (wrong, not a yes)
    s = binary_scores(preds, labels)
    assert s.n == 10
    assert s.accuracy == pytest.approx(0.7)
    assert s.precision == pytest.approx(0.75)
    assert s.recall == pytest.approx(0.75)
    assert s.f1 == pytest.approx(0.75)
    assert s.yes_ratio == pytest.approx(0.4)
    assert s.unanswered == 1


def test_pope_unanswered_yes_label_lowers_recall():
    s = binary_scores(["yes", None, "no"], ["yes", "yes", "no"])
    assert s.recall == pytest.approx(0.5) and s.precision == 1.0
    assert s.f1 == pytest.approx(2 / 3) and s.accuracy == pytest.approx(2 / 3)


def test_pope_all_no_predictions_have_zero_precision_not_a_crash():
    s = binary_scores(["no", "no"], ["yes", "no"])
    assert (s.precision, s.recall, s.f1, s.accuracy, s.yes_ratio) == (0.0, 0.0, 0.0, 0.5, 0.0)


def test_pope_bad_labels_are_refused():
    with pytest.raises(ValueError, match="'maybe'"):
        binary_scores(["yes"], ["maybe"])
