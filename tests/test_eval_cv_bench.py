"""CV-Bench prompt and scoring from model outputs (no model needed), POPE scoring per split."""
from __future__ import annotations

import pytest

from pipeline.chat import SYSTEM_MESSAGE, get_layout, render
from pipeline.eval import cv_bench, pope
from pipeline.eval.readers import read_cv_bench, read_pope
from pipeline.tokens import IMAGE, TEXT_INPUT, TEXT_TARGET
from test_eval_readers import write_cv_bench, write_pope


@pytest.fixture
def cv_items(tmp_path):
    return read_cv_bench(write_cv_bench(str(tmp_path / "cvb")))[0]


def test_prompt_is_the_papers_multiple_choice_input(cv_items):
    item = cv_items[0]
    assert cv_bench.question_input(item) == (
        "Answer with the option's letter from the given choices directly. How many chairs are in the image?\n"
        "Options:\nA. 3\nB. 2\nC. 1\nD. 0\n")
    segs = get_layout("released").segments(cv_bench.prompt(item), 1)
    assert render(segs) == (f"<|system|>\n{SYSTEM_MESSAGE}<|end|>\n<|user|>\n<image>\n{cv_bench.question_input(item)}"
                            "<|end|>\n<|assistant|>\n")
    assert [s.modality for s in segs].count(IMAGE) == 1
    assert {s.modality for s in segs[:-1]} == {TEXT_INPUT, IMAGE}
    assert (segs[-1].modality, segs[-1].text) == (TEXT_TARGET, "\n")   # the released model's answers start with it


def test_scores_from_awkward_outputs_by_hand(cv_items):
    # answers: ADE20K B; COCO A, F; Omni3D B, A
    outputs = {"2D/0": "(B)", "2D/1": "left", "2D/2": "The answer is E",
               "3D/0": "A lamp and a sofa", "3D/1": "chair."}
    records, scores = cv_bench.score_outputs(cv_items, outputs)
    assert [r["letter"] for r in records] == ["B", "A", "E", None, "A"]
    assert [r["correct"] for r in records] == [True, True, False, False, True]
    assert scores["per_source"] == {"ADE20K": 1.0, "COCO": 0.5, "Omni3D": 0.5}
    assert scores["2D"] == pytest.approx(0.75) and scores["3D"] == pytest.approx(0.5)
    assert scores["overall"] == pytest.approx(0.625)
    assert scores["unanswered"] == 1
    assert set(records[0]) >= {"idx", "source", "task", "prompt", "output", "letter", "correct"}
    assert "overall  62.5" in cv_bench.format_scores(scores)


def test_pope_scoring_per_split(tmp_path):
    folder = write_pope(str(tmp_path / "pope"), str(tmp_path / "img"))
    items, _ = read_pope(folder, str(tmp_path / "img"), splits=("random", "adversarial"))
    # labels per split: yes no yes no
    outs = ["Yes", "No", "No.", "no",                    # random: TP FN... -> acc 3/4
            "yes", "Yes, there is.", "There is a car", "Nope"]   # adversarial: TP FP (unanswered) TN
    outputs = {i.key: o for i, o in zip(items, outs)}
    records, scores = pope.score_outputs(items, outputs)
    assert set(scores) == {"random", "adversarial", "mean"}
    r, a = scores["random"], scores["adversarial"]
    assert scores["mean"]["f1"] == pytest.approx((r["f1"] + a["f1"]) / 2)
    assert (r["accuracy"], r["precision"], r["recall"], r["yes_ratio"]) == (0.75, 1.0, 0.5, 0.25)
    assert r["f1"] == pytest.approx(2 / 3)
    assert (a["accuracy"], a["precision"], a["recall"], a["unanswered"]) == (0.5, 0.5, 0.5, 1)
    assert pope.prompt(items[0]).turns == (
        ("Answer the question using a single word or phrase. Is there a snowboard in the image?", None),)


def test_the_runtime_never_imports_data_prep():
    """Inference templates live in pipeline/ (pipeline.templates); data prep imports them, not the reverse."""
    import ast
    from pathlib import Path

    import pipeline

    offenders = []
    for path in Path(pipeline.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "data_prep"]
    assert offenders == []
