"""A's recipe (tests/test_train.py) with both datasets in an S3 bucket (moto on 127.0.0.1), 2 ranks:

* outage — streamed through a small evicting cache: a storage blip ridden out, an outage that ends the run,
  then ``--resume auto`` on an emptied cache past a damaged newer checkpoint: A's losses, data and weights,
  and no secret on disk;
* two nodes — the same recipe from ``slurm/pretrain.sbatch`` on two "nodes" of one rank each, USR1 → requeue.

Its own module so that the suite's two workers (one module each at a time) share the training tests; the
datasets and run A are tests/test_train.py's, made once for every module.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import checkpoint as ckpt
from pipeline.metrics import read_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_utils import REPO, free_port, show  # noqa: E402
from test_train import PT, digests, losses, pt_phases, run_a, train, world  # noqa: E402,F401 (fixtures)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bucket(world, s3_server) -> dict:
    """Run A's two datasets uploaded to the S3 bucket: {phase: URL}, and {phase: [shard bytes]} as "shards"."""
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


def _steps_logged(out: Path) -> int:
    try:
        return len(read_metrics(out)) if (out / "metrics.jsonl").exists() else 0
    except ValueError:                  # a line being written
        return 0


def test_two_nodes_train_like_one_and_survive_usr1_save_requeue_resume(run_a, world, s3_server, bucket, tmp_path):
    """slurm/pretrain.sbatch on 2 nodes x 1 CPU rank, through tests/fake_slurm.py as srun and scontrol
    (slurm/README.md says why not two slurmd): c10d rendezvous on the first node, a cache per node."""
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
    """A's recipe streamed from the bucket through tests/s3_server.Relay and a small evicting cache. The
    endpoint cuts and resets connections for a blip after step 1 (the downloads retried: the run goes on),
    then refuses them for good after step 3 (past the 3 attempts of ``data.download_retry``: the ranks exit
    non-zero with one line naming the endpoint). ``--resume auto`` with the storage back, on an emptied
    cache and past a newer checkpoint damaged mid-write, finishes the run with A's losses, data and weights,
    every step once, and no secret on disk or in the logs."""
    from s3_server import Relay

    from pipeline.data.remote import cache_folder

    squares = bucket["shards"]["squares"]
    limit = 14 * max(max(b) for b in bucket["shards"].values())   # 2 ranks x (2 x predownload 2 + 3) shards
    assert len(squares) >= 24 and limit < sum(squares)
    relay, out, cache = Relay(s3_server.endpoint), world["root"] / "outage", world["root"] / "outage-cache"
    args = remote_args(world, bucket) + ["--set", f"data.cache_dir={cache}", "--set", f"data.cache_limit={limit}b",
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
    assert "is deprecated" not in log, log[-4000:]         # no per-step deprecation warnings flooding the log
    stopped = max(losses(out))
    assert 3 <= stopped < 6 and relay.resets >= 1
    assert ckpt.latest_complete(out) is not None, log[-4000:]
    cached = [p.stat().st_size for p in Path(cache_folder(bucket["squares"], str(cache))).glob("shard.*.mds")]
    assert 0 < sum(cached) <= limit and len(cached) < len(squares), "the cache outgrew its limit"

    # a newer checkpoint damaged mid-write (no COMPLETE marker, a truncated shard) must be passed over
    damaged = ckpt.checkpoints_root(out) / ckpt.step_tag(stopped + 1)
    shutil.copytree(ckpt.latest_complete(out), damaged)
    (damaged / ckpt.COMPLETE).unlink()
    shard = next(damaged.glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])

    relay.up()
    shutil.rmtree(cache)                                         # resumed on a node with an empty cache
    _, second = train(world, "outage", args[:-2] + ["--resume", "auto"],
                      env={**s3_server.env(), "S3_ENDPOINT_URL": relay.endpoint, "WANDB_MODE": "offline"})
    relay.close()
    assert second.returncode == 0, show(second)
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert digests(out) == digests(run_a)                        # the local folders' samples, step for step
    assert losses(out) == pytest.approx(losses(run_a), rel=1e-6, abs=1e-6)
    assert (out / "export" / "model.safetensors").read_bytes() == (run_a / "export" / "model.safetensors").read_bytes()
    secret = s3_server.secret_key.encode()
    leaked = [p for p in out.rglob("*") if p.is_file() and secret in p.read_bytes()]
    assert not leaked and secret.decode() not in log + second.stdout + second.stderr, leaked
