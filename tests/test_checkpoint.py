"""Checkpoint bookkeeping without DeepSpeed: completeness, choosing the newest complete one, pruning, RNG per
rank on a resume, the export's finiteness check."""
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


def _draws() -> tuple:
    return torch.rand(4), np.random.rand(4), random.random()


def _same(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_each_rank_gets_its_own_rng_after_a_resume_on_more_or_fewer_ranks(tmp_path):
    """Saved by 2 ranks (distinct streams); resumed on 1 rank and on 3: ranks 0 and 1 get their own saved
    states, rank 2 a seeded stream of its own (reproducible, never a copy of another rank's)."""
    path = tmp_path / "step_00000004"
    path.mkdir()
    expected = []
    for rank in (0, 1):
        torch.manual_seed(100 + rank)
        np.random.seed(200 + rank)
        random.seed(300 + rank)
        ckpt.write_json(path / ckpt.rank_file(rank), {"data": {"rank": rank}, "rng": ckpt.rng_state()})
        expected.append(_draws())
    ckpt.write_json(path / ckpt.TRAINER_STATE, {"step": 4, "world_size": 2})
    drawn = {}
    for rank in (0, 1, 2):
        torch.manual_seed(7)
        np.random.seed(7)
        random.seed(7)
        state = ckpt.restore_rank_state(path, rank, seed=0)
        assert state == {"data": {"rank": rank if rank < 2 else 0}}   # the data state is global: rank 0's
        drawn[rank] = _draws()
    assert _same(drawn[0], expected[0]) and _same(drawn[1], expected[1])
    assert not any(_same(drawn[2], d) for d in (*expected, drawn[0], drawn[1]))
    ckpt.restore_rank_state(path, 2, seed=0)
    assert _same(_draws(), drawn[2])                                # seeded: the same stream again
    ckpt.restore_rank_state(path, 2, seed=1)
    assert not _same(_draws(), drawn[2])                            # from the run's seed


def test_an_export_with_a_non_finite_tensor_is_refused_naming_it():
    from pipeline.weights_check import BrokenWeights, check_finite_state_dict

    state = {"vision.w": torch.ones(3), "llm.b": torch.tensor([1.0, float("nan")]), "ids": torch.arange(3)}
    with pytest.raises(BrokenWeights, match=r"export of step_3: 1 tensors hold NaN or Inf \(llm\.b\)"):
        check_finite_state_dict(state, "export of step_3")
    check_finite_state_dict({"vision.w": torch.ones(3), "ids": torch.arange(3)}, "export")


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



def _engine_with_a_frozen_layer():
    from types import SimpleNamespace

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    model[0].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return SimpleNamespace(module=model, optimizer=optimizer)


def test_a_loaded_checkpoint_is_checked_for_finite_values_and_unchanged_frozen_weights():
    from pipeline.weights_check import BrokenWeights, check_loaded, frozen_digest

    engine = _engine_with_a_frozen_layer()
    recorded = frozen_digest(engine.module)
    assert check_loaded(engine, "step_2", recorded) == recorded
    assert check_loaded(engine, "step_2", None) == recorded         # a checkpoint that recorded none
    with torch.no_grad():
        engine.module[0].weight[0, 0] += 1e-6                        # one frozen value changed
    with pytest.raises(BrokenWeights, match="frozen parameters after loading differ"):
        check_loaded(engine, "step_2", recorded)
    engine = _engine_with_a_frozen_layer()
    with torch.no_grad():
        engine.module[1].bias.fill_(float("inf"))
    with pytest.raises(BrokenWeights, match=r"step_2 loaded with non-finite values in 1 tensors \(1\.bias\)"):
        check_loaded(engine, "step_2", recorded)
    engine = _engine_with_a_frozen_layer()
    next(iter(engine.optimizer.state.values()))["exp_avg_sq"].fill_(float("nan"))
    with pytest.raises(BrokenWeights, match=r"optimizer state 0\.exp_avg_sq"):
        check_loaded(engine, "step_2", recorded)
