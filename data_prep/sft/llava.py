"""LLaVA-Instruct-150K: free-form instruction conversations (``llava_instruct_150k.json``).

The ``<image>`` token of the first human turn (prefix ``<image>\\n…`` or suffix ``…\\n<image>``) is
removed: the chat template places the image itself. By default each human/gpt pair becomes its own
sample with the image, as in the paper; with ``whole_conversations`` a record is one sample in which
every assistant turn is a target.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Iterator

from data_prep.records import Parsed
from data_prep.sft.common import Paths, SftOptions, SftSource, json_list_records, sft_sample, text
from pipeline.templates import task_input

IMAGE_TAG = "<image>"


def llava_records(paths: Paths) -> Iterator[tuple[str, Any]]:
    yield from json_list_records(paths["annotations"], "LLaVA conversations file (llava_instruct_150k.json)", "id")


def conversation_turns(conversations: list[dict]) -> list[tuple[str, str]]:
    """``[(question, answer), …]`` from alternating human/gpt messages, ``<image>`` removed."""
    if len(conversations) % 2 or not conversations:
        raise ValueError(f"{len(conversations)} messages; expected human/gpt pairs")
    turns = []
    for human, gpt in zip(conversations[0::2], conversations[1::2]):
        if human["from"] != "human" or gpt["from"] != "gpt":
            raise ValueError(f"messages from {human['from']!r} then {gpt['from']!r}; expected human then gpt")
        question = text(human["value"], "human message").replace(IMAGE_TAG, "")
        turns.append((task_input("instruction", question=text(question, "human message")),
                      text(gpt["value"], "gpt message")))
    return turns


def llava_samples(record_id: str, raw: dict, paths: Paths, options: SftOptions) -> Iterable[Parsed]:
    images = [os.path.join(paths["images"], raw["image"])] if raw.get("image") else []
    turns = conversation_turns(raw["conversations"])
    if options.whole_conversations:
        return [sft_sample(record_id, images, turns)]
    return [sft_sample(f"{record_id}-{i}", images, [turn]) for i, turn in enumerate(turns)]


SOURCES = [
    SftSource("llava150k", "LLaVA-Instruct-150K: CC BY 4.0 (earlier CC BY-NC 4.0) + OpenAI terms of use; "
              "COCO images", {"annotations": "llava_instruct_150k.json", "images": "COCO train2017 folder"},
              llava_records, llava_samples),
]
