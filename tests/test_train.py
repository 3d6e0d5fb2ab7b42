"""The DeepSpeed ZeRO-3 trainer, end to end on CPU: 2 ranks under torchrun (gloo), fp32, tiny model.

Runs are shared between tests (each costs a process launch):

* A  — PT, 6 steps straight, 2 ranks (probe: engine logits at the end) — the reference. Two data
  phases: "squares" (``a {colour} square`` captions) for steps 1-3, then "colours" (``{colour}``
  captions, a seeded subset of 8 samples: one epoch per step) from step 4, under one LR schedule;
* B  — the same recipe with both datasets in an S3 bucket (moto on 127.0.0.1), streamed through a small
  evicting cache, SIGTERM mid-run → checkpoint + exit 0;  C — ``--resume auto`` in B's folder on an emptied
  cache (a damaged newer checkpoint is planted first): A's losses, data and weights, and no secret on disk;
* F  — 1 rank resuming A's 2-rank step-2 checkpoint (universal conversion) across the phase switch to
  step 4;  G — 2 ranks again from F's checkpoint (loader state inside phase "colours"); both must give
  A's losses, G also A's data digests, Adam state and weights;
* S  — SFT from A's export under ZeRO-3 on 2 ranks, its last step non-finite (non-zero exit); S's step 2
  resumed on 1 rank, then on 2: S's losses, Adam state and A's vision tower, bit for bit;
* H  — SFT from A's export on one process under ZeRO-2 (a third of its samples text-only), with non-finite
  losses injected on step 2 (skipped) and steps 6-7 (two in a row: the run stops);
* two nodes — B's recipe from ``slurm/pretrain.sbatch`` on two "nodes" of one rank each, USR1 → requeue.

The datasets are written in small shards (2 KiB): a cache of a few shards holds only part of them.
"""
from __future__ import annotations

import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline import checkpoint as ckpt
from pipeline.metrics import read_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_utils import REPO, probe_batch, show, torchrun, write_dataset  # noqa: E402

pytestmark = pytest.mark.slow
PT = ["--config", "tiny_pt", "--set", "train.total_steps=6", "--set", "train.save_every=2",
      "--set", "train.keep_last=3", "--set", "train.log_every=1"]
SWITCH = 3          # the "colours" phase starts at optimizer step 3 (0-based): metrics step 4
SHARD_SIZE = 1 << 11
METRIC_FIELDS = {"step", "loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "mfu", "peak_mem_gb",
                 "data_wait_share", "target_tokens", "data_digest", "skipped"}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_tokenizer_path):
    from pipeline.model.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("train")
    tok = load_tokenizer(tiny_tokenizer_path)
    data = {"pt": write_dataset(root / "pt", tok, "pt", 64, shard_size=SHARD_SIZE),
            "colours": write_dataset(root / "colours", tok, "pt", 64, caption="{color}", shard_size=SHARD_SIZE),
            "sft": write_dataset(root / "sft", tok, "sft", 32, text_only_every=3)}
    common = ["--set", f"model.tokenizer={tiny_tokenizer_path}"]
    return {"root": root, "tok": tok, "pt": common + ["--set", pt_phases("path", data["pt"], data["colours"])],
            "sft": ["--set", f"data.datasets=[{{path: {data['sft']}}}]"], "folders": data, "tokenizer": common}


def pt_phases(key: str, squares: str, colours: str) -> str:
    """Run A's two data phases, with the datasets as local folders (``key`` path) or URLs (remote)."""
    return (f"data.phases=[{{name: squares, datasets: [{{{key}: {squares}}}]}}, {{name: colours, start_step: "
            f"{SWITCH}, datasets: [{{{key}: {colours}, samples: 8}}]}}]")


def train(world, name: str, args: list[str], nproc: int = 2, probe: bool = False, env=None):
    out = world["root"] / name
    full = args + ["--output-dir", str(out)]
    if probe:
        proc = torchrun(["tests/dist_utils.py", "probe", str(out / "probe"), "--"] + full, nproc, env, module=False)
    else:
        proc = torchrun(["pipeline.train"] + full, nproc, env)
    return out, proc


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out)}


def digests(out: Path) -> dict[int, str]:
    return {r["step"]: r["data_digest"] for r in read_metrics(out)}


@pytest.fixture(scope="module")
def run_a(world):
    out, proc = train(world, "A", PT + world["pt"], probe=True, env={"WANDB_MODE": "offline"})
    assert proc.returncode == 0, show(proc)
    return out


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


def _sigterm_when_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 180) -> None:
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            reached = any(r["step"] >= step for r in read_metrics(out))
        except ValueError:          # a line being written
            reached = False
        if reached:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.send_signal(signal.SIGTERM)
            return
        time.sleep(0.2)
    raise AssertionError("the run never reached the step to interrupt")


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
    """DeepSpeed's own consolidation command line on one checkpoint folder, read back."""
    from safetensors.torch import load_file

    proc = subprocess.run([sys.executable, "-m", "deepspeed.utils.zero_to_fp32", str(checkpoint.parent), str(out),
                           "--tag", checkpoint.name, "--safe_serialization"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**__import__("os").environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, show(proc)
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


# ---- datasets in object storage --------------------------------------------------------------------

@pytest.fixture(scope="module")
def bucket(world, s3_server) -> dict:
    """Run A's two datasets uploaded to the S3 bucket: {phase: URL}, and {phase: [shard bytes]} as "shards"."""
    import json

    s3, urls, shards = s3_server.client(), {}, {}
    for phase, key in (("squares", "pt"), ("colours", "colours")):
        folder = Path(world["folders"][key])
        for path in sorted(folder.iterdir()):
            s3.upload_file(str(path), s3_server.bucket, f"train/{key}/{path.name}")
        urls[phase] = s3_server.url("train", key)
        shards[phase] = [s["raw_data"]["bytes"] for s in json.loads((folder / "index.json").read_text())["shards"]]
    return {**urls, "shards": shards}


def remote_args(world, bucket) -> list[str]:
    return PT + world["tokenizer"] + ["--set", pt_phases("remote", bucket["squares"], bucket["colours"])]


def test_sigterm_while_streaming_from_a_bucket_checkpoints_and_resume_auto_reproduces_the_local_run(
        run_a, world, s3_server, bucket):
    import os

    from dist_utils import free_port

    from pipeline.data.remote import cache_folder

    squares = bucket["shards"]["squares"]
    limit = 14 * max(max(b) for b in bucket["shards"].values())   # 2 ranks x (2 x predownload 2 + 3) shards
    assert len(squares) >= 24 and limit < sum(squares)
    out, cache = world["root"] / "B", world["root"] / "B-cache"
    args = remote_args(world, bucket) + ["--set", f"data.cache_dir={cache}", "--set", f"data.cache_limit={limit}b",
                                         "--set", "data.predownload=2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "pipeline.train"] + args + ["--output-dir", str(out)]
    env = {**os.environ, **s3_server.env(), "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    log_file = world["root"] / "B.log"      # a file, not a pipe: nobody reads a pipe until the run ends
    with open(log_file, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True)
        _sigterm_when_step(proc, out, 2)
        proc.wait(timeout=180)
    log = log_file.read_text()
    assert proc.returncode == 0, log[-8000:]
    assert "is deprecated" not in log, log[-4000:]         # no per-step deprecation warnings flooding the log
    stopped = max(losses(out))
    assert stopped < 6 and ckpt.latest_complete(out).name == ckpt.step_tag(stopped), log[-4000:]
    cached = [p.stat().st_size for p in Path(cache_folder(bucket["squares"], str(cache))).glob("shard.*.mds")]
    assert 0 < sum(cached) <= limit and len(cached) < len(squares), "the cache outgrew its limit"

    # a newer checkpoint damaged mid-write (no COMPLETE marker, a truncated shard) must be passed over
    damaged = ckpt.checkpoints_root(out) / ckpt.step_tag(stopped + 1)
    shutil.copytree(ckpt.latest_complete(out), damaged)
    (damaged / ckpt.COMPLETE).unlink()
    shard = next(damaged.glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])

    shutil.rmtree(cache)                                         # resumed on a node with an empty cache
    _, second = train(world, "B", args + ["--resume", "auto"], env={**s3_server.env(), "WANDB_MODE": "offline"})
    assert second.returncode == 0, show(second)
    assert min(s for s in losses(out) if s > stopped) == stopped + 1
    assert digests(out) == digests(run_a)                        # the local folders' samples, step for step
    assert losses(out) == pytest.approx(losses(run_a), rel=1e-6, abs=1e-6)
    assert (out / "export" / "model.safetensors").read_bytes() == (run_a / "export" / "model.safetensors").read_bytes()
    secret = s3_server.secret_key.encode()
    leaked = [p for p in out.rglob("*") if p.is_file() and secret in p.read_bytes()]
    assert not leaked and secret.decode() not in log + second.stdout + second.stderr, leaked


def _steps_logged(out: Path) -> int:
    try:
        return len(read_metrics(out)) if (out / "metrics.jsonl").exists() else 0
    except ValueError:                  # a line being written
        return 0


def test_two_nodes_train_like_one_and_survive_usr1_save_requeue_resume(run_a, world, s3_server, bucket, tmp_path):
    """slurm/pretrain.sbatch on 2 nodes x 1 CPU rank, through tests/fake_slurm.py as srun and scontrol
    (slurm/README.md says why not two slurmd): c10d rendezvous on the first node, a cache per node."""
    import os

    from dist_utils import free_port
    from fake_slurm import install

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("two nodes on one host need a private /dev/shm per node: run as root with util-linux unshare")

    run_dir, nodes = tmp_path / "run", tmp_path / "nodes"
    env = {**os.environ, **s3_server.env(), "PATH": f"{install(str(tmp_path / 'bin'))}{os.pathsep}{os.environ['PATH']}",
           "FAKE_SLURM_ROOT": str(nodes), "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_JOB_NODELIST": "node[0-1]", "RDZV_PORT": str(free_port()), "AKI_ROOT": str(REPO),
           "AKI_PYTHON": sys.executable, "RECIPE": "tiny_pt", "OUTPUT_DIR": str(run_dir), "CPU_PROCS_PER_NODE": "1",
           "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = ["bash", str(REPO / "slurm" / "pretrain.sbatch"), *remote_args(world, bucket)[2:],
           "--set", "data.num_canonical_nodes=1"]
    log = tmp_path / "job.out"
    with open(log, "wb") as out:
        job = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while _steps_logged(run_dir) < 1:                       # mid-training: the first step done
            assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-6000:]
            time.sleep(0.2)
        job.send_signal(signal.SIGUSR1)                          # the preemption warning to the batch shell
        job.wait(timeout=180)
    first = log.read_text()
    assert (nodes / "requeued").read_text() == "4242\n", first[-6000:]
    stopped = max(losses(run_dir))
    assert 1 <= stopped < 6 and ckpt.latest_complete(run_dir).name == ckpt.step_tag(stopped), first[-6000:]

    second = subprocess.run(cmd, cwd=tmp_path, env={**env, "SLURM_RESTART_COUNT": "1"}, capture_output=True,
                            text=True, timeout=240)
    assert second.returncode == 0, second.stdout[-6000:] + second.stderr[-6000:]
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]   # every step exactly once
    assert digests(run_dir) == digests(run_a)                    # the one-node 2-rank run's data ...
    assert losses(run_dir) == pytest.approx(losses(run_a), rel=1e-6, abs=1e-6)   # ... and losses
    both = first + second.stdout + second.stderr
    assert "launch: 2 node(s) x 1 process(es)" in both and "rendezvous 127.0.0.1:" in both, both[-4000:]
    assert "0: [rank0]:" in both and "1: [rank1]:" in both, both[-4000:]    # global ranks on node ids 0, 1
    for node in (0, 1):                                          # each node filled its own cache
        assert list((nodes / f"node{node}" / "tmp" / "aki-stream-cache").rglob("shard.*.mds")), node


def test_a_storage_blip_is_ridden_out_an_outage_ends_the_run_and_resume_auto_finishes_it_exactly(
        run_a, world, s3_server, bucket):
    """B's recipe through tests/s3_server.Relay: the endpoint cuts and resets connections for a blip after
    step 1 (the downloads retried: the run goes on), then refuses them for good after step 3 (past the
    3 attempts of ``data.download_retry``: the ranks exit non-zero with one line naming the endpoint).
    ``--resume auto`` with the storage back finishes the run with A's losses and data, every step once."""
    import os

    from dist_utils import free_port
    from s3_server import Relay

    relay, out = Relay(s3_server.endpoint), world["root"] / "outage"
    args = remote_args(world, bucket) + ["--set", f"data.cache_dir={world['root'] / 'outage-cache'}",
                                         "--set", "data.predownload=2", "--set", "data.download_retry=3",
                                         "--set", "data.download_timeout=5", "--set", "train.step_timeout=120",
                                         "--output-dir", str(out)]
    env = {**os.environ, **s3_server.env(), "S3_ENDPOINT_URL": relay.endpoint, "AWS_MAX_ATTEMPTS": "1",
           "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "pipeline.train"] + args

    def wait_for(condition, proc) -> None:          # a guard against a hang, not a timed assertion
        deadline = time.monotonic() + 600
        while not condition():
            assert proc.poll() is None and time.monotonic() < deadline, log_file.read_text()[-30000:]
            time.sleep(0.1)

    log_file = world["root"] / "outage.log"         # a file: a pipe read only at the end would fill and block
    with open(log_file, "w") as console:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=console, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _steps_logged(out) >= 1, proc)
        relay.down("reset")                          # the blip: open connections cut, new ones reset ...
        wait_for(lambda: relay.resets >= 1, proc)    # ... until one attempt was refused that way (an attempt
        relay.up()                                   # on a cut connection may have failed too: 2 of 3 at most)
        wait_for(lambda: _steps_logged(out) >= 3, proc)
        relay.down("refuse")                         # the outage: never back during this launch
        proc.wait(timeout=600)
    finally:
        proc.kill()
    log = log_file.read_text()
    assert proc.returncode != 0, log[-8000:]
    errors = [line for line in log.splitlines() if "error: [rank" in line]
    assert errors and all(f"object storage at {relay.endpoint} failed 3 attempt(s)" in line for line in errors), \
        log[-8000:]
    assert "Background thread failed" not in log and "exception calling callback" not in log, log[-8000:]
    stopped = max(losses(out))
    assert 3 <= stopped < 6 and relay.resets >= 1

    relay.up()
    _, second = train(world, "outage", args[:-2] + ["--resume", "auto"],
                      env={**s3_server.env(), "S3_ENDPOINT_URL": relay.endpoint, "WANDB_MODE": "disabled"})
    relay.close()
    assert second.returncode == 0, show(second)
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert digests(out) == digests(run_a)
    assert losses(out) == pytest.approx(losses(run_a), rel=1e-6, abs=1e-6)
