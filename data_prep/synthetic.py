"""Write the synthetic world (:mod:`data_prep.synthetic_world`) in the datasets' real raw formats.

    python -m data_prep.synthetic --out DIR [--seed 0] [--pretrain 512] [--sft 256] [--eval 96]

``DIR`` then holds what a user would download, so the real parsers run end to end on it::

    pt/kale/00000.tar …        img2dataset webdataset tars (9-digit keys, .jpg/.txt/.json, _stats.json)
    pt/ocr200m/00000.tar …     same, .txt = OCR-200m ``captions`` JSON list (granularities 0-5 × raw flag)
    coco/train2014/, coco/train2017/   images under COCO names
    vqav2/  aokvqa/  llava/  vsr/  refcoco/   SFT files in their original formats
    scienceqa/                 problems.json + pid_splits.json; most problems text-only (no image), as released
    vg/                        region_descriptions.json + image_data.json, images in VG_100K/ and VG_100K_2/
    sources.yaml               the sources file for data_prep/build_sft_mixture.py

The SFT files carry the records users hit in the real downloads, so every quickstart builds them:
ScienceQA problems without an image (most of them) and unicode text, which are kept; a VQAv2 question
whose image is missing (skipped as ``missing_image``) and a Visual Genome image cut short (its regions
skipped as ``corrupt_image``).
    cvbench/test_2d.jsonl, test_3d.jsonl, img/…   CV-Bench-style evaluation (same question kinds as SFT)
    pope/coco_pope_{random,popular,adversarial}.json + images   POPE-style yes/no evaluation

Python: :func:`generate_world` (returns the paths) and :func:`world_texts` (every text of the world,
to train the quickstart's tiny tokenizer with ``pipeline.model.tokenizer.build_tiny_tokenizer``).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import tarfile

import yaml

from data_prep.synthetic_world import (COLORS, Scene, caption, make_scene, mc_choices, questions, render)

EVAL_SOURCES_2D = ("ADE20K", "COCO")
# The question kinds the CV-Bench-style set asks, as (type, task). Count, Relation and Depth are CV-Bench's
# own tasks; Color is the world's: "What color is the triangle?" about a scene of several shapes, where the
# question names the one shape that matters — where image tokens that read the question (MMA) could help.
CV_BENCH_TASKS = {"count": ("2D", "Count"), "relation": ("2D", "Relation"), "color": ("2D", "Color"),
                  "depth": ("3D", "Depth")}


@dataclasses.dataclass(frozen=True)
class WorldPaths:
    root: str
    kale: str            # folder of webdataset tars
    ocr200m: str
    sources_yaml: str
    cv_bench: str
    pope: str


def _rng(seed: int, stream: str) -> random.Random:
    return random.Random(f"{seed}:{stream}")


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=None)


def _write_jsonl(path: str, rows) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def ocr_captions(scene: Scene) -> list[dict]:
    """The 12 OCR-200m caption variants: granularity 0-5, without then with the raw alt-text."""
    out = []
    for raw in (False, True):
        for g in range(6):
            where = "" if g == 0 else " located at the bottom left"
            prefix = f"{caption(scene)} " if raw else ""
            out.append({"text": f'{prefix}The image contains the text "{scene.word}"{where}', "granularity": g,
                        "include_datacomp_raw_cap": raw})
    return out


def write_webdataset(folder: str, scenes: list[Scene], text_of, side: int, per_tar: int) -> None:
    """img2dataset ``--output_format webdataset`` layout; every 7th key is a failed download (a gap)."""
    os.makedirs(folder, exist_ok=True)
    for shard, start in enumerate(range(0, len(scenes), per_tar)):
        chunk = scenes[start:start + per_tar]
        with tarfile.open(os.path.join(folder, f"{shard:05d}.tar"), "w", format=tarfile.USTAR_FORMAT) as tar:
            for i, scene in enumerate(chunk):
                key = f"{shard * 10**4 + i:09d}"       # img2dataset: 5-digit shard + 4-digit index
                if i % 7 == 6:
                    continue                       # failed download: absent from the tar
                meta = {"caption": text_of(scene), "url": f"http://synthetic.invalid/{scene.id}.jpg",
                        "key": key, "status": "success", "error_message": None, "width": side,
                        "height": side, "original_width": side, "original_height": side}
                _add(tar, f"{key}.jpg", render(scene, side))
                _add(tar, f"{key}.txt", text_of(scene).encode())
                _add(tar, f"{key}.json", json.dumps(meta, indent=4).encode())
        with open(os.path.join(folder, f"{shard:05d}_stats.json"), "w") as f:
            json.dump({"count": len(chunk), "successes": len(chunk) - len(chunk) // 7,
                       "failed_to_download": len(chunk) // 7, "failed_to_resize": 0}, f)


# Text-only ScienceQA-style problems (question, choices, answer index, hint); some with unicode text.
TEXT_PROBLEMS = (
    ("Which shape has three corners?", ("circle", "square", "triangle"), 2, ""),
    ("Which shape has no corners?", ("circle", "square", "triangle"), 0, ""),
    ("Which shape has four equal sides?", ("circle", "square", "triangle"), 1, "Count the sides."),
    ("Which number is the largest?", ("one", "two", "three", "four"), 3, ""),
    ("Which word names a colour: “yellow” or “circle”?", ("yellow", "circle"), 0, "Colours — not shapes."),
    ("Which is a shape — «square» or «red»?", ("red", "square"), 1, ""),
)
IMAGE_PROBLEM_EVERY = 3        # one ScienceQA problem in 3 has an image; the rest are text-only
MISSING_IMAGE_ID = 999_999_999   # a VQAv2 question about an image that is not in the COCO folder


def _jpeg_to_png(jpeg: bytes) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(out, format="PNG")
    return out.getvalue()


def _write_bytes(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def write_scienceqa(root: str, scenes: list[Scene], rng: random.Random, side: int) -> None:
    """``problems.json`` + ``pid_splits.json`` + ``images/{split}/{pid}/image.png``: one problem per scene,
    an image problem (how many shapes?) every :data:`IMAGE_PROBLEM_EVERY`-th, text-only otherwise;
    every 8th problem is in ``val``."""
    problems, splits = {}, {"train": [], "val": [], "test": []}
    for i, scene in enumerate(scenes):
        pid, split = str(i + 1), "val" if i % 8 == 7 else "train"
        if i % IMAGE_PROBLEM_EVERY == 0:
            n = len(scene.shapes)
            question, choices, answer, hint, image = ("How many shapes are in the image?",
                                                      ("1", "2", "3", "4"), n - 1, "", "image.png")
            _write_bytes(os.path.join(root, "scienceqa/images", split, pid, image), _jpeg_to_png(render(scene, side)))
        else:
            question, choices, answer, hint = TEXT_PROBLEMS[rng.randrange(len(TEXT_PROBLEMS))]
            image = None
        problems[pid] = {"question": question, "choices": list(choices), "answer": answer, "hint": hint,
                         "image": image, "task": "closed choice", "grade": "grade1", "subject": "shapes",
                         "topic": "shapes", "category": "shapes", "skill": "shapes", "lecture": "", "solution": "",
                         "split": split}
        splits[split].append(pid)
    _write_json(os.path.join(root, "scienceqa/problems.json"), problems)
    _write_json(os.path.join(root, "scienceqa/pid_splits.json"), splits)


def write_visual_genome(root: str, scenes: list[Scene], side: int) -> None:
    """``region_descriptions.json`` + ``image_data.json``, images split over ``VG_100K/`` and
    ``VG_100K_2/`` as released; the last image is cut short (a corrupt download)."""
    image_data, regions = [], []
    for i, scene in enumerate(scenes):
        folder = "VG_100K" if i % 2 == 0 else "VG_100K_2"
        jpeg = render(scene, side)
        _write_bytes(os.path.join(root, "vg", folder, f"{scene.id}.jpg"),
                     jpeg[: len(jpeg) // 3] if i == len(scenes) - 1 else jpeg)
        image_data.append({"image_id": scene.id, "url": f"https://cs.stanford.edu/people/rak248/{folder}/{scene.id}.jpg",
                           "width": side, "height": side, "coco_id": None, "flickr_id": None})
        regions.append({"id": scene.id, "regions": [
            {"region_id": scene.id * 10 + j, "image_id": scene.id, "phrase": s.name,
             "x": round(s.box(side)[0]), "y": round(s.box(side)[1]), "width": round(s.box(side)[2]),
             "height": round(s.box(side)[3])} for j, s in enumerate(scene.shapes)]})
    _write_json(os.path.join(root, "vg/image_data.json"), image_data)
    _write_json(os.path.join(root, "vg/region_descriptions.json"), regions)


def write_sft(root: str, scenes: list[Scene], rng: random.Random, side: int) -> dict[str, dict[str, str]]:
    """VQAv2, A-OKVQA, LLaVA, VSR, RefCOCO (MDETR), ScienceQA and Visual Genome files over ``scenes``
    (with the tricky records of the module doc); returns the sources map."""
    vq_questions, vq_annotations, aok, llava, vsr, ref_images, ref_anns = [], [], [], [], [], [], []
    for scene in scenes:
        jpeg = render(scene, side)
        for path in (f"coco/train2014/COCO_train2014_{scene.id:012d}.jpg", f"coco/train2017/{scene.id:012d}.jpg"):
            os.makedirs(os.path.dirname(os.path.join(root, path)), exist_ok=True)
            with open(os.path.join(root, path), "wb") as f:
                f.write(jpeg)
        for j, q in enumerate(questions(scene, rng)):
            qid = scene.id * 100 + j
            vq_questions.append({"image_id": scene.id, "question": q.question, "question_id": qid})
            vq_annotations.append({
                "question_id": qid, "image_id": scene.id, "question_type": q.task,
                "answer_type": "number" if q.task == "count" else "yes/no" if q.answer in ("yes", "no") else "other",
                "multiple_choice_answer": q.answer,
                "answers": [{"answer": q.answer, "answer_confidence": "yes", "answer_id": k} for k in range(1, 11)]})
            if q.task != "shape":
                choices, idx = mc_choices(q)
                aok.append({"split": "train", "image_id": scene.id, "question_id": f"syn{qid}",
                            "question": q.mc_question, "choices": choices, "correct_choice_idx": idx,
                            "direct_answers": [choices[idx]] * 10, "difficult_direct_answer": False,
                            "rationales": []})
        n = len(scene.shapes)
        llava.append({"id": f"{scene.id:012d}", "image": f"{scene.id:012d}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": caption(scene)},
            {"from": "human", "value": "How many shapes are there?"},
            {"from": "gpt", "value": f"There {'is' if n == 1 else 'are'} {n} shape{'s' if n > 1 else ''}."}]})
        if n >= 2:
            a, b = scene.shapes[:2]
            if abs(a.x - b.x) > 0.2:
                truth = rng.random() < 0.5
                rel = ("left of" if a.x < b.x else "right of") if truth else ("right of" if a.x < b.x else "left of")
                vsr.append({"image": f"{scene.id:012d}.jpg",
                            "image_link": f"http://images.cocodataset.org/train2017/{scene.id:012d}.jpg",
                            "caption": f"The {a.name} is {rel} the {b.name}.", "label": int(truth),
                            "relation": rel, "annotator_id": 0, "vote_true_validator_id": "[]",
                            "vote_false_validator_id": "[]", "reference_frame": None})
        for s in scene.shapes:
            rid = len(ref_images) + 1
            ref_images.append({"file_name": f"COCO_train2014_{scene.id:012d}.jpg", "height": side, "width": side,
                               "id": rid, "original_id": scene.id, "caption": s.name, "dataset_name": "refcoco",
                               "tokens_negative": []})
            ref_anns.append({"area": s.box(side)[2] ** 2, "iscrowd": 0, "image_id": rid, "category_id": 1,
                             "id": rid, "bbox": list(s.box(side)), "original_id": rid, "tokens_positive": []})
    vq_questions.append({"image_id": MISSING_IMAGE_ID, "question": "How many shapes are there?",
                         "question_id": MISSING_IMAGE_ID})
    vq_annotations.append({"question_id": MISSING_IMAGE_ID, "image_id": MISSING_IMAGE_ID, "question_type": "count",
                           "answer_type": "number", "multiple_choice_answer": "2",
                           "answers": [{"answer": "2", "answer_confidence": "yes", "answer_id": 1}]})
    write_scienceqa(root, scenes, rng, side)
    write_visual_genome(root, scenes, side)
    info = {"description": "synthetic world", "data_subtype": "train2014"}
    _write_json(os.path.join(root, "vqav2/v2_OpenEnded_mscoco_train2014_questions.json"),
                {"info": info, "task_type": "OpenEnded", "data_type": "mscoco", "data_subtype": "train2014",
                 "license": {}, "questions": vq_questions})
    _write_json(os.path.join(root, "vqav2/v2_mscoco_train2014_annotations.json"),
                {"info": info, "license": {}, "data_type": "mscoco", "data_subtype": "train2014",
                 "annotations": vq_annotations})
    _write_json(os.path.join(root, "aokvqa/aokvqa_v1p0_train.json"), aok)
    _write_json(os.path.join(root, "llava/llava_instruct_150k.json"), llava)
    _write_jsonl(os.path.join(root, "vsr/train.jsonl"), vsr)
    _write_json(os.path.join(root, "refcoco/finetune_refcoco_train.json"),
                {"info": {}, "licenses": [], "categories": [{"id": 1, "name": "shape"}],
                 "images": ref_images, "annotations": ref_anns})
    return {
        "vqav2": {"questions": "vqav2/v2_OpenEnded_mscoco_train2014_questions.json",
                  "annotations": "vqav2/v2_mscoco_train2014_annotations.json", "images": "coco/train2014"},
        "aokvqa": {"annotations": "aokvqa/aokvqa_v1p0_train.json", "images": "coco"},
        "llava150k": {"annotations": "llava/llava_instruct_150k.json", "images": "coco/train2017"},
        "vsr": {"annotations": "vsr/train.jsonl", "images": "coco"},
        "refcoco": {"mdetr": "refcoco/finetune_refcoco_train.json", "images": "coco/train2014"},
        "scienceqa": {"problems": "scienceqa/problems.json", "splits": "scienceqa/pid_splits.json",
                      "images": "scienceqa/images"},
        "vg": {"regions": "vg/region_descriptions.json", "image_data": "vg/image_data.json", "images": "vg"},
    }


def write_cv_bench(folder: str, scenes: list[Scene], rng: random.Random, side: int) -> None:
    """``test_2d.jsonl`` / ``test_3d.jsonl`` + ``img/`` with Count, Relation, Color (2D) and Depth (3D) questions."""
    rows = {"2D": [], "3D": []}
    for scene in scenes:
        for q in questions(scene, rng):
            if q.task not in CV_BENCH_TASKS:
                continue
            kind, task = CV_BENCH_TASKS[q.task]
            choices, idx = mc_choices(q)
            letter = "ABCD"[idx]
            filename = f"img/{kind}/{task.lower()}/synthetic_{scene.id}.jpg"
            path = os.path.join(folder, filename)
            if not os.path.exists(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(render(scene, side))
            source = "Omni3D" if kind == "3D" else EVAL_SOURCES_2D[len(rows[kind]) % 2]
            prompt = q.mc_question + " Select from the following choices.\n" + "\n".join(
                f"({'ABCD'[i]}) {c}" for i, c in enumerate(choices))
            rows[kind].append({"idx": len(rows["2D"]) + len(rows["3D"]), "type": kind, "task": task,
                               "question": q.mc_question, "choices": choices, "answer": f"({letter})",
                               "prompt": prompt, "filename": filename, "source": source})
    _write_jsonl(os.path.join(folder, "test_2d.jsonl"), rows["2D"])
    _write_jsonl(os.path.join(folder, "test_3d.jsonl"), rows["3D"])


def write_pope(folder: str, scenes: list[Scene], rng: random.Random, side: int) -> None:
    """POPE-style JSON-lines files (``.json`` names), one yes and one no question per image."""
    lines = []
    for scene in scenes:
        name = f"COCO_val2014_{scene.id:012d}.jpg"
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(render(scene, side))
        present = rng.choice(scene.shapes)
        absent = rng.choice([c for c in COLORS if c not in {s.color for s in scene.shapes}] or ["purple"])
        lines.append((name, f"Is there a {present.name} in the image?", "yes"))
        lines.append((name, f"Is there a {absent} {present.kind} in the image?", "no"))
    for split in ("random", "popular", "adversarial"):
        _write_jsonl(os.path.join(folder, f"coco_pope_{split}.json"),
                     [{"question_id": i, "image": n, "text": t, "label": lab} for i, (n, t, lab) in
                      enumerate(lines, 1)])


def generate_world(out: str, seed: int = 0, num_pretrain: int = 512, num_sft: int = 256, num_eval: int = 96,
                   image_side: int = 64, per_tar: int = 64) -> WorldPaths:
    """Write the whole world under ``out`` (deterministic for a given seed and sizes)."""
    pt_rng, sft_rng, eval_rng = _rng(seed, "pt"), _rng(seed, "sft"), _rng(seed, "eval")
    pt = [make_scene(pt_rng, i, word=i % 2 == 1) for i in range(num_pretrain)]
    paths = WorldPaths(out, os.path.join(out, "pt/kale"), os.path.join(out, "pt/ocr200m"),
                       os.path.join(out, "sources.yaml"), os.path.join(out, "cvbench"), os.path.join(out, "pope"))
    write_webdataset(paths.kale, pt, caption, image_side, per_tar)
    write_webdataset(paths.ocr200m, [s for s in pt if s.word], lambda s: json.dumps(ocr_captions(s)),
                     image_side, per_tar)
    sft = [make_scene(sft_rng, 100_000 + i) for i in range(num_sft)]
    with open(paths.sources_yaml, "w") as f:
        yaml.safe_dump(write_sft(out, sft, sft_rng, image_side), f, sort_keys=False)
    evals = [make_scene(eval_rng, 200_000 + i) for i in range(num_eval)]
    write_cv_bench(paths.cv_bench, evals, eval_rng, image_side)
    write_pope(paths.pope, evals[: max(1, num_eval // 4)], eval_rng, image_side)
    return paths


def world_texts(seed: int = 0, num_scenes: int = 200) -> list[str]:
    """Every kind of text the world produces (captions, questions, answers, prompts), for a tokenizer."""
    from data_prep.sft.common import SftOptions, lettered_options
    from pipeline.chat import SYSTEM_MESSAGE
    from pipeline.templates import TASK_INPUTS, task_input

    rng = _rng(seed, "texts")
    texts = [SYSTEM_MESSAGE, *TASK_INPUTS.values(), "Describe the image.", "There are shapes."]
    for question, choices, answer, hint in TEXT_PROBLEMS:
        texts.append(task_input("multiple_choice_context", question=question, context=hint or "N/A",
                                options=lettered_options(choices, answer, SftOptions(), question)[0]))
    for i in range(num_scenes):
        scene = make_scene(rng, i, word=i % 2 == 1)
        texts.append(caption(scene))
        texts.extend(c["text"] for c in ocr_captions(scene)[:2]) if scene.word else None
        for q in questions(scene, rng):
            choices, idx = mc_choices(q)
            options, _ = lettered_options(choices, idx, SftOptions(), str(i))
            texts += [task_input("short_answer", question=q.question), q.answer,
                      task_input("multiple_choice", question=q.mc_question, options=options)]
    return texts


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write the synthetic shapes world in the real raw formats.")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain", type=int, default=512, help="pre-training images (captioned)")
    parser.add_argument("--sft", type=int, default=256, help="SFT images (several questions each)")
    parser.add_argument("--eval", type=int, default=96, help="evaluation images")
    parser.add_argument("--image-side", type=int, default=64, help="side of the drawn images in pixels")
    args = parser.parse_args(argv)
    paths = generate_world(args.out, args.seed, args.pretrain, args.sft, args.eval, args.image_side)
    print(json.dumps(dataclasses.asdict(paths), indent=2))


if __name__ == "__main__":
    from pipeline.process import run_command

    run_command(main)
