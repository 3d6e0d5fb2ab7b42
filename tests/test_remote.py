"""Datasets in S3-compatible object storage: prep uploads, resumes and merges in the bucket; training
reads the mixture and the manifests from it; a missing bucket or a wrong secret is one clear error.

Each test talks to a real S3 API: moto's standalone server on 127.0.0.1 (tests/s3_server.py), which
checks the request signatures. Training from the bucket (cache eviction, stop and exact resume) is in
tests/test_train_remote.py, the two-node launch there too.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from streaming import Stream, StreamingDataset

from data_prep import pretrain
from data_prep.pretrain import build_pretrain
from data_prep.sft.build import build_sft_mixture, read_sources_file
from data_prep.synthetic import generate_world
from data_prep.writer import DONE_MARKER, EncodeSettings
from pipeline.config import DataConfig, DatasetSource
from pipeline.data.dataset import check_data_access, resolve_sources
from pipeline.data.registration import one_registration_at_a_time
from pipeline.data.remote import RemoteError
from pipeline.recipes import ConfigError


def local_files(folder) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder).replace(os.sep, "/")] = open(path, "rb").read()
    return out


def bucket_files(server, prefix: str) -> dict[str, bytes]:
    s3 = server.client()
    return {key[len(prefix) + 1:]: s3.get_object(Bucket=server.bucket, Key=key)["Body"].read()
            for key in server.keys(prefix + "/")}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(str(tmp_path_factory.mktemp("world")), seed=2, num_pretrain=8, num_sft=6,
                          num_eval=0, per_tar=4)


def test_pretrain_prep_uploads_the_local_bytes_merges_in_the_bucket_and_resumes_without_duplicates(
        tmp_path, tiny_tokenizer_path, world, s3_env, monkeypatch):
    settings = EncodeSettings(tiny_tokenizer_path, "tiny", 128)
    local = build_pretrain([world.kale], str(tmp_path / "local"), "kale", settings, workers=1, tars_per_part=1)
    url, staging = s3_env.url("pt", "kale"), str(tmp_path / "staging")
    # Two array tasks: the first leaves the index unmerged, the second (last to finish) merges in the bucket.
    assert build_pretrain([world.kale], url, "kale", settings, workers=1, tars_per_part=1, job_index=0,
                          num_jobs=2, staging=staging) is None
    assert "pt/kale/index.json" not in s3_env.keys("pt/")
    merged = build_pretrain([world.kale], url, "kale", settings, workers=1, tars_per_part=1, job_index=1,
                            num_jobs=2, staging=staging)
    assert merged == local and merged.samples == 8
    expected = local_files(tmp_path / "local")
    assert {"index.json", "manifest.json", "part-00001/_DONE"} <= set(expected)
    assert bucket_files(s3_env, "pt/kale") == expected        # every shard, index and manifest, byte for byte

    # An interrupted part (its done marker never arrived) is redone under the same names; finished ones
    # are not touched, and the merge job (the command line, no job index) rewrites the merged index.
    s3_env.client().delete_object(Bucket=s3_env.bucket, Key=f"pt/kale/part-00001/{DONE_MARKER}")
    rebuilt, build_part = [], pretrain.build_part
    monkeypatch.setattr(pretrain, "build_part", lambda job: rebuilt.append(job.remote) or build_part(job))
    pretrain.main([world.kale, "--source", "kale", "--out", url, "--staging", staging, "--tokenizer",
                   tiny_tokenizer_path, "--model-size", "tiny", "--tars-per-part", "1", "--workers", "1"])
    assert rebuilt == [s3_env.url("pt", "kale", "part-00001")]
    assert bucket_files(s3_env, "pt/kale") == expected


def test_sft_mixture_in_a_bucket_is_read_back_by_training(tmp_path, tiny_tokenizer_path, world, s3_env):
    sources = read_sources_file(world.sources_yaml)
    sources = {k: sources[k] for k in ("vqav2", "llava150k")}
    settings = EncodeSettings(tiny_tokenizer_path, "tiny", 512)
    local_mixture = build_sft_mixture(sources, str(tmp_path / "local"), settings, ratios={"vqav2": 0.7,
                                                                                           "llava150k": 0.3})
    url = s3_env.url("sft")
    assert build_sft_mixture(sources, url, settings, ratios={"vqav2": 0.7, "llava150k": 0.3},
                             staging=str(tmp_path / "staging")) == url + "/mixture.yaml"
    assert bucket_files(s3_env, "sft") == local_files(tmp_path / "local")

    data = DataConfig(mixture=url + "/mixture.yaml", cache_dir=str(tmp_path / "cache"))
    remote = resolve_sources(data, data.cache_dir)
    assert [(s.name, s.remote) for s in remote] == [("vqav2", url + "/vqav2"), ("llava150k", url + "/llava150k")]
    assert all(s.local.startswith(str(tmp_path / "cache")) for s in remote)
    check_data_access(data)
    local = resolve_sources(DataConfig(mixture=local_mixture))
    assert [s.proportion for s in remote] == [s.proportion for s in local]

    def ids(sources):
        streams = [Stream(remote=s.remote, local=s.local, proportion=s.proportion) for s in sources]
        with one_registration_at_a_time():
            dataset = StreamingDataset(streams=streams, batch_size=1, shuffle=True, shuffle_seed=5)
        return [row["id"] for row in dataset]

    assert ids(remote) == ids(local)


def test_holdout_in_a_bucket_is_the_local_build_and_resolved_beside_each_dataset(tmp_path, tiny_tokenizer_path,
                                                                                 world, s3_env):
    from pipeline.data.format import heldout_path, read_manifest
    from pipeline.data.mixture import load_heldout

    settings = EncodeSettings(tiny_tokenizer_path, "tiny", 512)
    sources = {"vqav2": read_sources_file(world.sources_yaml)["vqav2"]}
    local = build_sft_mixture(sources, str(tmp_path / "sft"), settings, holdout=2)
    url = s3_env.url("held", "sft")
    build_sft_mixture(sources, url, settings, holdout=2, staging=str(tmp_path / "staging-sft"))
    assert bucket_files(s3_env, "held/sft") == local_files(tmp_path / "sft")
    assert "heldout/vqav2/_DONE" in local_files(tmp_path / "sft") and len(load_heldout(local)) == 1
    manifest = read_manifest(str(tmp_path / "sft/vqav2"))
    assert heldout_path(url + "/vqav2", manifest) == url + "/heldout/vqav2"

    pt = EncodeSettings(tiny_tokenizer_path, "tiny", 128)
    merged = build_pretrain([world.kale], str(tmp_path / "pt"), "kale", pt, workers=1, tars_per_part=1, holdout=0.3)
    url = s3_env.url("held", "pt")
    assert build_pretrain([world.kale], url, "kale", pt, workers=1, tars_per_part=1, holdout=0.3,
                          staging=str(tmp_path / "staging-pt")) == merged
    assert bucket_files(s3_env, "held/pt") == local_files(tmp_path / "pt")
    assert 0 < merged.heldout["samples"] < 8 and heldout_path(url, merged) == url + "/heldout"
    with one_registration_at_a_time():
        held = StreamingDataset(remote=heldout_path(url, merged), local=str(tmp_path / "cache"), batch_size=1,
                                shuffle=False)
    assert [row["id"] for row in held] == merged.heldout["ids"]


def test_missing_bucket_or_wrong_secret_is_one_clear_error(tmp_path, s3_env, monkeypatch):
    missing = DataConfig(datasets=[DatasetSource(remote="s3://no-such-bucket/pt")], cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="bucket 'no-such-bucket' does not exist"):
        check_data_access(missing)
    with pytest.raises(ConfigError, match=r"s3://aki-ci/nothing/here/manifest.json does not exist"):
        check_data_access(DataConfig(datasets=[DatasetSource(remote=s3_env.url("nothing", "here"))],
                                     cache_dir=str(tmp_path)))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(ConfigError, match="access denied .*AWS_SECRET_ACCESS_KEY") as err:
        check_data_access(DataConfig(datasets=[DatasetSource(remote=s3_env.url("pt"))], cache_dir=str(tmp_path)))
    assert "not-the-secret" not in str(err.value) and s3_env.secret_key not in str(err.value)
    with pytest.raises(RemoteError, match="access denied"):
        build_pretrain(["unused.tar"], s3_env.url("x"), "kale", EncodeSettings("unused", "tiny", 8))


# ---- the cache limit -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_shards(tmp_path_factory, tiny_tokenizer, s3_server) -> dict:
    """A 48-sample dataset in 4 KiB shards, as a local folder and in the bucket; its largest shard's bytes."""
    import json

    from dist_utils import write_dataset

    folder = write_dataset(tmp_path_factory.mktemp("small") / "pt", tiny_tokenizer, "pt", 48, shard_size=1 << 12)
    s3 = s3_server.client()
    for name in sorted(os.listdir(folder)):
        s3.upload_file(os.path.join(folder, name), s3_server.bucket, f"unit/pt/{name}")
    shards = json.loads(open(os.path.join(folder, "index.json")).read())["shards"]
    largest = max(s["raw_data"]["bytes"] for s in shards)
    return {"folder": folder, "url": s3_server.url("unit", "pt"), "largest": largest}


def _config(tiny_tokenizer_path, tmp_path, datasets: str, limit: int, workers: int = 0):
    from pipeline.config import load_config

    return load_config("tiny_pt", [f"model.tokenizer={tiny_tokenizer_path}", f"data.datasets={datasets}",
                                   f"data.cache_dir={tmp_path / 'cache'}", f"data.cache_limit={limit}b",
                                   f"data.num_workers={workers}", "data.predownload=2"])


def test_a_cache_limit_refuses_mixed_phases_and_too_few_shards_per_reader(small_shards, tiny_tokenizer_path, tmp_path,
                                                                          s3_env, monkeypatch):
    from pipeline.data.dataset import build_dataset

    mixed = f"[{{path: {small_shards['folder']}}}, {{remote: {small_shards['url']}}}]"
    with pytest.raises(ConfigError, match=r"mixes local folders \(pt\) with remote datasets"):
        build_dataset(_config(tiny_tokenizer_path, tmp_path, mixed, 64 * small_shards["largest"]), "", check=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    remote = f"[{{remote: {small_shards['url']}}}]"
    needed = 14 * small_shards["largest"]        # one rank with two loader workers: 2 x (2 x predownload 2 + 3)
    with pytest.raises(ConfigError, match=rf"2 reading process\(es\) per node.*at least {needed} bytes"):
        build_dataset(_config(tiny_tokenizer_path, tmp_path, remote, needed - 1, workers=2), "", check=False)
    dataset = build_dataset(_config(tiny_tokenizer_path, tmp_path, remote, needed, workers=2), "", check=False)
    assert dataset.cache_limit == needed


def test_a_remote_epoch_through_a_cache_of_seven_shards_evicts_and_reads_every_sample(small_shards, tiny_tokenizer_path,
                                                                                     tmp_path, s3_env):
    from pipeline.data.dataset import build_dataset

    limit = 7 * small_shards["largest"]                          # one reader, predownload 2: 2 x 2 + 3 shards
    local = build_dataset(_config(tiny_tokenizer_path, tmp_path, f"[{{path: {small_shards['folder']}}}]", limit), "",
                          check=False)
    expected = [s["id"] for s in local]
    remote = build_dataset(_config(tiny_tokenizer_path, tmp_path, f"[{{remote: {small_shards['url']}}}]", limit), "",
                           check=False)
    cache = tmp_path / "cache"

    def cached_bytes() -> int:
        total = 0
        for path in cache.rglob("shard.*.mds"):
            try:
                total += path.stat().st_size
            except FileNotFoundError:          # evicted while being listed
                pass
        return total

    seen, most = [], 0
    for sample in remote:
        seen.append(sample["id"])
        most = max(most, cached_bytes())
    assert seen == expected and len(set(seen)) == 48               # every sample, in the local folder's order
    assert 0 < most <= limit < sum(p.stat().st_size for p in Path(small_shards["folder"]).glob("shard.*.mds"))
    assert len(list(cache.rglob("shard.*.mds"))) < len(list(Path(small_shards["folder"]).glob("shard.*.mds")))


def test_the_trainer_stops_on_a_wrong_secret_with_one_error_before_any_distributed_work(
        small_shards, tiny_tokenizer_path, tmp_path, s3_env, monkeypatch, capsys):
    from pipeline import train

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    code = train.main(["--config", "tiny_pt", "--set", f"model.tokenizer={tiny_tokenizer_path}",
                       "--set", f"data.datasets=[{{remote: {small_shards['url']}}}]",
                       "--set", f"data.cache_dir={tmp_path / 'cache'}", "--output-dir", str(tmp_path / "run")])
    out = capsys.readouterr()
    assert code == 2 and out.err.count("error:") == 1 and "access denied" in out.err, out.err
    assert "AWS_SECRET_ACCESS_KEY" in out.err and "wrong-secret" not in out.err + out.out
    assert s3_env.secret_key not in out.err + out.out
    assert not (tmp_path / "run").exists()                     # nothing started: no run folder, no rank
