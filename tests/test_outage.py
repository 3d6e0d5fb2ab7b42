"""Failures that must end a run, or be counted, instead of hanging it or passing silently.

* storage: a download retries a blip (through :class:`s3_server.Relay`, which cuts and restores the
  suite's S3 endpoint without losing its objects) and names the endpoint past ``data.download_retry``;
  a shard missing from the bucket stops a run with one line naming it. (A 2-rank run that rides out a
  blip, ends on a longer outage and resumes exactly is in tests/test_train_remote.py, beside its bucket runs.)
* the step watchdog: a rank stalled in its forward → every rank prints its stacks and exits non-zero;
* dropped samples: a 2-rank run over records with undecodable images and wrong image counts reports
  them per source, summed over the ranks, and stops past ``data.max_skip_fraction``.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_utils import jpeg, show, torchrun  # noqa: E402
from s3_server import Relay  # noqa: E402

from pipeline.metrics import MIN_DROPPED_TO_STOP, DroppedSamples, read_metrics  # noqa: E402

pytestmark = pytest.mark.slow
TINY = ["--config", "tiny_pt", "--set", "train.log_every=1", "--set", "train.save_every=100"]


def _wait_until(condition, timeout: float = 60) -> None:
    """Poll ``condition()`` (a guard against a hang: the tests never assert on the time taken)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never met"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_tokenizer, s3_server) -> dict:
    """A 64-sample PT dataset in 2 KiB shards, in the bucket with one of its shards deleted."""
    from dist_utils import write_dataset

    folder = Path(write_dataset(tmp_path_factory.mktemp("outage") / "pt", tiny_tokenizer, "pt", 64,
                                shard_size=1 << 11))
    s3 = s3_server.client()
    for path in sorted(folder.iterdir()):
        s3.upload_file(str(path), s3_server.bucket, f"outage/lost/{path.name}")
    index = json.loads((folder / "index.json").read_text())["shards"]
    lost = index[len(index) // 2]["raw_data"]["basename"]
    s3.delete_object(Bucket=s3_server.bucket, Key=f"outage/lost/{lost}")
    return {"url": s3_server.url("outage", "lost"), "lost": s3_server.url("outage", "lost", lost)}


# ---- downloads ------------------------------------------------------------------------------------------

def test_a_download_retries_a_blip_and_names_the_endpoint_past_the_last_attempt(tmp_path, s3_env, shards,
                                                                                   monkeypatch):
    from pipeline.data import remote

    relay = Relay(s3_env.endpoint)
    monkeypatch.setenv("S3_ENDPOINT_URL", relay.endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")          # one connection per attempt: the relay counts them
    remote.configure_retries(3, 5)
    url, local = shards["url"] + "/index.json", str(tmp_path / "index.json")
    try:
        relay.down("reset")                                 # connections reset on arrival ...
        threading.Thread(target=lambda: _wait_until(lambda: relay.resets >= 2) or relay.up(), daemon=True).start()
        remote.download(url, local)                         # ... for two attempts, then the third succeeds
        assert relay.resets == 2
        assert Path(local).read_bytes() == s3_env.client().get_object(
            Bucket=s3_env.bucket, Key="outage/lost/index.json")["Body"].read()

        with pytest.raises(remote.RemoteError, match="does not exist"):     # not transient: no retry
            remote.download(shards["lost"], local)
        assert relay.resets == 2

        relay.down("refuse")                                # the endpoint gone for longer than 3 attempts
        with pytest.raises(remote.StorageUnavailable) as err:
            remote.download(url, local)
        assert f"{url}: object storage at {relay.endpoint} failed 3 attempt(s)" in str(err.value)
        assert "\n" not in str(err.value)
    finally:
        remote.configure_retries(remote.DEFAULT_DOWNLOAD_RETRY, remote.DEFAULT_DOWNLOAD_TIMEOUT)
        relay.close()


def test_a_shard_missing_from_the_bucket_is_one_line_naming_it(tmp_path, s3_server, shards, tiny_tokenizer_path):
    proc = torchrun(["pipeline.train", *TINY, "--output-dir", str(tmp_path / "run"),
                     "--set", f"model.tokenizer={tiny_tokenizer_path}",
                     "--set", f"data.datasets=[{{remote: {shards['url']}}}]",
                     "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "train.total_steps=8"], 1,
                    env={**s3_server.env(), "WANDB_MODE": "disabled"})
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, show(proc)
    errors = [line[line.index("error: "):] for line in log.splitlines() if "error: [rank" in line]
    assert errors == [f"error: [rank 0] {shards['lost']} is missing from the object storage at {s3_server.endpoint} "
                      "(listed in the dataset's index.json): restore it or write the dataset again with data_prep; "
                      "this process exits with status 75 (the run continues from its last checkpoint with "
                      "--resume auto)"], show(proc)
    assert "Background thread failed" not in log and "gloo" not in log.lower(), show(proc)
    assert log.count(shards["lost"]) == 2, show(proc)      # the line, and the launcher's summary of the failure


# ---- the step watchdog -------------------------------------------------------------------------------

def test_a_stalled_rank_makes_every_rank_dump_its_stacks_and_exit(tmp_path, tiny_tokenizer_path):
    from dist_utils import write_dataset
    from pipeline.model.tokenizer import load_tokenizer

    data = write_dataset(tmp_path / "pt", load_tokenizer(tiny_tokenizer_path), "pt", 16)
    out = tmp_path / "run"
    proc = torchrun(["tests/dist_utils.py", "probe", str(out / "probe"), "--", *TINY, "--output-dir", str(out),
                     "--set", f"model.tokenizer={tiny_tokenizer_path}", "--set", f"data.datasets=[{{path: {data}}}]",
                     "--set", "train.step_timeout=10"], 2,
                    # each rank's output in its own file (torchrun's --log-dir/--redirects): the two ranks dump
                    # their stacks at the same moment, which would interleave on one console
                    env={"WANDB_MODE": "disabled", "AKI_TEST_STALL": "1:2", "PET_LOG_DIR": str(tmp_path / "logs"),
                         "PET_REDIRECTS": "3"}, module=False)
    assert proc.returncode != 0, show(proc)
    assert len(read_metrics(out)) == 1                                  # step 1 done, step 2 stalled on rank 1
    logs = {rank: "".join(p.read_text() for p in (tmp_path / "logs").rglob(f"attempt_0/{rank}/std*.log"))
            for rank in (0, 1)}
    for rank, log in logs.items():
        assert (f"error: [rank {rank}] no training step finished within 10 s after step 1 (train.step_timeout)"
                in log), log[-3000:]
        assert log.count("Current thread 0x") == 1, log[-3000:]    # its watchdog thread, with the others':
        assert "in forward_backward" in log, log[-3000:]          # the main thread inside step 2's forward,
    assert "in stalled" in logs[1]                              # rank 1 asleep in the injected stall


# ---- dropped samples -----------------------------------------------------------------------------------

def _write_damaged(folder: Path, tokenizer, n: int) -> None:
    """``n`` PT records, sources "web" (even) and "books" (odd); every 4th an undecodable image ("web"),
    every 4th + 1 two images for one image slot ("books")."""
    from streaming import MDSWriter

    from pipeline import chat
    from pipeline.data.format import MDS_COLUMNS, Manifest, join_images
    from pipeline.model.tokenizer import tokenizer_fingerprint

    manifest = Manifest(source="pt", num_visual_tokens=4, image_size=32,
                        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), text_layout=chat.DEFAULT_LAYOUT)
    with MDSWriter(out=str(folder), columns=MDS_COLUMNS, size_limit=1 << 14) as writer:
        for i in range(n):
            enc = chat.encode(tokenizer, chat.pretrain_segments("a red square"), 4)
            images = [b"not a jpeg" if i % 4 == 0 else jpeg("red", 32)] * (2 if i % 4 == 1 else 1)
            blob, lengths = join_images(images)
            writer.write({"input_ids": enc.input_ids, "modality_ids": enc.modality_ids, "images": blob,
                          "image_lengths": lengths, "source": "web" if i % 2 == 0 else "books", "id": str(i)})
            manifest.samples += 1
    manifest.write(folder)


def test_dropped_samples_are_reported_per_source_summed_over_ranks_and_stop_the_run(tmp_path, tiny_tokenizer,
                                                                                     tiny_tokenizer_path):
    _write_damaged(tmp_path / "damaged", tiny_tokenizer, 32)
    out = tmp_path / "run"
    proc = torchrun(["pipeline.train", *TINY, "--output-dir", str(out),
                     "--set", f"model.tokenizer={tiny_tokenizer_path}",
                     "--set", f"data.datasets=[{{path: {tmp_path / 'damaged'}}}]", "--set", "train.total_steps=8",
                     "--set", "data.max_skip_fraction=0.3"], 2, env={"WANDB_MODE": "disabled"})
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "data.max_skip_fraction=0.3" in log, show(proc)
    records = read_metrics(out)
    summary = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
               if json.loads(line).get("event") == "dropped_samples"]
    assert len(summary) == 1 and summary[0]["step"] == records[-1]["step"] < 8
    totals: dict = {}
    for r in records:        # per step, over both ranks; a source drops only for its own damage
        assert r["dropped"] == sum(n for reasons in r["dropped_by_source"].values() for n in reasons.values())
        assert set(r["dropped_by_source"].get("web", {})) <= {"unreadable_image"}
        assert set(r["dropped_by_source"].get("books", {})) <= {"image_count_mismatch"}
        for source, reasons in r["dropped_by_source"].items():
            for reason, n in reasons.items():
                totals.setdefault(source, {}).setdefault(reason, 0)
                totals[source][reason] += n
    s = summary[0]
    assert s["by_source"] == totals and set(totals) == {"web", "books"}
    assert s["read"] == 8 * len(records) and s["dropped"] == sum(r["dropped"] for r in records) >= MIN_DROPPED_TO_STOP
    assert s["dropped"] > 0.3 * s["read"]
    assert (f"dropped samples: {s['dropped']} of {s['read']} read" in log
            and f"books: image_count_mismatch {totals['books']['image_count_mismatch']}" in log), show(proc)


def test_the_dropped_share_stops_a_run_only_past_the_threshold_and_enough_drops():
    batch = {"skipped": {"web": {"unreadable_image": 3}}}
    counter = DroppedSamples(max_fraction=0.1)
    assert counter.add([batch], read=40, dropped=3) == {"web": {"unreadable_image": 3}}
    assert counter.too_many() is None                      # 7.5 %
    counter.add([{"skipped": {"web": {"unreadable_image": 3}, "": {"over_max_length": 3}}}], read=20, dropped=6)
    assert counter.total == 9 and counter.too_many() is None   # 15 %, but fewer than MIN_DROPPED_TO_STOP drops
    counter.add([{"skipped": {"books": {"image_count_mismatch": 1}}}], read=10, dropped=1)
    assert "10 of the 70 samples read were dropped (14.3% > data.max_skip_fraction=0.1)" in counter.too_many()
    again = DroppedSamples(None)
    again.load_state_dict(counter.state_dict())
    assert again.summary(7) == (counter.summary(7)[0], counter.summary(7)[1]) and again.too_many() is None
    assert counter.summary(7)[1] == ("dropped samples: 10 of 70 read (14.29%): (no source): over_max_length 3; "
                                     "books: image_count_mismatch 1; web: unreadable_image 6")
    assert counter.add([{"skipped": {}}], read=8, dropped=0) == {} and counter.read == 78


def test_the_new_keys_are_checked_and_validation_does_not_import_the_config_module():
    import subprocess

    from pipeline.config import ConfigError, load_config

    for key, value, message in (("data.download_retry", 0, "must be >= 1"), ("data.download_timeout", 0, "must be > 0"),
                                ("data.max_skip_fraction", 1.5, r"must be in \[0, 1\)"),
                                ("train.step_timeout", -1, "must be >= 0")):
        with pytest.raises(ConfigError, match=f"`{key}` {message}"):
            load_config("tiny_pt", [f"{key}={value}"])
    assert load_config("tiny_pt", ["train.step_timeout=0", "data.max_skip_fraction=null"]).train.step_timeout == 0
    # one direction only: pipeline.config imports pipeline.validation, never the other way round
    code = "import sys, pipeline.validation; sys.exit('pipeline.config' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1]).returncode == 0
