"""The evaluation CLIs end to end on a tiny exported model: files written, every question answered,
scores consistent with the per-question records, and torchrun sharding equal to one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline.eval import cv_bench, pope
from test_eval_readers import CV_BENCH_ROWS, write_cv_bench, write_pope

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_cv_bench_cli_writes_predictions_and_scores(tmp_path, tiny_export, capsys):
    data = write_cv_bench(str(tmp_path / "cvb"))
    out = str(tmp_path / "out")
    assert cv_bench.main(["--model", tiny_export, "--data", data, "--out", out, "--batch-size", "2",
                          "--max-new-tokens", "3", "--device", "cpu"]) == 0
    records = _read_jsonl(os.path.join(out, "predictions.jsonl"))
    assert [(r["type"], r["idx"]) for r in records] == [(row[1], row[0]) for row in CV_BENCH_ROWS]
    for r in records:
        assert r["prompt"].startswith("Answer with the option's letter from the given choices directly.")
        assert isinstance(r["output"], str)
        assert r["correct"] == (r["letter"] == r["answer"])
    with open(os.path.join(out, "scores.json")) as f:
        scores = json.load(f)
    assert scores["n"] == len(CV_BENCH_ROWS)
    omni = [r["correct"] for r in records if r["source"] == "Omni3D"]
    assert scores["3D"] == pytest.approx(sum(omni) / len(omni))
    assert "overall" in capsys.readouterr().out


def test_pope_cli_writes_scores_per_split(tmp_path, tiny_export):
    folder = write_pope(str(tmp_path / "pope"), str(tmp_path / "val2014"))
    out = str(tmp_path / "out")
    assert pope.main(["--model", tiny_export, "--data", folder, "--images", str(tmp_path / "val2014"),
                      "--splits", "random", "popular", "--out", out, "--max-new-tokens", "2",
                      "--device", "cpu"]) == 0
    with open(os.path.join(out, "scores.json")) as f:
        scores = json.load(f)
    assert set(scores) == {"random", "popular", "mean", "skipped"}
    assert scores["random"]["n"] == 4
    assert scores["mean"]["f1"] == pytest.approx((scores["random"]["f1"] + scores["popular"]["f1"]) / 2)
    assert len(_read_jsonl(os.path.join(out, "predictions.jsonl"))) == 8


@pytest.mark.slow
def test_torchrun_two_ranks_give_the_same_predictions_as_one(tmp_path, tiny_export):
    data = write_cv_bench(str(tmp_path / "cvb"))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    common = ["-m", "pipeline.eval.cv_bench", "--model", tiny_export, "--data", data, "--batch-size", "2",
              "--max-new-tokens", "3", "--device", "cpu"]
    subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one")], check=True, cwd=REPO, env=env,
                   capture_output=True)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29533", *common, "--out", str(tmp_path / "two")],
                         cwd=REPO, env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    one_rec = _read_jsonl(tmp_path / "one" / "predictions.jsonl")
    two_rec = _read_jsonl(tmp_path / "two" / "predictions.jsonl")
    assert len(two_rec) == len(CV_BENCH_ROWS)
    assert len({r["output"] for r in one_rec}) > 1          # the comparison is not trivially equal
    assert [(r["idx"], r["type"], r["output"]) for r in two_rec] == [(r["idx"], r["type"], r["output"])
                                                                     for r in one_rec]
