"""The DeepSpeed ZeRO-3 trainer, end to end on CPU: 2 ranks under torchrun (gloo), fp32, tiny model.

Runs are shared between tests (each costs a process launch):

* A  — PT, 6 steps straight, 2 ranks (probe: engine logits at the end) — the reference. Two data
  phases: "squares" (``a {colour} square`` captions) for steps 1-3, then "colours" (``{colour}``
  captions, a seeded subset of 8 samples: one epoch per step) from step 4, under one LR schedule;
* F  — 1 rank resuming A's 2-rank step-2 checkpoint (universal conversion) across the phase switch to
  step 4;  G — 2 ranks again from F's checkpoint (loader state inside phase "colours"); both must give
  A's losses, G also A's data digests, Adam state and weights;
* H  — SFT from A's export on one process under ZeRO-2 (a third of its samples text-only), with non-finite
  losses injected on step 2 (skipped) and steps 6-7 (two in a row: the run stops).

SFT from A's export resumed on other rank counts (S) is in tests/test_train_sft.py, and A's recipe with its
datasets in object storage (SIGTERM and resume, two nodes, a storage outage) in tests/test_train_remote.py:
modules of their own so that the suite's two workers (one module each at a time) share the load. The
datasets and run A are made once for all three modules (``built_once``). The datasets are written in small
shards (2 KiB): a cache of a few shards holds only part of them.
"""
from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import checkpoint as ckpt
from pipeline.metrics import read_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_utils import REPO, built_once, probe_batch, show, torchrun, write_dataset  # noqa: E402

pytestmark = pytest.mark.slow
PT = ["--config", "tiny_pt", "--set", "train.total_steps=6", "--set", "train.save_every=2",
      "--set", "train.keep_last=3", "--set", "train.log_every=1"]
SWITCH = 3          # the "colours" phase starts at optimizer step 3 (0-based): metrics step 4
SHARD_SIZE = 1 << 11
METRIC_FIELDS = {"step", "loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "mfu", "peak_mem_gb",
                 "data_wait_share", "target_tokens", "data_digest", "skipped"}


def _write_world(root: Path, tokenizer_path: str) -> None:
    """The tokenizer and the three datasets of the training tests, in ``root``."""
    from pipeline.model.tokenizer import load_tokenizer

    root.mkdir()
    shutil.copytree(tokenizer_path, root / "tokenizer")
    tok = load_tokenizer(str(root / "tokenizer"))
    write_dataset(root / "pt", tok, "pt", 64, shard_size=SHARD_SIZE)
    write_dataset(root / "colours", tok, "pt", 64, caption="{color}", shard_size=SHARD_SIZE)
    write_dataset(root / "sft", tok, "sft", 32, text_only_every=3)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_tokenizer_path):
    """The training tests' tokenizer and datasets, and the folder of their runs: one for the whole test run
    (tests/test_train*.py), written by the first module that asks."""
    from pipeline.model.tokenizer import load_tokenizer

    root = built_once(tmp_path_factory, "train", lambda folder: _write_world(folder, tiny_tokenizer_path))
    tok = load_tokenizer(str(root / "tokenizer"))
    data = {name: str(root / name) for name in ("pt", "colours", "sft")}
    common = ["--set", f"model.tokenizer={root / 'tokenizer'}"]
    return {"root": root, "tok": tok, "pt": common + ["--set", pt_phases("path", data["pt"], data["colours"])],
            "sft": ["--set", f"data.datasets=[{{path: {data['sft']}}}]"], "folders": data, "tokenizer": common}


def pt_phases(key: str, squares: str, colours: str) -> str:
    """Run A's two data phases, with the datasets as local folders (``key`` path) or URLs (remote)."""
    return (f"data.phases=[{{name: squares, datasets: [{{{key}: {squares}}}]}}, {{name: colours, start_step: "
            f"{SWITCH}, datasets: [{{{key}: {colours}, samples: 8}}]}}]")


def train(world, name: str, args: list[str], nproc: int = 2, probe: bool = False, env=None):
    out = world["root"] / name
    return out, launch(out, args, nproc, probe, env)


def launch(out: Path, args: list[str], nproc: int = 2, probe: bool = False, env=None) -> subprocess.CompletedProcess:
    """``pipeline.train ARGS`` into ``out`` under torchrun (``probe``: through tests/dist_utils.py's probe)."""
    full = args + ["--output-dir", str(out)]
    if probe:
        return torchrun(["tests/dist_utils.py", "probe", str(out / "probe"), "--"] + full, nproc, env, module=False)
    return torchrun(["pipeline.train"] + full, nproc, env)


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out)}


def digests(out: Path) -> dict[int, str]:
    return {r["step"]: r["data_digest"] for r in read_metrics(out)}


@pytest.fixture(scope="module")
def run_a(world, tmp_path_factory):
    """Run A's folder: trained once for the whole test run, by the first module that asks."""
    def build(out: Path) -> None:
        proc = launch(out, PT + world["pt"], probe=True, env={"WANDB_MODE": "offline"})
        assert proc.returncode == 0, show(proc)

    return built_once(tmp_path_factory, "train-A", build)


def events(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(__import__("json").loads, lines) if r.get("event") == kind]


def test_pt_run_learns_logs_every_metric_and_keeps_the_last_checkpoints(run_a):
    records = read_metrics(run_a)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(METRIC_FIELDS <= set(r) for r in records)
    assert all(r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 and 0 <= r["data_wait_share"] <= 1
               and r["peak_mem_gb"] > 0 and r["grad_norm"] > 0 and not r["skipped"] for r in records)
    loss = losses(run_a)
    assert loss[6] < loss[1] - 0.3, loss
    assert [s for s, _ in ckpt.list_checkpoints(run_a)] == [2, 4, 6]
    assert all(ckpt.is_complete(p) for _, p in ckpt.list_checkpoints(run_a))
    run_id = ckpt.read_json(ckpt.latest_complete(run_a) / ckpt.TRAINER_STATE)["wandb_run_id"]
    assert list((run_a / "wandb").glob(f"wandb/offline-run-*-{run_id}")), "no offline wandb run with the run id"


def test_two_data_phases_switch_at_their_step_under_one_lr_schedule(run_a, world):
    records = read_metrics(run_a)
    # a "colours" caption has fewer target tokens than any "squares" one: every step after the switch
    # (8 samples each) predicts fewer tokens than every step before it
    targets = [r["target_tokens"] for r in records]
    assert max(targets[SWITCH:]) < min(targets[:SWITCH]), targets
    started = events(run_a, "data_phase")
    assert [(e["phase"], e["step"], e["end_step"], e["resumed"]) for e in started] == [
        ("squares", 0, SWITCH, False), ("colours", SWITCH, 6, False)]
    assert started[1]["streams"] == [{"path": started[1]["streams"][0]["path"], "samples": 64, "per_epoch": 8}]
    # one cosine schedule over all 6 steps (warmup 2, 1e-3 -> 1e-4), no restart at the switch
    expected = [1e-3 * s / 2 if s < 2 else 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 4))
                for s in range(6)]
    assert [r["lr"] for r in records] == pytest.approx(expected, rel=1e-6)


def test_export_reloads_with_the_trained_engines_logits(run_a, world):
    from pipeline.model.aki import AKIModel

    model = AKIModel.from_pretrained(run_a / "export")
    with torch.no_grad():
        logits = model(**probe_batch(world["tok"]), return_logits=True).logits
    engine_logits = torch.load(run_a / "probe" / "logits_end.pt", weights_only=True)
    torch.testing.assert_close(logits, engine_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(engine_logits, torch.load(run_a / "probe" / "logits_start.pt", weights_only=True))


# Losses of a run resumed on another number of ranks, against the uninterrupted 2-rank run. Measured on the
# 2-core CPU machine (fp32): identical on every step (difference 0), the 1-rank leg's other summation order
# rounding the same here; 1e-6 relative is a few fp32 ulps of the losses (~6).
RANK_CHANGE_REL = 1e-6
# Weights and Adam moments after the round trip, against the uninterrupted run: measured at most 6e-8 apart (PT)
# and 1.5e-8 (SFT), i.e. within one fp32 ulp of weights near 1; 3e-7 is a few ulps
# (the 1-rank leg's gradients are summed in another order).
RANK_CHANGE_ATOL = 3e-7


def optimizer_shards(checkpoint: Path) -> list[dict]:
    """Each rank's ZeRO optimizer state of a checkpoint (tensors, plain containers and DeepSpeed's two
    loss-scaler/stage classes only)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    shards = []
    for path in sorted(checkpoint.glob("*_optim_states.pt")):
        with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum]):
            shards.append(torch.load(path, map_location="cpu", weights_only=True)["optimizer_state_dict"])
    return shards


def assert_same_optimizer(resumed: Path, straight: Path) -> None:
    """Step counts, group hyper-parameters and (to fp32 summation noise) master weights and both Adam moments,
    shard by shard, of two checkpoints saved by the same number of ranks."""
    got, want = optimizer_shards(resumed), optimizer_shards(straight)
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        gi, wi = g["optimizer_state_dict"], w["optimizer_state_dict"]
        assert [float(s["step"]) for s in gi["state"].values()] == [float(s["step"]) for s in wi["state"].values()]
        assert [{k: v for k, v in grp.items() if k != "params"} for grp in gi["param_groups"]] == \
            [{k: v for k, v in grp.items() if k != "params"} for grp in wi["param_groups"]]
        for key in ("exp_avg", "exp_avg_sq"):
            for i in wi["state"]:
                torch.testing.assert_close(gi["state"][i][key], wi["state"][i][key], rtol=0, atol=RANK_CHANGE_ATOL)
        for a, b in zip(g["fp32_flat_groups"], w["fp32_flat_groups"]):
            torch.testing.assert_close(a, b, rtol=0, atol=RANK_CHANGE_ATOL)


def zero_to_fp32(checkpoint: Path, out: Path) -> dict[str, torch.Tensor]:
    """DeepSpeed's own consolidation command line on one checkpoint folder, read back. It runs as
    ``python -m deepspeed.utils.zero_to_fp32 ARGS`` would (its ``__main__``, these arguments), in this process:
    a new interpreter would spend seconds importing torch and DeepSpeed again."""
    import runpy
    import warnings

    from safetensors.torch import load_file

    argv = sys.argv
    sys.argv = ["zero_to_fp32", str(checkpoint.parent), str(out), "--tag", checkpoint.name, "--safe_serialization"]
    try:
        with warnings.catch_warnings():     # deepspeed.utils imports the module too: runpy runs it anew
            warnings.filterwarnings("ignore", "'deepspeed.utils.zero_to_fp32' found in sys.modules", RuntimeWarning)
            runpy.run_module("deepspeed.utils.zero_to_fp32", run_name="__main__", alter_sys=True)
    finally:
        sys.argv = argv
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def export_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def assert_vision_tower(tensors: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    tower = sorted(k for k in reference if k.startswith("vision."))
    assert tower and all(torch.equal(tensors[k], reference[k]) for k in tower), \
        [k for k in tower if not torch.equal(tensors[k], reference[k])][:5]


def test_resume_on_one_rank_across_the_phase_switch_and_back_on_two_gives_the_same_run(run_a, world, tmp_path):
    """PT under ZeRO-3, 2 -> 1 -> 2 ranks (each change through DeepSpeed's universal format): the uninterrupted
    run's losses, data, Adam state and weights."""
    a = losses(run_a)
    from_a = ckpt.checkpoints_root(run_a) / ckpt.step_tag(2)
    out_f, proc = train(world, "F", PT + world["pt"] + ["--resume", str(from_a), "--stop-at-step", "4"], nproc=1,
                        env={"WANDB_MODE": "disabled"})
    assert proc.returncode == 0, show(proc)
    assert ckpt.is_complete(from_a / ckpt.UNIVERSAL)
    assert losses(out_f) == {3: pytest.approx(a[3], rel=RANK_CHANGE_REL), 4: pytest.approx(a[4], rel=RANK_CHANGE_REL)}
    state = ckpt.read_json(ckpt.latest_complete(out_f) / ckpt.rank_file(0))["data"]
    assert state["phase"] == "colours" and state["loader"]["sample_in_epoch"] == 8   # one epoch of the subset
    _, proc = train(world, "F", PT + world["pt"] + ["--resume", "auto"], nproc=2, env={"WANDB_MODE": "disabled"})
    assert proc.returncode == 0, show(proc)
    assert {s: losses(out_f)[s] for s in (5, 6)} == {s: pytest.approx(a[s], rel=RANK_CHANGE_REL) for s in (5, 6)}
    assert {s: digests(out_f)[s] for s in (5, 6)} == {s: digests(run_a)[s] for s in (5, 6)}
    assert [(e["phase"], e["step"], e["resumed"]) for e in events(out_f, "data_phase")] == [
        ("squares", 2, True), ("colours", SWITCH, False), ("colours", 4, True)]
    resumed = events(out_f, "resumed")
    assert [(e["world_size"], e["universal"], e["universal_repairs"]["step"]) for e in resumed] == [
        (1, True, 2.0), (2, True, 4.0)]
    assert len({e["frozen_sha256"] for e in resumed}) == 1
    # the optimizer after 2 -> 1 -> 2 is the uninterrupted run's: steps, group settings, moments, master weights
    step6 = ckpt.checkpoints_root(out_f) / ckpt.step_tag(6)
    assert_same_optimizer(step6, ckpt.checkpoints_root(run_a) / ckpt.step_tag(6))
    # DeepSpeed's own consolidation of checkpoints written after a rank change: the export of that step, bit for
    # bit, and the uninterrupted run's vision tower (the 1-rank checkpoint too)
    consolidated = zero_to_fp32(step6, tmp_path / "fp32-6")
    exported = export_tensors(out_f / "export")
    assert consolidated.keys() == exported.keys()
    assert all(torch.equal(consolidated[k], exported[k]) for k in exported)
    reference = export_tensors(run_a / "export")
    assert_vision_tower(zero_to_fp32(ckpt.checkpoints_root(out_f) / ckpt.step_tag(4), tmp_path / "fp32-4"), reference)
    assert_vision_tower(exported, reference)
    for k in reference:
        torch.testing.assert_close(exported[k], reference[k], rtol=0, atol=RANK_CHANGE_ATOL)


def test_sft_on_one_process_under_zero2_skips_a_nonfinite_step_and_stops_after_two_in_a_row(run_a, world):
    from pipeline.model.aki import AKIModel

    args = ["--config", "tiny_sft", "--set", f"train.init_from={run_a / 'export'}", "--set", "train.total_steps=8",
            "--set", "train.max_nonfinite_steps=2", "--set", "train.deepspeed=ds_configs/zero2_single_gpu.json"]
    out, proc = train(world, "H", args + world["sft"], nproc=1, probe=True,
                      env={"WANDB_MODE": "disabled", "AKI_TEST_NAN_STEPS": "2,6,7"})
    assert proc.returncode != 0                         # steps 6 and 7: two non-finite losses in a row
    assert "loss was not finite for 2 steps in a row" in proc.stdout + proc.stderr, show(proc)
    exported = AKIModel.from_pretrained(run_a / "export")
    with torch.no_grad():
        expected = exported(**probe_batch(world["tok"]), return_logits=True).logits
    start = torch.load(out / "probe" / "logits_start.pt", weights_only=True)
    torch.testing.assert_close(start, expected, rtol=1e-5, atol=1e-5)   # SFT starts from the PT export
    records = {r["step"]: r for r in read_metrics(out)}
    assert sorted(records) == [1, 2, 3, 4, 5, 6, 7]      # stopped at the second one, step 8 never ran
    assert records[2]["skipped"] and records[2]["loss"] is None and records[2]["grad_norm"] is None
    assert records[3]["lr"] == records[2]["lr"]          # the skipped step did not advance the schedule
    assert not any(records[s]["skipped"] for s in (1, 3, 4, 5))
    assert records[5]["loss"] < records[1]["loss"]
    events = [r for r in map(__import__("json").loads, (out / "metrics.jsonl").read_text().splitlines())
              if r.get("event") == "nonfinite_loss"]
    assert [e["step"] for e in events] == [2, 6, 7]


def test_bad_config_fails_before_any_distributed_work(world, tmp_path):
    import os

    proc = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", "tiny_pt", "--set", "optim.lrr=1",
                           "--output-dir", str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=120)
    assert proc.returncode == 2, show(proc)
    assert "optim.lrr" in proc.stderr and "optim.lr" in proc.stderr
    assert "init_distributed" not in proc.stdout + proc.stderr and not (tmp_path / "run").exists()


def test_a_new_run_into_a_folder_with_checkpoints_fails_before_any_distributed_work(run_a, world, capsys):
    from pipeline import train as trainer

    before = sorted(p.name for p in (run_a / "checkpoints").iterdir())
    code = trainer.main([*PT, *world["pt"], "--output-dir", str(run_a)])      # returns before any process group
    err = capsys.readouterr().err
    assert code == 2 and "already holds checkpoints" in err and "--resume auto" in err, err
    assert sorted(p.name for p in (run_a / "checkpoints").iterdir()) == before
