"""Checkpoint bookkeeping without DeepSpeed: completeness, choosing the newest complete one, pruning, RNG."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from pipeline import checkpoint as ckpt


def fake_checkpoint(output_dir, step: int, complete: bool = True) -> "ckpt.Path":
    path = ckpt.checkpoints_root(output_dir) / ckpt.step_tag(step)
    path.mkdir(parents=True)
    (path / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * 100)
    ckpt.write_json(path / ckpt.TRAINER_STATE, {"step": step, "world_size": 2})
    if complete:
        ckpt.mark_complete(path)
    return path


def test_latest_complete_sorts_numerically_and_skips_damaged(tmp_path):
    for step in (9, 10, 100):
        fake_checkpoint(tmp_path, step)
    # step 1000: cut off before COMPLETE was written (kill -9 mid-save)
    fake_checkpoint(tmp_path, 1000, complete=False)
    # step 200: complete once, then a file was truncated
    damaged = fake_checkpoint(tmp_path, 200)
    (damaged / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * 10)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [9, 10, 100, 200, 1000]
    assert ckpt.latest_complete(tmp_path).name == ckpt.step_tag(100)
    assert ckpt.resolve_resume("auto", tmp_path).name == ckpt.step_tag(100)
    assert ckpt.resolve_resume(None, tmp_path) is None


def test_resume_auto_on_a_fresh_run_starts_from_scratch(tmp_path):
    assert ckpt.resolve_resume("auto", tmp_path) is None


def test_resume_from_an_incomplete_path_is_refused(tmp_path):
    path = fake_checkpoint(tmp_path, 5, complete=False)
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.resolve_resume(str(path), tmp_path)


def test_a_missing_listed_file_makes_a_checkpoint_incomplete(tmp_path):
    path = fake_checkpoint(tmp_path, 3)
    assert ckpt.is_complete(path)
    (path / ckpt.TRAINER_STATE).unlink()
    assert not ckpt.is_complete(path)


def test_prune_keeps_the_last_k_complete_and_drops_older_partials(tmp_path):
    for step in (2, 4, 6, 8):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 5, complete=False)
    fake_checkpoint(tmp_path, 9, complete=False)        # newer partial: kept (may be retried)
    ckpt.prune(tmp_path, keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [6, 8, 9]


def test_complete_marker_lists_every_file_with_its_size(tmp_path):
    path = fake_checkpoint(tmp_path, 1)
    listed = json.loads((path / ckpt.COMPLETE).read_text())["files"]
    assert listed == {"zero_pp_rank_0_mp_rank_00_optim_states.pt": 100,
                      ckpt.TRAINER_STATE: (path / ckpt.TRAINER_STATE).stat().st_size}


def test_rng_state_round_trips_through_json(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    ckpt.write_json(tmp_path / "rng.json", ckpt.rng_state())
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    ckpt.set_rng_state(ckpt.read_json(tmp_path / "rng.json"))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_a_fresh_start_into_a_folder_with_checkpoints_is_refused(tmp_path):
    ckpt.check_start(None, tmp_path)                     # empty folder: fine
    fake_checkpoint(tmp_path, 60)
    with pytest.raises(ValueError, match=r"step_00000060.*--resume auto.*another --output-dir"):
        ckpt.check_start(None, tmp_path)


def test_resuming_before_later_complete_checkpoints_is_refused(tmp_path):
    early = fake_checkpoint(tmp_path, 20)
    fake_checkpoint(tmp_path, 40, complete=False)        # a save cut off by kill -9: retried, not in the way
    ckpt.check_start(early, tmp_path)
    ckpt.check_start(ckpt.resolve_resume("auto", tmp_path), tmp_path)
    fake_checkpoint(tmp_path, 60)
    with pytest.raises(ValueError, match=r"starts at step 20.*step_00000060"):
        ckpt.check_start(early, tmp_path)
    ckpt.check_start(ckpt.resolve_resume("auto", tmp_path), tmp_path)   # the newest: nothing later

