"""The quickstart end to end at a very small scale (world → shards → PT → SFT mma/causal → CV-Bench-style
eval → table, report, loss curves): every step runs its real command line, the results are written and
consistent, and the accuracy gate fails the run (exit 3) when a model does not beat chance by the margin.

Whether the models beat chance is a property of the full ``make quickstart`` run, not of this one: a
few dozen CPU steps are too few for the images to be used, so the gate is checked here with a margin
no model can reach.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline.eval.report import read_loss_curve

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_tiny_quickstart_runs_every_step_and_gates_on_accuracy(tmp_path):
    out = tmp_path / "qs"
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.quickstart", "--steps-scale", "0.05", "--out", str(out),
                           "--min-margin", "1.0"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "did not beat chance" in proc.stderr and "by 100 points" in proc.stderr, proc.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    assert results["n_questions"] >= 100
    assert 0.25 <= results["chance"] <= 0.5          # 2- and 4-option questions
    for mode in ("mma", "causal"):
        scores = results["scores"][mode]
        assert scores["n"] == results["n_questions"]
        assert 0.0 <= results["accuracy"][mode] <= 1.0
        predictions = (out / "eval" / mode / "predictions.jsonl").read_text().splitlines()
        assert len(predictions) == results["n_questions"]
        sft_steps, _ = read_loss_curve(str(out / "runs" / f"sft_{mode}" / "metrics.jsonl"))
        assert sft_steps == list(range(1, results["plan"]["sft_steps"] + 1))
    pt_steps, pt_loss = read_loss_curve(str(out / "runs" / "pt" / "metrics.jsonl"))
    assert pt_steps == list(range(1, results["plan"]["pt_steps"] + 1))
    assert pt_loss[-1] < pt_loss[0] * 0.7            # pre-training learns the captions' text
    assert (out / "loss_curves.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "| SFT mma |" in report and "| SFT causal |" in report and "chance" in report
    assert "SFT mma" in proc.stdout                  # the table is printed
