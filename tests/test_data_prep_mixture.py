"""mixture.yaml: Table 4 ratios, overrides, and the proportions StreamingDataset actually draws."""
from __future__ import annotations

from collections import Counter

import pytest
import yaml
from streaming import Stream, StreamingDataset

from data_prep.mixture import TABLE4_RATIOS, parse_ratio_overrides, read_ratio_yaml, resolve_ratios, write_mixture
from data_prep.sft.build import build_sft_mixture, read_sources_file
from data_prep.synthetic import generate_world
from data_prep.writer import EncodeSettings
from pipeline.data.mixture import load_mixture
from pipeline.data.registration import one_registration_at_a_time


def test_table4_ratios_sum_to_one_and_match_the_paper():
    assert sum(TABLE4_RATIOS.values()) == pytest.approx(1.0)
    assert TABLE4_RATIOS["vsr"] == 0.026 and TABLE4_RATIOS["vg"] == 0.047
    assert {k for k, v in TABLE4_RATIOS.items() if v == 0.103} == {
        "vqav2", "gqa", "ocrvqa", "aokvqa", "scienceqa", "refcoco", "refcoco+", "refcocog", "llava150k"}


def test_overrides_and_only_built_sources_are_listed(tmp_path):
    (tmp_path / "r.yaml").write_text("vsr: 0.2\n")
    overrides = {**read_ratio_yaml(str(tmp_path / "r.yaml")), **parse_ratio_overrides(["vqav2=0.6"])}
    ratios = resolve_ratios(["vqav2", "vsr", "gqa"], overrides)
    assert ratios == {"vqav2": 0.6, "vsr": 0.2, "gqa": 0.103}
    path = write_mixture(str(tmp_path), ratios, {"vqav2": 10, "vsr": 3, "gqa": 4})
    streams = load_mixture(path)
    assert [(n, p) for n, _, p in streams] == [("vqav2", pytest.approx(0.6 / 0.903, abs=1e-6)),
                                               ("vsr", pytest.approx(0.2 / 0.903, abs=1e-6)),
                                               ("gqa", pytest.approx(0.103 / 0.903, abs=1e-6))]
    assert streams[0][1] == str(tmp_path / "vqav2")
    assert yaml.safe_load(open(path))["streams"][1] == {"name": "vsr", "local": "vsr",
                                                        "proportion": pytest.approx(0.221484, abs=1e-6),
                                                        "ratio": 0.2, "samples": 3}


def test_bad_ratios_are_clear():
    with pytest.raises(ValueError, match="expected NAME=VALUE"):
        parse_ratio_overrides(["vsr"])
    with pytest.raises(ValueError, match="not among the built sources"):
        resolve_ratios(["vqav2"], {"gqa": 0.5})
    with pytest.raises(ValueError, match="has no Table 4 ratio; give one with --ratio mine=VALUE"):
        resolve_ratios(["mine"])


def test_streams_draw_their_proportions_over_an_epoch(tmp_path, tiny_tokenizer_path):
    world = generate_world(str(tmp_path / "world"), seed=1, num_pretrain=0, num_sft=8, num_eval=0)
    sources = read_sources_file(world.sources_yaml)
    path = build_sft_mixture({k: sources[k] for k in ("vqav2", "llava150k")}, str(tmp_path / "sft"),
                             EncodeSettings(tiny_tokenizer_path, "tiny", 512),
                             ratios={"vqav2": 0.7, "llava150k": 0.3})
    streams = [Stream(local=local, proportion=p) for _, local, p in load_mixture(path)]
    with one_registration_at_a_time():
        ds = StreamingDataset(streams=streams, batch_size=1, shuffle=True, shuffle_seed=3)
    drawn = Counter(sample["source"] for sample in ds)
    total = sum(drawn.values())
    assert drawn["vqav2"] / total == pytest.approx(0.7, abs=0.02)
    assert drawn["llava150k"] / total == pytest.approx(0.3, abs=0.02)


def test_bad_records_and_a_broken_source_never_stop_the_other_sources(tmp_path, tiny_tokenizer_path, capsys):
    import json

    from data_prep.sft.build import main as sft_main
    from pipeline.data.format import read_manifest
    from fixtures_data import write_image, write_json

    write_image(str(tmp_path / "gqa/images/a.jpg"))
    questions = {"1": {"imageId": "a", "question": "Is it red?", "answer": "yes"},
                 "2\ud800": {"imageId": "a", "question": "Is it blue?", "answer": "no"},   # the writer refuses its id
                 "3": {"imageId": "a", "question": "How many?", "answer": "1"}}
    (tmp_path / "gqa/questions.json").write_text(json.dumps(questions))
    write_image(str(tmp_path / "sqa/images/train/4/image.png"), fmt="PNG")
    problems = {str(pid): {"question": f"Which one {pid}?", "choices": ["a", "b"], "answer": pid % 2, "hint": "",
                           "image": "image.png" if pid == 4 else None, "split": "train"} for pid in range(1, 7)}
    (tmp_path / "sources.yaml").write_text(yaml.safe_dump({
        "gqa": {"questions": "gqa/questions.json", "images": "gqa/images"},
        "vqav2": {"questions": "vqav2/missing_questions.json", "annotations": "sources.yaml", "images": "gqa"},
        "scienceqa": {"problems": write_json(str(tmp_path / "sqa/problems.json"), problems),
                      "images": "sqa/images"}}, sort_keys=False))
    args = ["--sources", str(tmp_path / "sources.yaml"), "--out", str(tmp_path / "sft"),
            "--tokenizer", tiny_tokenizer_path, "--model-size", "tiny", "--workers", "2"]   # a worker pool
    with pytest.raises(SystemExit) as exit_:
        sft_main(args)
    assert exit_.value.code == 1
    out, err = capsys.readouterr()
    summary = out[out.index("summary:"):].splitlines()
    assert summary[1].startswith("  gqa: 2 samples") and summary[1].endswith("skipped 1 (write_error 1)")
    assert summary[2].startswith("  vqav2: FAILED") and "missing_questions.json" in summary[2]
    assert summary[3].startswith("  scienceqa: 6 samples") and summary[3].endswith("skipped 0")
    assert "source vqav2: `questions`" in err and not (tmp_path / "sft/mixture.yaml").exists()
    gqa = read_manifest(str(tmp_path / "sft/gqa"))
    assert gqa.samples == 2 and gqa.skipped == {"write_error": 1}
    assert "UnicodeEncodeError" in gqa.extra["skipped_examples"]["write_error"][0]
    assert read_manifest(str(tmp_path / "sft/scienceqa")).samples == 6      # 5 of them text-only

    sft_main(args + ["--only", "gqa,scienceqa"])          # the built sources are reused; the mixture is written
    assert [n for n, _, _ in load_mixture(str(tmp_path / "sft/mixture.yaml"))] == ["gqa", "scienceqa"]
    assert "already built" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exit_:
        sft_main(args + ["--only", "nope"])
    assert exit_.value.code == 2


# ---- held-out data (--holdout) -------------------------------------------------------------------------

def _hash(source, record_id):
    """The split's hash, written out here from its definition (data_prep/holdout.py docstring)."""
    import hashlib

    return int.from_bytes(hashlib.sha1(f"{source}\0{record_id}".encode()).digest()[:8], "big") / 2 ** 64


def _ids(folder):
    with one_registration_at_a_time():
        ds = StreamingDataset(local=str(folder), batch_size=1, shuffle=False)
    return [ds[i]["id"] for i in range(ds.num_samples)]


def _bytes(folder):
    import os

    return {os.path.relpath(os.path.join(root, n), folder): open(os.path.join(root, n), "rb").read()
            for root, _, names in os.walk(folder) for n in names}


@pytest.fixture(scope="module")
def holdout_world(tmp_path_factory):
    world = generate_world(str(tmp_path_factory.mktemp("holdout_world")), seed=4, num_pretrain=0, num_sft=8,
                           num_eval=0)
    sources = read_sources_file(world.sources_yaml)
    return {k: sources[k] for k in ("vqav2", "llava150k")}


def test_sft_holdout_is_the_same_on_every_rebuild_disjoint_and_listed(tmp_path, tiny_tokenizer_path, holdout_world):
    import json

    from pipeline.data.format import heldout_path, read_manifest
    from pipeline.data.mixture import load_heldout

    settings = EncodeSettings(tiny_tokenizer_path, "tiny", 512)
    ratios = {"vqav2": 0.5, "llava150k": 0.5}
    plain = build_sft_mixture(holdout_world, str(tmp_path / "plain"), settings, ratios=ratios)
    first = build_sft_mixture(holdout_world, str(tmp_path / "a"), settings, ratios=ratios, holdout=3)
    build_sft_mixture(holdout_world, str(tmp_path / "b"), settings, ratios=ratios, holdout="3", workers=2)

    # without --holdout: no held-out folder, no key in the manifests or the mixture
    assert not (tmp_path / "plain/heldout").exists() and load_heldout(plain) == []
    assert "heldout" not in yaml.safe_load(open(plain))
    assert "heldout" not in json.load(open(tmp_path / "plain/vqav2/manifest.json"))
    assert heldout_path(str(tmp_path / "plain/vqav2"), read_manifest(str(tmp_path / "plain/vqav2"))) is None

    held_entries = load_heldout(first)
    assert [(n, local) for n, local, _ in held_entries] == [("vqav2", str(tmp_path / "a/heldout/vqav2")),
                                                            ("llava150k", str(tmp_path / "a/heldout/llava150k"))]
    assert _bytes(tmp_path / "b") == _bytes(tmp_path / "a")        # another rebuild, 2 workers (before reading:
    for name, local, samples in held_entries:                     # streaming unpacks shards beside the index)
        held, train, everything = _ids(local), _ids(tmp_path / "a" / name), _ids(tmp_path / "plain" / name)
        assert not set(held) & set(train) and sorted(held + train) == sorted(everything)
        # the 3 records (questions; conversations for LLaVA, one sample per turn) with the smallest hashes
        records = sorted({i.split("-")[0] for i in everything}, key=lambda r: (_hash(name, r), r))[:3]
        assert sorted({i.split("-")[0] for i in held}) == sorted(records)
        manifest = read_manifest(str(tmp_path / "a" / name))
        assert manifest.heldout == {"path": f"../heldout/{name}", "samples": len(held), "spec": 3, "ids": held}
        assert samples == len(held) == read_manifest(local).samples and manifest.samples == len(train)
        assert heldout_path(str(tmp_path / "a" / name), manifest) == local
    assert len(_ids(tmp_path / "a/heldout/vqav2")) == 3                          # one sample per question
    assert [s for _, _, s in held_entries][1] > 3                                # several turns per conversation
    streams = yaml.safe_load(open(first))["streams"]
    assert [s["samples"] for s in streams] == [read_manifest(str(tmp_path / "a" / n)).samples for n in ratios]

    # a fraction: each record on its own, below the fraction → held out
    build_sft_mixture({"vqav2": holdout_world["vqav2"]}, str(tmp_path / "f"), settings, holdout=0.5)
    everything = _ids(tmp_path / "plain/vqav2")
    assert _ids(tmp_path / "f/heldout/vqav2") == [i for i in everything if _hash("vqav2", i) < 0.5]
    assert _ids(tmp_path / "f/vqav2") == [i for i in everything if _hash("vqav2", i) >= 0.5]


def test_sft_rebuild_with_another_holdout_is_refused_until_overwrite(tmp_path, tiny_tokenizer_path, holdout_world,
                                                                     capsys):
    from data_prep.sft.build import SourceFailed
    from pipeline.data.format import read_manifest

    settings = EncodeSettings(tiny_tokenizer_path, "tiny", 512)
    sources = {"vqav2": holdout_world["vqav2"]}
    build_sft_mixture(sources, str(tmp_path), settings, holdout=2)
    for other, shown in ((0.5, "--holdout 2 != 0.5"), (None, "--holdout 2 != (none)")):
        with pytest.raises(SourceFailed, match="already built with other settings") as err:
            build_sft_mixture(sources, str(tmp_path), settings, holdout=other)
        assert str(tmp_path / "vqav2") in str(err.value) and shown in str(err.value)
        assert "--overwrite" in str(err.value)
    build_sft_mixture(sources, str(tmp_path), settings, holdout=0.5, overwrite=True)
    assert read_manifest(str(tmp_path / "vqav2")).heldout["spec"] == 0.5


@pytest.mark.parametrize("spec", ["0", "-3", "1.5", "1.0", "0.0", "abc", "nan", ""])
def test_a_bad_holdout_is_one_clear_error_before_any_work(tmp_path, spec, capsys):
    from data_prep.holdout import parse_holdout
    from data_prep.sft.build import main as sft_main

    with pytest.raises(ValueError, match="--holdout takes a count .* or a fraction between 0 and 1"):
        parse_holdout(spec)
    with pytest.raises(SystemExit) as exit_:         # the sources file is never read, nothing is written
        sft_main(["--sources", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "out"), "--tokenizer", "x",
                  "--holdout", spec])
    assert exit_.value.code == 2 and "--holdout takes a count" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
