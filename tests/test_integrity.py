"""Damaged data is never trained on: shards carry hashes, downloads and cached copies are checked against
``index.json``, a damaged copy is downloaded once more, a shard damaged at the source stops the run naming
it (or is left out and counted), and out-of-range token or modality ids are refused naming the dataset,
the shard and the sample.

Remote datasets live in the suite's moto server (tests/s3_server.py); every epoch runs in this process over
datasets of a few 4 KiB shards.
"""
from __future__ import annotations

import gc
import json
from concurrent.futures import Future
from pathlib import Path

import pytest
import xxhash
from streaming.base.compression import decompress

from data_prep.writer import DatasetWriter
from fixtures_data import jpeg
from pipeline import chat
from pipeline.config import load_config
from pipeline.data.dataset import build_dataloader, build_dataset
from pipeline.data.format import Manifest, join_images
from pipeline.data.integrity import EXIT_CORRUPT, CorruptSampleError, CorruptShardError
from pipeline.model.sizes import get_model_size
from pipeline.model.tokenizer import tokenizer_fingerprint

TINY = get_model_size("tiny")
COLORS = ("red", "green", "blue", "white")


def write_hashed(folder: Path, tokenizer, n: int, source: str = "kale", bad_ids: dict | None = None) -> Path:
    """``n`` PT samples written by data_prep's DatasetWriter (zstd shards of ~5 samples, with hashes);
    ``bad_ids``: {sample index: (column, position, value)} written into those samples."""
    manifest = Manifest(source, TINY.num_visual_tokens, TINY.image_size, tokenizer_fingerprint(tokenizer),
                        chat.DEFAULT_LAYOUT)
    with DatasetWriter(str(folder), manifest, size_limit=1 << 12) as writer:
        for i in range(n):
            enc = chat.encode(tokenizer, chat.pretrain_segments(f"a {COLORS[i % 4]} square number {i}"),
                              TINY.num_visual_tokens)
            if i in (bad_ids or {}):
                column, position, value = bad_ids[i]
                getattr(enc, column)[position] = value
            images, lengths = join_images([jpeg(COLORS[i % 4], TINY.image_size)])
            writer.add({"input_ids": enc.input_ids, "modality_ids": enc.modality_ids, "images": images,
                        "image_lengths": lengths, "source": source, "id": f"{source}-{i}"})
    return folder


def shards_of(folder: Path) -> list[dict]:
    return json.loads((folder / "index.json").read_text())["shards"]


def upload(server, folder: Path, prefix: str) -> str:
    s3 = server.client()
    for path in sorted(folder.iterdir()):
        s3.upload_file(str(path), server.bucket, f"{prefix}/{path.name}")
    return server.url(prefix)


def config(tokenizer_path: str, datasets: str, cache: Path, *extra: str):
    return load_config("tiny_pt", [f"model.tokenizer={tokenizer_path}", f"data.datasets={datasets}",
                                   f"data.cache_dir={cache}", "data.num_workers=0", "data.shuffle=false",
                                   "data.collate=pad", "train.micro_batch_size=4", *extra])


def read_all(cfg, tokenizer) -> tuple[list[tuple[str, list[int]]], dict]:
    """Every sample of one epoch as (id, input_ids) in order, and the skips by (source, reason)."""
    dataset = build_dataset(cfg, tokenizer_fingerprint(tokenizer), check=False, num_token_ids=len(tokenizer))
    samples, skipped = [], {}
    for sample in dataset:
        if "skip" in sample:
            skipped[sample["source"], sample["skip"]] = skipped.get((sample["source"], sample["skip"]), 0) + 1
        else:
            samples.append((sample["id"], sample["input_ids"].tolist()))
    del dataset
    gc.collect()
    return samples, skipped


@pytest.fixture(scope="module")
def hashed(tmp_path_factory, tiny_tokenizer) -> Path:
    return write_hashed(tmp_path_factory.mktemp("hashed") / "kale", tiny_tokenizer, 24)


def test_shards_are_written_with_an_xxh64_of_every_file(hashed):
    shards = shards_of(hashed)
    assert len(shards) >= 4
    for shard in shards:
        for part in ("raw_data", "zip_data"):
            info = shard[part]
            data = (hashed / info["basename"]).read_bytes() if part == "zip_data" else \
                decompress("zstd", (hashed / shard["zip_data"]["basename"]).read_bytes())
            assert len(data) == info["bytes"] and info["hashes"] == {"xxh64": xxhash.xxh64(data).hexdigest()}


def decodable_corruption(blob: bytes, raw_bytes: int) -> bytes:
    """``blob`` (a zstd shard) with 8 bytes overwritten where it still decompresses to ``raw_bytes`` bytes:
    a damage that only the hash can see."""
    for offset in range(len(blob) // 2, len(blob) - 16):
        damaged = blob[:offset] + bytes(b ^ 0x5A for b in blob[offset:offset + 8]) + blob[offset + 8:]
        try:
            out = decompress("zstd", damaged)            # what streaming decompresses shards with
        except Exception:  # noqa: BLE001  (the decoder's own error type)
            continue
        if len(out) == raw_bytes:
            return damaged
    raise AssertionError("no decodable 8-byte corruption found")


def test_a_decodable_corruption_of_a_shard_object_is_detected_downloaded_again_and_named(
        hashed, tiny_tokenizer, tiny_tokenizer_path, tmp_path, s3_env, monkeypatch):
    url = upload(s3_env, hashed, "integrity/corrupt")
    shard = shards_of(hashed)[1]
    name = shard["zip_data"]["basename"]
    damaged = decodable_corruption((hashed / name).read_bytes(), shard["raw_data"]["bytes"])
    s3_env.client().put_object(Bucket=s3_env.bucket, Key=f"integrity/corrupt/{name}", Body=damaged)

    from pipeline.data.dataset import TrainingStream
    downloads = []
    real_download = TrainingStream._download_file
    monkeypatch.setattr(TrainingStream, "_download_file",
                        lambda self, basename, *a: downloads.append(basename) or real_download(self, basename, *a))
    cfg = config(tiny_tokenizer_path, f"[{{remote: {url}, name: kale}}]", tmp_path / "cache")
    dataset = build_dataset(cfg, tokenizer_fingerprint(tiny_tokenizer), check=False)
    first = shards_of(hashed)[0]["samples"]             # the first sample of the damaged shard
    with pytest.raises(CorruptShardError) as err:
        dataset.get_item(first)
    message = str(err.value)
    assert f"dataset 'kale' ({url}): shard {url}/{name} is corrupt after downloading it again" in message
    assert "xxh64 differs" in message and "\n" not in message
    assert downloads.count(name) == 2                   # downloaded once more, then refused
    del dataset
    gc.collect()

    # on_corrupt_shard=skip: the epoch goes on without the shard, its samples counted as dropped
    skip = config(tiny_tokenizer_path, f"[{{remote: {url}, name: kale}}]", tmp_path / "cache2",
                  "data.on_corrupt_shard=skip")
    dataset = build_dataset(skip, tokenizer_fingerprint(tiny_tokenizer), check=False)
    assert dataset.get_item(first) == {"skip": "corrupt_shard", "source": "kale", "id": ""}
    del dataset
    gc.collect()
    samples, skipped = read_all(skip, tiny_tokenizer)
    assert skipped == {("kale", "corrupt_shard"): shard["samples"]}
    assert len(samples) == 24 - shard["samples"]


def test_a_corrupt_shard_found_by_a_background_download_ends_the_process_with_its_line(monkeypatch):
    from pipeline import watchdog
    from pipeline.data.dataset import AKIStreamingDataset

    exits = []
    monkeypatch.setattr(watchdog, "exit_now", lambda message, status: exits.append((message, status)))
    future = Future()
    future.set_exception(CorruptShardError("dataset 'kale' (s3://b/kale): shard s3://b/kale/shard.00001.mds.zstd "
                                           "is corrupt after downloading it again"))
    AKIStreamingDataset.on_exception(object.__new__(AKIStreamingDataset), future)
    assert exits == [(str(future.exception()), EXIT_CORRUPT)]


def test_a_truncated_or_damaged_cached_shard_is_downloaded_again(hashed, tiny_tokenizer, tiny_tokenizer_path,
                                                                tmp_path, s3_env):
    url = upload(s3_env, hashed, "integrity/cached")
    cache = tmp_path / "cache"
    cfg = config(tiny_tokenizer_path, f"[{{remote: {url}}}]", cache)
    expected, skipped = read_all(cfg, tiny_tokenizer)
    assert len(expected) == 24 and skipped == {}
    raws = sorted(cache.rglob("shard.*.mds"))
    assert len(raws) == len(shards_of(hashed))
    sizes = {p: p.stat().st_size for p in raws}
    # a crash left one shard cut short under its real name, another with damaged bytes at its full size
    with open(raws[0], "r+b") as f:
        f.truncate(sizes[raws[0]] // 2)
    data = bytearray(raws[2].read_bytes())
    data[-40:-32] = bytes(b ^ 0xFF for b in data[-40:-32])
    raws[2].write_bytes(bytes(data))
    again, skipped = read_all(cfg, tiny_tokenizer)
    assert again == expected and skipped == {}
    assert {p: p.stat().st_size for p in raws} == sizes


def test_a_dataset_without_hashes_still_loads_checked_by_size(tiny_tokenizer, tiny_tokenizer_path, tmp_path):
    from dist_utils import write_dataset

    folder = Path(write_dataset(tmp_path / "old", tiny_tokenizer, "pt", 12, shard_size=1 << 12))
    assert all(s["raw_data"]["hashes"] == {} for s in shards_of(folder))
    cfg = config(tiny_tokenizer_path, f"[{{path: {folder}}}]", tmp_path / "cache")
    samples, skipped = read_all(cfg, tiny_tokenizer)
    assert len(samples) == 12 and skipped == {}
    shard = sorted(folder.glob("shard.*.mds"))[1]
    with open(shard, "r+b") as f:                       # an uncompressed local shard is its own only copy
        f.truncate(100)
    with pytest.raises(CorruptShardError, match=rf"shard {shard} is corrupt \(no other copy to read\): "
                                                rf"{shard.name}: 100 bytes instead of the \d+ of index.json"):
        read_all(cfg, tiny_tokenizer)
    gc.collect()


@pytest.mark.parametrize("column, value, problem", [
    ("input_ids", 10_000, r"token id 10000 at position 7 is outside the tokenizer's \d+ ids"),
    ("modality_ids", 7, r"modality id 7 at position 7"),
])
def test_out_of_range_ids_are_refused_naming_dataset_shard_and_sample(tiny_tokenizer, tiny_tokenizer_path, tmp_path,
                                                                      column, value, problem):
    folder = write_hashed(tmp_path / "ids", tiny_tokenizer, 12, source="ocr", bad_ids={7: (column, 7, value)})
    shards = shards_of(folder)
    shard = next(i for i, s in enumerate(shards) if sum(s["samples"] for s in shards[:i + 1]) > 7)
    index = 7 - sum(s["samples"] for s in shards[:shard])
    cfg = config(tiny_tokenizer_path, f"[{{path: {folder}, name: ocr}}]", tmp_path / "cache")
    with pytest.raises(CorruptSampleError, match=rf"dataset 'ocr' \({folder}\): shard "
                                                 rf"{shards[shard]['zip_data']['basename']}, sample {index} "
                                                 rf"\(record 'ocr-7'\): {problem}"):
        read_all(cfg, tiny_tokenizer)
    gc.collect()
    # in a batch: also refused through the loader (the check runs before any collation or embedding)
    loader = build_dataloader(cfg, tiny_tokenizer)
    with pytest.raises(CorruptSampleError, match="record 'ocr-7'"):
        list(loader)
    del loader
    gc.collect()
    samples, skipped = read_all(config(tiny_tokenizer_path, f"[{{path: {folder}, name: ocr}}]", tmp_path / "cache",
                                       "data.on_corrupt_shard=skip"), tiny_tokenizer)
    assert skipped == {("ocr", "corrupt_sample"): 1} and len(samples) == 11
