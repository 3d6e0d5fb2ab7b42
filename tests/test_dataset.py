"""The streaming loader over MDS shards: manifests, proportions, decoding, bad records, exact resume."""
from __future__ import annotations

import gc
import io

import pytest
import torch
import yaml
from PIL import Image
from streaming import MDSWriter

from pipeline import chat
from pipeline.config import ConfigError, DataPhase, DatasetSource, load_config
from pipeline.data.dataset import build_dataloader, resolve_sources
from pipeline.data.format import MDS_COLUMNS, Manifest, join_images
from pipeline.model.sizes import get_model_size
from pipeline.model.tokenizer import tokenizer_fingerprint
from pipeline.tokens import IMAGE

TINY = get_model_size("tiny")


def jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="JPEG")
    return buf.getvalue()


def write_dataset(folder, tokenizer, source, n, unreadable=(), extra_image=()):
    """``n`` PT samples (caption = source + index); broken records at the given indices."""
    with MDSWriter(out=str(folder), columns=MDS_COLUMNS, size_limit=1 << 14) as writer:
        for i in range(n):
            enc = chat.encode(tokenizer, chat.pretrain_segments(f"{source} {i}"), TINY.num_visual_tokens)
            jpegs = [b"not a jpeg" if i in unreadable else jpeg((10 * i % 255, 0, 0))]
            images, lengths = join_images(jpegs * (2 if i in extra_image else 1))
            writer.write({"input_ids": enc.input_ids, "modality_ids": enc.modality_ids, "images": images,
                          "image_lengths": lengths, "source": source, "id": f"{source}-{i}"})
    Manifest(source, TINY.num_visual_tokens, TINY.image_size, tokenizer_fingerprint(tokenizer), "released", samples=n).write(folder)
    return folder


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("mds")
    return {"a": write_dataset(root / "a", tiny_tokenizer, "alpha", 24),
            "b": write_dataset(root / "b", tiny_tokenizer, "beta", 24),
            "bad": write_dataset(root / "bad", tiny_tokenizer, "gamma", 8, unreadable={1}, extra_image={5})}


def config_for(*sources, collate="pad", seed=17, micro=4, extra=()):
    spec = ", ".join(f"{{path: {path}, proportion: {p}}}" for path, p in sources)
    return load_config("tiny_pt", [f"data.datasets=[{spec}]", f"data.collate={collate}",
                                   f"data.shuffle_seed={seed}", f"train.micro_batch_size={micro}", *extra])


def epoch(loader):
    return [batch for batch in loader]


def test_batches_are_decoded_and_collated(datasets, tiny_tokenizer):
    config = config_for((datasets["a"], 1), collate="pack", extra=["train.precision=bf16", "data.pack_tokens=96",
                                                                    "data.max_length=48"])
    loader = build_dataloader(config, tiny_tokenizer)
    assert loader.pin_memory == torch.cuda.is_available()     # pinned host batches wherever a GPU copies them
    batches = epoch(loader)
    assert sum(b["num_samples"] for b in batches) == 24
    for b in batches:
        n_img = b["pixel_values"].shape[0]
        assert b["input_ids"].shape[1] == 96                  # one static width: data.pack_tokens
        assert b["pixel_values"].dtype == torch.bfloat16       # shipped in the training dtype
        assert int((b["modality_ids"] == IMAGE).sum()) == n_img * TINY.num_visual_tokens == 4 * 4
        assert b["document_ids"] is not None and b["skipped"] == {}
    texts = {tiny_tokenizer.decode(row[row != tiny_tokenizer.pad_token_id]) for b in batches for row in b["input_ids"]}
    assert any("alpha 0" in t for t in texts)
    del loader
    gc.collect()


def test_proportions_mix_the_streams(datasets, tiny_tokenizer):
    loader = build_dataloader(config_for((datasets["a"], "75%"), (datasets["b"], "1/4")), tiny_tokenizer)
    sources = [s for b in epoch(loader) for s in b["sources"]]
    assert len(sources) == 48 and sources.count("alpha") == 36  # 48 samples drawn 3:1
    del loader
    gc.collect()


def test_bad_records_are_skipped_and_counted(datasets, tiny_tokenizer):
    loader = build_dataloader(config_for((datasets["bad"], 1)), tiny_tokenizer)
    batches = epoch(loader)
    skipped = {}
    for b in batches:
        for source, reasons in b["skipped"].items():
            for reason, n in reasons.items():
                skipped[source, reason] = skipped.get((source, reason), 0) + n
    assert skipped == {("gamma", "unreadable_image"): 1, ("gamma", "image_count_mismatch"): 1}
    assert sum(len(b["sources"]) for b in batches) == 6
    del loader
    gc.collect()


def test_shuffle_is_deterministic_from_the_seed(datasets, tiny_tokenizer):
    def order(seed):
        loader = build_dataloader(config_for((datasets["a"], 1), seed=seed), tiny_tokenizer)
        ids = [b["input_ids"][:, :12].tolist() for b in epoch(loader)]
        del loader
        gc.collect()
        return ids

    first = order(5)
    assert order(5) == first and order(6) != first


def test_resume_continues_at_the_exact_sample(datasets, tiny_tokenizer):
    config = config_for((datasets["a"], 1), collate="pack", seed=3)
    loader = build_dataloader(config, tiny_tokenizer)
    it = iter(loader)
    for _ in range(2):
        next(it)
    state = loader.state_dict()
    rest = [b["input_ids"].tolist() for b in it]
    del it, loader
    gc.collect()
    resumed = build_dataloader(config, tiny_tokenizer)
    resumed.load_state_dict(state)
    assert [b["input_ids"].tolist() for b in resumed] == rest and len(rest) == 4
    del resumed
    gc.collect()


def test_manifest_must_match_the_model(datasets, tiny_tokenizer, tmp_path):
    config = config_for((datasets["a"], 1))
    other = load_config("tiny_pt", [f"data.datasets=[{{path: {datasets['a']}}}]", "model.size=small"])
    with pytest.raises(ValueError, match=r"N=4 visual tokens .* model uses N=8"):
        build_dataloader(other, tiny_tokenizer)
    from pipeline.data.dataset import build_dataset
    with pytest.raises(ValueError, match="was tokenized with tokenizer .* rebuild it with data_prep/.*--tokenizer"):
        build_dataset(config, "0123456789abcdef")
    phi3 = load_config("tiny_pt", [f"data.datasets=[{{path: {datasets['a']}}}]", "model.text_layout=phi3_chat"])
    with pytest.raises(ValueError, match="holds text in layout 'released' .* --text-layout phi3_chat"):
        build_dataset(phi3, tokenizer_fingerprint(tiny_tokenizer))
    with pytest.raises(FileNotFoundError, match="manifest.json not found"):
        build_dataset(config_for((tmp_path, 1)), tokenizer_fingerprint(tiny_tokenizer))


def test_mixture_file_is_read_with_relative_folders(datasets, tmp_path):
    mixture = tmp_path / "mixture.yaml"
    mixture.write_text(yaml.safe_dump({"streams": [
        {"name": "alpha", "local": str(datasets["a"]), "proportion": 0.7},
        {"name": "beta", "local": str(datasets["b"]), "proportion": 0.3}]}))
    sources = resolve_sources(load_config("tiny_pt", [f"data.mixture={mixture}"]).data)
    assert [(s.name, s.local, s.proportion) for s in sources] == [
        ("alpha", str(datasets["a"]), 0.7), ("beta", str(datasets["b"]), 0.3)]
    mixture.write_text("streams: [{name: x, local: y}]")
    with pytest.raises(ConfigError, match="cannot read .*mixture.yaml"):
        resolve_sources(load_config("tiny_pt", [f"data.mixture={mixture}"]).data)


def test_image_columns_round_trip_empty_and_older_array_columns():
    import numpy as np

    from pipeline.data.format import split_images

    blob, lengths = join_images([b"ab", b"cde"])
    assert split_images(blob, lengths) == [b"ab", b"cde"]
    assert join_images([]) == (b"", b"") and split_images(b"", b"") == []          # a text-only sample
    assert split_images(b"abcde", np.array([2, 3], np.int32)) == [b"ab", b"cde"]     # folders written as ndarray
    with pytest.raises(ValueError, match="not a whole number of int32"):
        split_images(blob, lengths[:-1])


def captions(batches, tokenizer) -> list[str]:
    """The caption of every sample in ``batches`` (one per packed document or padded row)."""
    out = []
    for b in batches:
        for row, docs in zip(b["input_ids"], b["document_ids"] if b["document_ids"] is not None else b["input_ids"]):
            for d in sorted(set(docs.tolist()) - {0}) if b["document_ids"] is not None else [None]:
                ids = row[docs == d] if d is not None else row[row != tokenizer.pad_token_id]
                out.append(tokenizer.decode(ids[ids != tokenizer.pad_token_id], skip_special_tokens=True).strip())
    return out


def test_a_limited_stream_reads_the_same_seeded_samples_in_every_epoch_and_both_dot_orders(datasets, tiny_tokenizer):
    from pipeline.data.phases import PhasedLoader

    # 2 micro-batches of 4 samples per step, 2 steps per DOT order = 2 epochs of the 8-sample subset per order
    config = config_for((datasets["a"], 1), micro=4)
    config.data.datasets[0].samples = 8
    config.data.orders, config.train.total_steps = ["ti", "it"], 4
    started = []
    loader = PhasedLoader(config, tiny_tokenizer, on_start=started.append)
    seen = {step: captions(loader.micro_batches(step, 2), tiny_tokenizer) for step in range(4)}
    loader.close()
    assert [(s["phase"], s["order"], s["start_step"], s["epoch_samples"]) for s in started] == [
        ("data/ti", "ti", 0, 8), ("data/it", "it", 2, 8)]
    assert started[0]["streams"] == [{"path": str(datasets["a"]), "samples": 24, "per_epoch": 8}]
    for step in range(4):                          # an epoch is 8 distinct samples of the 24
        assert len(seen[step]) == len(set(seen[step])) == 8 and all(c.startswith("alpha") for c in seen[step])
    subset = set(seen[0])
    assert set(seen[1]) == set(seen[2]) == set(seen[3]) == subset   # the same 8, in each epoch and order
    assert seen[2] == seen[0] and seen[3] == seen[1]                # each order reads them in the same sequence
    other_seed = config_for((datasets["a"], 1), micro=4, seed=18)
    other_seed.data.datasets[0].samples = 8
    loader = PhasedLoader(other_seed, tiny_tokenizer)
    assert set(captions(loader.micro_batches(0, 2), tiny_tokenizer)) != subset
    loader.close()


def test_phased_loader_resumes_inside_the_second_phase_at_the_exact_sample(datasets, tiny_tokenizer):
    from pipeline.data.phases import PhasedLoader

    config = config_for((datasets["a"], 1), micro=4)
    config.data.datasets = None
    config.data.phases = [DataPhase("alpha", 0, datasets=[DatasetSource(str(datasets["a"]))]),
                          DataPhase("beta", 2, datasets=[DatasetSource(str(datasets["b"]), samples=12)])]
    config.train.total_steps = 6
    loader = PhasedLoader(config, tiny_tokenizer)
    first = {step: captions(loader.micro_batches(step, 1), tiny_tokenizer) for step in range(4)}
    state = loader.state_dict()
    rest = [captions(loader.micro_batches(step, 1), tiny_tokenizer) for step in (4, 5)]
    loader.close()
    assert all(c.startswith("alpha") for s in (0, 1) for c in first[s])
    assert all(c.startswith("beta") for batch in (first[2], first[3], *rest) for c in batch)
    assert state["phase"] == "beta" and state["loader"]["sample_in_epoch"] == 8
    resumed = PhasedLoader(config, tiny_tokenizer)
    resumed.load_state_dict(state, 4)
    assert [captions(resumed.micro_batches(step, 1), tiny_tokenizer) for step in (4, 5)] == rest
    # 12 of beta's 24 samples per epoch: step 4 ends the first epoch, step 5 starts the second
    assert len(set(first[2] + first[3] + rest[0])) == 12
    resumed.close()


def _register_together(tmp_path, guarded: bool, monkeypatch) -> list:
    """Two threads build a StreamingDataset each at the same moment (two jobs starting together): after
    streaming's last look-up of a free shared-memory prefix each waits (up to a second) for the other to
    have looked too, before either registers. Returns each one's dataset, or the error it raised."""
    import contextlib
    import threading

    import streaming.base.shared.prefix as prefix
    from streaming import StreamingDataset
    from streaming.base.constant import SHM_TO_CLEAN

    from pipeline.data.registration import one_registration_at_a_time

    folders = []
    for name in ("a", "b"):
        with MDSWriter(out=str(tmp_path / name), columns={"x": "int"}) as out:
            for i in range(3):
                out.write({"x": i})
        folders.append(str(tmp_path / name))
    find = prefix._check_and_find

    def find_together(streams_local, streams_remote, shm_name):
        found = find(streams_local, streams_remote, shm_name)
        if shm_name == SHM_TO_CLEAN[-1]:                               # the last look-up before registering
            with contextlib.suppress(threading.BrokenBarrierError):   # the other waits for the lock
                looked.wait(timeout=1.0)
        return found

    monkeypatch.setattr(prefix, "_check_and_find", find_together)
    start, looked, results = threading.Barrier(2), threading.Barrier(2), [None, None]

    def build(i: int) -> None:
        start.wait()
        try:
            with one_registration_at_a_time() if guarded else contextlib.nullcontext():
                results[i] = StreamingDataset(local=folders[i], batch_size=1)
        except FileExistsError as err:
            results[i] = err

    threads = [threading.Thread(target=build, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def test_datasets_registered_at_the_same_moment_get_their_own_shared_memory(tmp_path, monkeypatch):
    from streaming import StreamingDataset

    # streaming alone: both pick the same prefix and the later one fails (or, had it not, would share memory)
    plain = _register_together(tmp_path / "plain", guarded=False, monkeypatch=monkeypatch)
    assert any(isinstance(r, FileExistsError) and "_locals" in str(r) for r in plain), plain
    guarded = _register_together(tmp_path / "guarded", guarded=True, monkeypatch=monkeypatch)
    assert all(isinstance(r, StreamingDataset) for r in guarded), guarded
    assert guarded[0]._shm_prefix_int != guarded[1]._shm_prefix_int
    assert [len(r) for r in guarded] == [3, 3]
    del plain, guarded
    gc.collect()


def test_a_registration_lock_held_too_long_is_reported_and_not_waited_for_forever():
    import fcntl
    import os

    from pipeline.data.registration import lock_path, one_registration_at_a_time

    holder = os.open(lock_path(), os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)        # another job registering (or stuck)
        entered = False
        with pytest.warns(RuntimeWarning, match="held the dataset registration lock for 0 s; registering without it"):
            with one_registration_at_a_time(timeout_s=0.2):
                entered = True
        assert entered
    finally:
        os.close(holder)
