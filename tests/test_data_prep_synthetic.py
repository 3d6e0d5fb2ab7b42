"""The synthetic world in real formats runs through the real parsers and the command lines end to end."""
from __future__ import annotations

import json
import os
import shutil

from data_prep.pretrain import main as pretrain_main
from data_prep.sft.build import main as sft_main
from data_prep.synthetic import generate_world, world_texts
from pipeline.data.format import read_manifest
from pipeline.data.mixture import load_mixture


def listing(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), folder)] = f.read()
    return out


def test_world_is_deterministic(tmp_path):
    a = generate_world(str(tmp_path / "a"), seed=5, num_pretrain=8, num_sft=4, num_eval=4)
    generate_world(str(tmp_path / "b"), seed=5, num_pretrain=8, num_sft=4, num_eval=4)
    assert listing(tmp_path / "a") == listing(tmp_path / "b")
    assert listing(tmp_path / "a") != listing(generate_world(str(tmp_path / "c"), seed=6, num_pretrain=8,
                                                             num_sft=4, num_eval=4).root)
    assert os.path.isdir(a.kale)


def test_two_data_builds_of_one_seed_are_byte_identical(tmp_path):
    """What the quickstart builds from a seed (world, tokenizer, PT shards, SFT mixture) into its folder is the
    same bytes on every run, with several worker processes too."""
    from pipeline.model.tokenizer import build_tiny_tokenizer

    builds, root = [], tmp_path / "build"
    for _ in range(2):
        shutil.rmtree(root, ignore_errors=True)
        world = generate_world(str(root / "world"), seed=3, num_pretrain=16, num_sft=6, num_eval=0, per_tar=4)
        tokenizer = build_tiny_tokenizer(world_texts(seed=3, num_scenes=20), root / "tokenizer")
        common = ["--tokenizer", tokenizer, "--model-size", "tiny", "--workers", "2"]
        pretrain_main([world.kale, "--source", "kale", "--out", str(root / "data/pt"), "--tars-per-part", "1",
                       *common])
        sft_main(["--sources", world.sources_yaml, "--out", str(root / "data/sft"), "--seed", "3", *common])
        builds.append(listing(root))
    assert builds[0] == builds[1]
    assert sum(".mds" in path for path in builds[0]) > 4 and "data/sft/mixture.yaml" in builds[0]


def test_world_through_the_command_lines(tmp_path, tiny_tokenizer_path):
    world = generate_world(str(tmp_path / "world"), seed=0, num_pretrain=20, num_sft=10, num_eval=12, per_tar=8)
    common = ["--tokenizer", tiny_tokenizer_path, "--model-size", "tiny", "--workers", "1"]
    pretrain_main([world.kale, "--source", "kale", "--out", str(tmp_path / "pt/kale"), *common])
    pretrain_main([world.ocr200m, "--source", "ocr200m", "--out", str(tmp_path / "pt/ocr"), *common])
    kale, ocr = read_manifest(str(tmp_path / "pt/kale")), read_manifest(str(tmp_path / "pt/ocr"))
    assert kale.samples == 20 - 2 and not kale.skipped           # keys 6 and 13 are img2dataset failures
    assert ocr.samples > 0 and not ocr.skipped

    sft_main(["--sources", world.sources_yaml, "--out", str(tmp_path / "sft"), "--ratio", "vsr=0.05", *common])
    streams = load_mixture(str(tmp_path / "sft/mixture.yaml"))
    assert [name for name, _, _ in streams] == ["vqav2", "aokvqa", "llava150k", "vsr", "refcoco", "scienceqa", "vg"]
    regions = json.load(open(os.path.join(world.root, "vg/region_descriptions.json")))
    problems = json.load(open(os.path.join(world.root, "scienceqa/problems.json")))
    expected_skips = {"vqav2": {"missing_image": 1},                       # the question whose image is absent
                      "vg": {"corrupt_image": len(regions[-1]["regions"])}}   # the regions of the cut image
    for name, local, _ in streams:
        manifest = read_manifest(local)
        assert manifest.samples > 0 and manifest.skipped == expected_skips.get(name, {}), (name, manifest)
        assert manifest.license
    train = [p for p in problems.values() if p["split"] == "train"]
    assert read_manifest(str(tmp_path / "sft/scienceqa")).samples == len(train)          # every train problem
    assert sum(p["image"] is None for p in train) > len(train) / 2                       # most of them text-only
    assert read_manifest(str(tmp_path / "sft/vg")).samples == sum(len(r["regions"]) for r in regions[:-1])


def test_cv_bench_set_asks_what_the_sft_set_teaches(tmp_path):
    world = generate_world(str(tmp_path), seed=0, num_pretrain=0, num_sft=30, num_eval=30)
    rows = [json.loads(line) for f in ("test_2d.jsonl", "test_3d.jsonl")
            for line in open(os.path.join(world.cv_bench, f))]
    assert {r["task"] for r in rows} == {"Count", "Relation", "Color", "Depth"}
    assert {r["source"] for r in rows} == {"ADE20K", "COCO", "Omni3D"}
    for r in rows:
        assert set(r) >= {"idx", "type", "task", "question", "choices", "answer", "prompt", "filename", "source"}
        assert 2 <= len(r["choices"]) <= 4 and r["answer"] in [f"({c})" for c in "ABCD"[:len(r["choices"])]]
        assert os.path.isfile(os.path.join(world.cv_bench, r["filename"]))
    assert len({r["idx"] for r in rows}) == len(rows)
    sft = json.load(open(tmp_path / "aokvqa/aokvqa_v1p0_train.json"))
    sft_questions = {q["question"].split(" the ")[0] for q in sft}
    assert {r["question"].split(" the ")[0] for r in rows} <= sft_questions
    pope = [json.loads(line) for line in open(os.path.join(world.pope, "coco_pope_random.json"))]
    assert {p["label"] for p in pope} == {"yes", "no"} and pope[0]["question_id"] == 1


def test_world_texts_cover_the_prompts():
    texts = world_texts(seed=0, num_scenes=10)
    joined = "\n".join(texts)
    for needle in ("A chat between a curious user", "How many shapes are there?", "Options:\nA. ",
                   "Provide a short description for this region.", "shape"):
        assert needle in joined
