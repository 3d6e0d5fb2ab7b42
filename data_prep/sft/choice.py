"""Multiple-choice sources: A-OKVQA and ScienceQA, with lettered options and a letter as the answer.

Options keep their stored order unless shuffling is enabled; then a *copy* is shuffled with a seeded
RNG and the letter is recomputed from the answer text (the reference code shuffled the stored list in
place and kept the old index, corrupting repeated draws). ScienceQA problems without an image become
text-only samples.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Iterator

from data_prep.records import Parsed
from data_prep.sft.common import (Paths, SftOptions, SftSource, first_existing, json_list_records, lettered_options,
                                  load_json, sft_sample, text)
from pipeline.templates import task_input


# --- A-OKVQA: a JSON list; images in COCO {split}2017/ -------------------------------------------------
def aokvqa_records(paths: Paths) -> Iterator[tuple[str, Any]]:
    yield from json_list_records(paths["annotations"], "A-OKVQA file (aokvqa_v1p0_train.json)", "question_id")


def aokvqa_samples(record_id: str, raw: dict, paths: Paths, options: SftOptions) -> Iterable[Parsed]:
    name = f"{int(raw['image_id']):012d}.jpg"
    image = first_existing([os.path.join(paths["images"], f"{raw['split']}2017", name),
                            os.path.join(paths["images"], name)])
    opts, letter = lettered_options(raw["choices"], raw["correct_choice_idx"], options, record_id)
    prompt = task_input("multiple_choice", question=text(raw["question"], "question"), options=opts)
    return [sft_sample(record_id, [image], [(prompt, letter)])]


# --- ScienceQA: problems.json (pid → problem) + pid_splits.json ---------------------------------------
def scienceqa_records(paths: Paths) -> Iterator[tuple[str, Any]]:
    problems = load_json(paths["problems"], "ScienceQA problems.json")
    splits = load_json(paths["splits"], "ScienceQA pid_splits.json") if "splits" in paths else None
    members = {name: {str(p) for p in pids} for name, pids in splits.items()} if splits else None
    for pid, problem in problems.items():
        yield str(pid), {"problem": problem, "splits": members}


def scienceqa_samples(record_id: str, raw: dict, paths: Paths, options: SftOptions) -> Iterable[Parsed]:
    problem, splits = raw["problem"], raw["splits"]
    if splits is not None and options.split not in splits:
        raise RuntimeError(f"split {options.split!r} is not in {paths['splits']} (it has {sorted(splits)})")
    in_split = record_id in splits[options.split] if splits else problem["split"] == options.split
    if not in_split:
        return []
    opts, letter = lettered_options(problem["choices"], problem["answer"], options, record_id)
    context = (problem.get("hint") or "").strip() or "N/A"
    prompt = task_input("multiple_choice_context", question=text(problem["question"], "question"),
                        context=context, options=opts)
    images = []
    if problem.get("image"):
        images = [os.path.join(paths["images"], problem["split"], record_id, problem["image"])]
    return [sft_sample(record_id, images, [(prompt, letter)])]


SOURCES = [
    SftSource("aokvqa", "A-OKVQA: code Apache-2.0, data licence unverified; COCO images",
              {"annotations": "aokvqa_v1p0_train.json", "images": "COCO folder holding train2017/"},
              aokvqa_records, aokvqa_samples),
    SftSource("scienceqa", "ScienceQA: CC BY-NC-SA 4.0 (non-commercial)",
              {"problems": "problems.json", "images": "folder holding train/{pid}/image.png"},
              scienceqa_records, scienceqa_samples, optional_files={"splits": "pid_splits.json"}),
]
