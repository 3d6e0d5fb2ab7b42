"""Pre-training shards: template, OCR level choice, bad data, parallel/resume determinism, round trip."""
from __future__ import annotations

import io
import json
import os

import pytest
from PIL import Image
from streaming import StreamingDataset

from data_prep.pretrain import CaptionOptions, build_pretrain, merge_parts
from data_prep.writer import EncodeSettings
from pipeline.data.format import read_manifest, split_images
from pipeline.data.registration import one_registration_at_a_time
from pipeline.tokens import IMAGE, TEXT_INPUT, TEXT_TARGET
from fixtures_data import img2dataset_sample, jpeg, mean_rgb, write_tar


@pytest.fixture()
def settings(tiny_tokenizer_path):
    return EncodeSettings(tiny_tokenizer_path, "tiny", 128)


def read_all(folder):
    with one_registration_at_a_time():
        ds = StreamingDataset(local=str(folder), batch_size=1, shuffle=False)
    return [ds[i] for i in range(ds.num_samples)]


def folder_bytes(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def kale_tars(root, n_tars=3, per_tar=3):
    colors = ["red", "green", "blue"]
    for t in range(n_tars):
        members = []
        for i in range(per_tar):
            key = f"{t * 10**4 + i * 2:09d}"                      # img2dataset keys, with gaps
            members += img2dataset_sample(key, f"  a {colors[(t + i) % 3]} square {t}{i}  ",
                                          jpeg(colors[(t + i) % 3]))
        write_tar(os.path.join(root, f"{t:05d}.tar"), members)
    return root


def test_pt_template_and_round_trip(tmp_path, settings, tiny_tokenizer):
    raw = kale_tars(str(tmp_path / "raw"), n_tars=2, per_tar=2)
    manifest = build_pretrain([raw], str(tmp_path / "out"), "kale", settings, workers=1, tars_per_part=1)
    rows = read_all(tmp_path / "out")
    assert [r["id"] for r in rows] == ["000000000", "000000002", "000010000", "000010002"]
    first = rows[0]
    mods = first["modality_ids"]
    assert list(mods[:5]) == [TEXT_INPUT] + [IMAGE] * 4 and set(mods[5:]) == {TEXT_TARGET}
    assert tiny_tokenizer.decode(first["input_ids"][mods == TEXT_TARGET]) == "a red square 00<|endofchunk|><|endoftext|>"
    for row, color in zip(rows, ["red", "green", "green", "blue"]):
        [img] = split_images(row["images"], row["image_lengths"])
        assert Image.open(io.BytesIO(img)).size == (32, 32)          # tiny: 32 px, bicubic
        assert max(abs(a - b) for a, b in zip(mean_rgb(img), {"red": (255, 0, 0), "green": (0, 255, 0),
                                                                "blue": (0, 0, 255)}[color])) < 12
    assert manifest.samples == 4 and manifest.num_visual_tokens == 4 and manifest.image_size == 32
    assert read_manifest(str(tmp_path / "out")).tokenizer_fingerprint == manifest.tokenizer_fingerprint
    assert "Apache-2.0" in manifest.license


def test_long_caption_is_truncated_to_max_text_tokens(tmp_path, tiny_tokenizer_path):
    write_tar(str(tmp_path / "raw/00000.tar"), img2dataset_sample("000000000", "red square " * 200, jpeg()))
    manifest = build_pretrain([str(tmp_path / "raw")], str(tmp_path / "out"), "kale",
                              EncodeSettings(tiny_tokenizer_path, "tiny", 20), workers=1)
    [row] = read_all(tmp_path / "out")
    assert int((row["modality_ids"] != IMAGE).sum()) == 20
    assert manifest.truncated == 1


def test_ocr200m_caption_chosen_by_granularity(tmp_path, settings, tiny_tokenizer):
    captions = [{"text": f"g{g} raw{int(r)}", "granularity": g, "include_datacomp_raw_cap": r}
                for r in (True, False) for g in (5, 1, 0)]             # stored order must not matter
    members = img2dataset_sample("000000000", json.dumps(captions), jpeg())
    members += img2dataset_sample("000000001", "not json", jpeg())
    write_tar(str(tmp_path / "raw/00000.tar"), members)
    for options, expected in [(CaptionOptions(), "g0 raw0"), (CaptionOptions(1, True), "g1 raw1")]:
        out = tmp_path / f"out{expected}"
        manifest = build_pretrain([str(tmp_path / "raw")], str(out), "ocr200m", settings, options, workers=1)
        [row] = read_all(out)
        text = tiny_tokenizer.decode(row["input_ids"][row["modality_ids"] == TEXT_TARGET])
        assert text == f"{expected}<|endofchunk|><|endoftext|>"
        assert manifest.skipped == {"malformed_record": 1}


def test_bad_data_is_counted_and_good_samples_kept(tmp_path, settings):
    good = jpeg("green")
    members = (img2dataset_sample("000000000", "good one", good)
               + img2dataset_sample("000000001", "corrupt image", b"\xff\xd8\xff\xe0 not really a jpeg")
               + img2dataset_sample("000000002", "truncated image", good[: len(good) // 2])
               + img2dataset_sample("000000003", "   ", good)
               + img2dataset_sample("000000004", b"\xff\xfe caption", good)
               + img2dataset_sample("000000005", "no image here", None)
               + img2dataset_sample("000000006", "good two", good))
    write_tar(str(tmp_path / "raw/00000.tar"), members)
    cut = img2dataset_sample("000010000", "good three", good) + img2dataset_sample("000010001", "cut", good * 3)
    write_tar(str(tmp_path / "raw/00001.tar"), cut, cut_inside="000010001.jpg")
    manifest = build_pretrain([str(tmp_path / "raw")], str(tmp_path / "out"), "kale", settings, workers=1,
                              tars_per_part=1)
    assert [r["id"] for r in read_all(tmp_path / "out")] == ["000000000", "000000006", "000010000"]
    assert manifest.samples == 3
    assert manifest.skipped == {"corrupt_image": 2, "empty_text": 1, "non_utf8_text": 1, "missing_image": 1,
                                "truncated_tar": 1}


def test_parallel_output_is_deterministic_and_resumable(tmp_path, settings):
    raw = kale_tars(str(tmp_path / "raw"), n_tars=4, per_tar=2)
    serial = tmp_path / "serial"
    build_pretrain([raw], str(serial), "kale", settings, workers=1, tars_per_part=1)
    again = tmp_path / "again"
    build_pretrain([raw], str(again), "kale", settings, workers=1, tars_per_part=1)
    assert folder_bytes(serial) == folder_bytes(again)

    # Two jobs share one folder; the first is "interrupted" in the middle of a part, then everything re-runs.
    resumed = tmp_path / "resumed"
    assert build_pretrain([raw], str(resumed), "kale", settings, workers=1, tars_per_part=1, job_index=0,
                          num_jobs=2) is None                                    # parts 0-1 done, no merge yet
    finished = os.path.getmtime(resumed / "part-00000" / "_DONE")
    os.makedirs(resumed / "part-00003")
    (resumed / "part-00003" / "shard.00000.mds.zstd").write_bytes(b"half written")
    manifest = build_pretrain([raw], str(resumed), "kale", settings, workers=2, tars_per_part=1)
    assert os.path.getmtime(resumed / "part-00000" / "_DONE") == finished         # finished part skipped
    assert folder_bytes(resumed) == folder_bytes(serial)                          # two workers, same bytes
    assert manifest.samples == 8 and manifest.extra["parts"] == 4
    # running the finished job again (e.g. a re-run of a whole pipeline) merges the same index again
    assert build_pretrain([raw], str(resumed), "kale", settings, workers=1, tars_per_part=1).samples == 8
    assert folder_bytes(resumed) == folder_bytes(serial)


def test_two_jobs_merging_the_same_parts_at_once_both_succeed(tmp_path, settings, monkeypatch):
    """Array tasks that finish together both see every part done and merge, and the merge job follows:
    a merge that starts while another is half-way must neither fail nor leave a mixed index."""
    import streaming.base.util

    raw = kale_tars(str(tmp_path / "raw"), n_tars=2, per_tar=2)
    out = tmp_path / "out"
    build_pretrain([raw], str(out), "kale", settings, workers=1, tars_per_part=1)
    expected = folder_bytes(out)
    folders = [str(out / "part-00000"), str(out / "part-00001")]
    real_merge, calls = streaming.base.util.merge_index, []

    def merge_with_another_job_inside(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:          # the other job runs its whole merge in the middle of this one
            assert merge_parts(str(out), folders).samples == 4
        return real_merge(*args, **kwargs)

    monkeypatch.setattr(streaming.base.util, "merge_index", merge_with_another_job_inside)
    assert merge_parts(str(out), folders).samples == 4
    assert len(calls) == 2
    assert folder_bytes(out) == expected                        # one index, one manifest, no leftovers


def test_unknown_source_and_missing_input_are_clear(tmp_path, settings):
    with pytest.raises(ValueError, match="unknown pre-training source 'laion'; known: kale, ocr200m"):
        build_pretrain([str(tmp_path)], str(tmp_path / "o"), "laion", settings)
    with pytest.raises(FileNotFoundError, match="no .tar files found"):
        build_pretrain([str(tmp_path)], str(tmp_path / "o"), "kale", settings)


def test_finished_parts_built_with_other_settings_are_not_reused(tmp_path, settings, tiny_tokenizer_path):
    raw = kale_tars(str(tmp_path / "raw"), n_tars=1, per_tar=1)
    build_pretrain([raw], str(tmp_path / "out"), "kale", settings, workers=1)
    with pytest.raises(ValueError, match="already built with other settings .*num_visual_tokens 4 != 8"):
        build_pretrain([raw], str(tmp_path / "out"), "kale", EncodeSettings(tiny_tokenizer_path, "small", 128),
                       workers=1)


# ---- held-out data (--holdout FRACTION) ----------------------------------------------------------------

def key_hash(key):
    """The split's hash, written out here from its definition (data_prep/holdout.py docstring)."""
    import hashlib

    return int.from_bytes(hashlib.sha1(f"kale\0{key}".encode()).digest()[:8], "big") / 2 ** 64


def test_holdout_is_the_same_for_any_workers_and_parts_and_disjoint(tmp_path, settings):
    from pipeline.data.format import heldout_path

    raw = kale_tars(str(tmp_path / "raw"), n_tars=4, per_tar=3)
    build_pretrain([raw], str(tmp_path / "two"), "kale", settings, workers=2, tars_per_part=1, holdout=0.4)
    one = build_pretrain([raw], str(tmp_path / "one"), "kale", settings, workers=1, tars_per_part=1,
                         holdout="0.4")
    whole = build_pretrain([raw], str(tmp_path / "whole"), "kale", settings, workers=1, tars_per_part=4,
                           holdout=0.4)
    assert folder_bytes(tmp_path / "two") == folder_bytes(tmp_path / "one")     # before reading (unpacked shards)
    for out in ("one", "whole"):              # each index lists its own parts' shards only
        for index, parts in (("index.json", tmp_path / out), ("heldout/index.json", tmp_path / out / "heldout")):
            shards = [s["zip_data"]["basename"] for s in json.load(open(tmp_path / out / index))["shards"]]
            assert shards and all(s.startswith("part-") and (parts / s).is_file() for s in shards)

    everything = [f"{t * 10**4 + i * 2:09d}" for t in range(4) for i in range(3)]
    expected = [k for k in everything if key_hash(k) < 0.4]
    assert 0 < len(expected) < len(everything)
    for out, manifest in (("one", one), ("whole", whole)):
        held = [r["id"] for r in read_all(tmp_path / out / "heldout")]
        train = [r["id"] for r in read_all(tmp_path / out)]
        assert held == expected and train == [k for k in everything if k not in expected]
        assert manifest.heldout == {"path": "heldout", "samples": len(held), "spec": 0.4, "ids": held}
        assert manifest.samples == len(train) and read_manifest(str(tmp_path / out)) == manifest
        assert read_manifest(str(tmp_path / out / "heldout")).samples == len(held)
        assert heldout_path(str(tmp_path / out), manifest) == str(tmp_path / out / "heldout")
    part = read_manifest(str(tmp_path / "one/part-00001"))
    assert part.heldout["path"] == "../heldout/part-00001"
    assert heldout_path(str(tmp_path / "one/part-00001"), part) == str(tmp_path / "one/heldout/part-00001")
    assert [r["input_ids"].tolist() for r in read_all(tmp_path / "one/heldout")] == [
        r["input_ids"].tolist() for r in read_all(tmp_path / "whole/heldout")]

    # a finished folder is never reused with another --holdout, nor without one
    for other, shown in ((0.2, "--holdout 0.4 != 0.2"), (None, "--holdout 0.4 != (none)")):
        with pytest.raises(ValueError, match="already built with other settings") as err:
            build_pretrain([raw], str(tmp_path / "one"), "kale", settings, workers=1, tars_per_part=1, holdout=other)
        assert shown in str(err.value) and str(tmp_path / "one/part-00000") in str(err.value)


def test_pretrain_holdout_takes_a_fraction_only(tmp_path, settings, capsys):
    from data_prep.pretrain import main

    with pytest.raises(ValueError, match="--holdout 100: pre-training sources take a fraction"):
        build_pretrain([str(tmp_path)], str(tmp_path / "o"), "kale", settings, holdout=100)
    for spec, shown in (("100", "take a fraction"), ("1.5", "--holdout takes a count"), ("x", "--holdout takes")):
        with pytest.raises(SystemExit) as exit_:
            main([str(tmp_path / "none"), "--source", "kale", "--out", str(tmp_path / "o"), "--tokenizer", "x",
                  "--holdout", spec])
        assert exit_.value.code == 2 and shown in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
