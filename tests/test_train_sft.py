"""SFT from run A's export (tests/test_train.py) under ZeRO-3, resumed on other numbers of ranks:

* S  — 2 ranks, its last step non-finite (non-zero exit); S's step 2 resumed on 1 rank, then on 2: S's losses,
  Adam state and A's vision tower, bit for bit.

Its own module so that the suite's two workers (one module each at a time) share the training tests; the
datasets and run A are tests/test_train.py's, made once for every module.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pipeline import checkpoint as ckpt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_utils import show  # noqa: E402
from test_train import (RANK_CHANGE_REL, assert_same_optimizer, assert_vision_tower, digests,  # noqa: E402
                        export_tensors, losses, run_a, train, world, zero_to_fp32)  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow


def test_sft_resumed_on_other_rank_counts_keeps_its_vision_tower_and_adam_and_ends_nonzero_after_a_skipped_last_step(
        run_a, world, tmp_path):
    """SFT from A's export under ZeRO-3 (the tower comes from ``init_from``, which a resume does not read):
    S straight on 2 ranks (its 5th and last step made non-finite), then S's step 2 on 1 rank to step 3 and
    on 2 ranks again to step 4."""
    sft = ["--config", "tiny_sft", "--set", f"train.init_from={run_a / 'export'}", "--set", "train.total_steps=5",
           "--set", "train.save_every=2", "--set", "train.keep_last=4"] + world["sft"]
    out_s, proc = train(world, "S", sft, probe=True, env={"WANDB_MODE": "disabled", "AKI_TEST_NAN_STEPS": "5"})
    # the last step was skipped as non-finite: a non-zero exit, its checkpoint kept, no export
    assert proc.returncode != 0 and "had a non-finite loss and were skipped" in proc.stdout + proc.stderr, show(proc)
    assert ckpt.latest_complete(out_s).name == ckpt.step_tag(5) and not (out_s / "export").exists()
    s = losses(out_s)
    out_r, proc = train(world, "S-resumed", sft + ["--resume", str(ckpt.checkpoints_root(out_s) / ckpt.step_tag(2)),
                                                   "--stop-at-step", "3"], nproc=1, env={"WANDB_MODE": "disabled"})
    assert proc.returncode == 0, show(proc)
    _, proc = train(world, "S-resumed", sft + ["--resume", "auto", "--stop-at-step", "4"],
                    env={"WANDB_MODE": "disabled"})
    assert proc.returncode == 0, show(proc)
    assert losses(out_r) == {3: pytest.approx(s[3], rel=RANK_CHANGE_REL), 4: pytest.approx(s[4], rel=RANK_CHANGE_REL)}
    assert digests(out_r)[4] == digests(out_s)[4]
    reference = export_tensors(run_a / "export")           # the tower SFT started from, never trained
    for step in (3, 4):                                     # saved by 1 rank, then by 2
        assert_vision_tower(zero_to_fp32(ckpt.checkpoints_root(out_r) / ckpt.step_tag(step), tmp_path / f"{step}"),
                            reference)
    assert_same_optimizer(ckpt.checkpoints_root(out_r) / ckpt.step_tag(4), ckpt.checkpoints_root(out_s) / ckpt.step_tag(4))
