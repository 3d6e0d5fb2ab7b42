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


def test_pope_mean_f1_over_splits_from_a_prediction_file_by_hand():
    from pipeline.eval import pope
    from pipeline.eval.readers import PopeItem

    # (split, label, model output): random TP TP FP TN -> P 2/3 R 1 F1 0.8; popular TP FN TN TN -> P 1
    # R 1/2 F1 2/3; adversarial FP FP TP "maybe"(label yes: FN) -> P 1/3 R 1/2 F1 0.4.
    rows = [("random", "yes", "Yes."), ("random", "yes", "yes"), ("random", "no", "Yes, there is"),
            ("random", "no", "No"), ("popular", "yes", "yes"), ("popular", "yes", "no"),
            ("popular", "no", "There is no cat."), ("popular", "no", "no"), ("adversarial", "no", "yes"),
            ("adversarial", "no", "yes"), ("adversarial", "yes", "yes"), ("adversarial", "yes", "maybe")]
    items = [PopeItem(split, i, "Is there a cat in the image?", label, "x.jpg")
             for i, (split, label, _) in enumerate(rows)]
    _, scores = pope.score_outputs(items, {it.key: out for it, (_, _, out) in zip(items, rows)})
    assert scores["random"]["f1"] == pytest.approx(0.8)
    assert scores["popular"]["f1"] == pytest.approx(2 / 3)
    assert scores["adversarial"]["f1"] == pytest.approx(0.4)
    assert scores["mean"]["f1"] == pytest.approx((0.8 + 2 / 3 + 0.4) / 3)      # the paper's POPE figure
    assert scores["mean"]["accuracy"] == pytest.approx((3 / 4 + 3 / 4 + 1 / 4) / 3)
    assert scores["mean"]["n"] == 12


def test_cv_bench_strict_counts_only_a_bare_letter_lenient_reads_more():
    from pipeline.eval import cv_bench
    from pipeline.eval.readers import CVBenchItem

    # (source, answer, output, strict correct, lenient correct)
    rows = [("ADE20K", "B", "B", True, True), ("ADE20K", "A", "(A)", True, True),
            ("ADE20K", "B", "The answer is B", False, True), ("COCO", "A", "A.", True, True),
            ("COCO", "B", "two", False, True), ("Omni3D", "A", "lamp", False, True),
            ("Omni3D", "B", "A", False, False), ("Omni3D", "A", "A lamp", False, True)]
    choices = {"ADE20K": ["3", "2"], "COCO": ["1", "two"], "Omni3D": ["lamp", "sofa"]}
    items = [CVBenchItem(i, "3D" if src == "Omni3D" else "2D", "Count", "Q?", choices[src], ans, src)
             for i, (src, ans, *_rest) in enumerate(rows)]
    records, scores = cv_bench.score_outputs(items, {it.key: r[2] for it, r in zip(items, rows)})
    assert [r["strict_correct"] for r in records] == [r[3] for r in rows]
    assert [r["correct"] for r in records] == [r[4] for r in rows]
    strict = scores["strict"]
    # strict: ADE20K 2/3, COCO 1/2 -> 2D (2/3 + 1/2) / 2 = 7/12; Omni3D 0/3
    assert strict["2D"] == pytest.approx(7 / 12) and strict["3D"] == 0.0
    assert strict["overall"] == pytest.approx(7 / 24)
    # lenient: ADE20K 3/3, COCO 2/2 -> 2D 1.0; Omni3D 2/3
    assert scores["2D"] == 1.0 and scores["3D"] == pytest.approx(2 / 3)
    assert "strict" in strict["scoring"] and "lenient" in scores["scoring"]
