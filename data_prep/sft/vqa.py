"""Short-answer VQA sources: VQAv2, GQA, OCR-VQA, and VSR (yes/no), read from their original files.

Each question becomes one sample with Table 5's short-answer input (the paper trains single-turn
samples and does not de-duplicate).
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Iterator

from data_prep.records import Parsed
from data_prep.sft.common import Paths, SftOptions, SftSource, first_existing, load_json, sft_sample, text
from pipeline.templates import task_input


# --- VQAv2: questions file + annotations file, joined by question_id --------------------------------
def vqav2_records(paths: Paths) -> Iterator[tuple[str, Any]]:
    questions = load_json(paths["questions"], "VQAv2 questions file (v2_OpenEnded_mscoco_*_questions.json)")
    annotations = load_json(paths["annotations"], "VQAv2 annotations file (v2_mscoco_*_annotations.json)")
    subtype = questions.get("data_subtype") or annotations.get("data_subtype")
    if not isinstance(subtype, str):
        raise ValueError(f"{paths['questions']} has no `data_subtype` (e.g. \"train2014\"): not a VQAv2 file")
    by_qid = {a.get("question_id"): a for a in annotations["annotations"] if isinstance(a, dict)}
    for q in questions["questions"]:
        qid = q.get("question_id") if isinstance(q, dict) else None
        yield str(qid), {"question": q, "annotation": by_qid.get(qid), "subtype": subtype}


def vqav2_samples(record_id: str, raw: dict, paths: Paths, options: SftOptions) -> Iterable[Parsed]:
    q, ann = raw["question"], raw["annotation"]
    if ann is None:
        raise KeyError(f"no annotation with question_id {record_id}")
    if ann["image_id"] != q["image_id"]:
        raise ValueError(f"annotation image_id {ann['image_id']} != question image_id {q['image_id']}")
    image = os.path.join(paths["images"], f"COCO_{raw['subtype']}_{int(q['image_id']):012d}.jpg")
    turn = (task_input("short_answer", question=text(q["question"], "question")),
            text(ann["multiple_choice_answer"], "answer"))
    return [sft_sample(record_id, [image], [turn])]


# --- GQA: one dict keyed by question id ---------------------------------------------------------------
def gqa_records(paths: Paths) -> Iterator[tuple[str, Any]]:
    questions = load_json(paths["questions"], "GQA questions file (train_balanced_questions.json)")
    if not isinstance(questions, dict):
        raise ValueError(f"{paths['questions']} is a {type(questions).__name__}; GQA question files are a "
                         "dict keyed by question id")
    yield from questions.items()


def gqa_samples(record_id: str, raw: dict, paths: Paths, options: SftOptions) -> Iterable[Parsed]:
    image = os.path.join(paths["images"], f"{text(raw['imageId'], 'imageId')}.jpg")
    turn = (task_input("short_answer", question=text(raw["question"], "question")), text(raw["answer"], "answer"))
    return [sft_sample(record_id, [image], [turn])]


# --- OCR-VQA: dict keyed by book id; split 1 = train --------------------------------------------------
OCRVQA_SPLITS = {"train": 1, "val": 2, "test": 3}


def ocrvqa_records(paths: Paths) -> Iterator[tuple[str, Any]]:
    books = load_json(paths["annotations"], "OCR-VQA dataset.json")
    yield from books.items()


def ocrvqa_samples(record_id: str, raw: dict, paths: Paths, options: SftOptions) -> Iterable[Parsed]:
    if options.split not in OCRVQA_SPLITS:
        raise RuntimeError(f"OCR-VQA has splits {sorted(OCRVQA_SPLITS)}, not {options.split!r}")
    if raw["split"] != OCRVQA_SPLITS[options.split]:
        return []
    questions, answers = raw["questions"], raw["answers"]
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    image = os.path.join(paths["images"], record_id + os.path.splitext(raw["imageURL"])[1])
    return [sft_sample(f"{record_id}-{i}", [image],
                       [(task_input("short_answer", question=text(q, "question")), text(a, "answer"))])
            for i, (q, a) in enumerate(zip(questions, answers))]


# --- VSR: jsonl, a caption that is true (label 1) or false (label 0) ----------------------------------
def vsr_records(paths: Paths) -> Iterator[tuple[str, Any]]:
    path = paths["annotations"]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VSR jsonl (data/splits/random/train.jsonl) not found at {path}")
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield f"line{lineno}", json.loads(line)
                except json.JSONDecodeError as err:
                    yield f"line{lineno}", {"_error": str(err)}


def vsr_question(caption: str) -> str:
    """Turn a VSR statement into a yes/no question, word by word (no substring split on "is").

    "The cat is inside the fridge." → "Is the cat inside the fridge?"; a statement without exactly one
    "is"/"are" becomes "Is it true that the suitcase contains the cat?".
    """
    words = caption.strip().rstrip(".").split()
    verbs = [i for i, w in enumerate(words) if w.lower() in ("is", "are")]
    if len(verbs) == 1 and verbs[0] > 0:
        verb = words.pop(verbs[0])
        rest = " ".join(words)
        return f"{verb.capitalize()} {rest[:1].lower()}{rest[1:]}?"
    sentence = " ".join(words)
    return f"Is it true that {sentence[:1].lower()}{sentence[1:]}?"


def vsr_samples(record_id: str, raw: dict, paths: Paths, options: SftOptions) -> Iterable[Parsed]:
    if "_error" in raw:
        raise ValueError(f"line is not JSON: {raw['_error']}")
    name = text(raw["image"], "image")
    folder = raw.get("image_link", "").rstrip("/").split("/")[-2:-1]
    image = first_existing([os.path.join(paths["images"], *folder, name), os.path.join(paths["images"], name)])
    if raw["label"] not in (0, 1):
        raise ValueError(f"label {raw['label']!r} is not 0/1")
    turn = (task_input("yes_no", question=vsr_question(text(raw["caption"], "caption"))),
            "yes" if raw["label"] == 1 else "no")
    return [sft_sample(f"{record_id}:{name}", [image], [turn])]


SOURCES = [
    SftSource("vqav2", "VQAv2: annotations CC BY 4.0 (unverified); COCO images under Flickr terms",
              {"questions": "v2_OpenEnded_mscoco_train2014_questions.json",
               "annotations": "v2_mscoco_train2014_annotations.json",
               "images": "folder of COCO_train2014_*.jpg"}, vqav2_records, vqav2_samples),
    SftSource("gqa", "GQA: CC BY 4.0 (unverified); Visual Genome images",
              {"questions": "train_balanced_questions.json", "images": "GQA images/ folder"},
              gqa_records, gqa_samples),
    SftSource("ocrvqa", "OCR-VQA: licence not stated (unverified); Amazon cover images",
              {"annotations": "dataset.json", "images": "folder of {book_id}{ext} covers"},
              ocrvqa_records, ocrvqa_samples),
    SftSource("vsr", "VSR: Apache-2.0; COCO images",
              {"annotations": "data/splits/random/train.jsonl",
               "images": "folder holding train2017/ and val2017/ (or the images flat)"},
              vsr_records, vsr_samples),
]
