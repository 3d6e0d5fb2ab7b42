"""Readers for the released evaluation files (CV-Bench, POPE), local copies only.

CV-Bench (``nyu-visionx/CV-Bench``): ``test_2d.jsonl`` / ``test_3d.jsonl`` (or an older single
``test.jsonl``) next to the ``img/`` folder their ``filename`` fields point into; the ``.parquet``
files embed the images and need ``pyarrow``. POPE: ``coco_pope_{random,popular,adversarial}.json``, each
JSON Lines despite the extension, plus the COCO val2014 image folder.

A record that cannot be used (missing field, unknown source, answer outside the options, image file
missing) is skipped and counted by reason in the returned :class:`ReadReport`; a missing or unreadable
file is an error that names it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from typing import Iterator

from pipeline.eval.answers import answer_letter, option_letters
from pipeline.eval.metrics import CV_BENCH_SOURCES

CV_BENCH_FILES = ("test_2d.jsonl", "test_3d.jsonl")
CV_BENCH_FALLBACK_FILES = ("test.jsonl",)
POPE_SPLITS = ("random", "popular", "adversarial")
POPE_FILE = "coco_pope_{split}.json"


@dataclasses.dataclass
class ReadReport:
    """What a reader kept and what it skipped, by reason."""

    kept: int = 0
    skipped: Counter = dataclasses.field(default_factory=Counter)

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def summary(self, what: str) -> str:
        text = f"{what}: {self.kept} kept"
        if self.skipped:
            text += ", skipped " + ", ".join(f"{n} ({r})" for r, n in sorted(self.skipped.items()))
        return text


@dataclasses.dataclass
class CVBenchItem:
    """One CV-Bench question with its image (path on disk or embedded bytes)."""

    idx: int | str
    type: str
    task: str
    question: str
    choices: list[str]
    answer: str                 # the letter, "(A)" → "A"
    source: str
    image_path: str | None = None
    image_bytes: bytes | None = None

    @property
    def key(self) -> str:
        """Unique id across the 2D and 3D files (their ``idx`` ranges may overlap)."""
        return f"{self.type}/{self.idx}"

    def load_image(self) -> bytes:
        if self.image_bytes is not None:
            return self.image_bytes
        with open(self.image_path, "rb") as f:
            return f.read()


@dataclasses.dataclass
class PopeItem:
    """One POPE question."""

    split: str
    question_id: int | str
    question: str
    label: str                  # "yes" | "no"
    image_path: str

    @property
    def key(self) -> str:
        return f"{self.split}/{self.question_id}"

    def load_image(self) -> bytes:
        with open(self.image_path, "rb") as f:
            return f.read()


def _jsonl(path: str, report: ReadReport) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                report.skip("not valid JSON")
                continue
            if not isinstance(row, dict):
                report.skip("line is not a JSON object")
                continue
            yield row


def cv_bench_files(path: str) -> list[str]:
    """The question files under ``path`` (a CV-Bench folder or one ``.jsonl`` / ``.parquet`` file)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"CV-Bench data {path} does not exist; pass the folder holding "
                                f"{' and '.join(CV_BENCH_FILES)} and img/, or one of those files")
    for names in (CV_BENCH_FILES, CV_BENCH_FALLBACK_FILES):
        found = [os.path.join(path, n) for n in names if os.path.exists(os.path.join(path, n))]
        if found:
            return found
    raise FileNotFoundError(f"{path} holds none of {', '.join(CV_BENCH_FILES + CV_BENCH_FALLBACK_FILES)}; "
                            "download the .jsonl files and img/ folder of nyu-visionx/CV-Bench into it")


def _parquet_rows(path: str) -> Iterator[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{path} is a parquet file and pyarrow is not installed; use the released "
                          "test_2d.jsonl / test_3d.jsonl files with their img/ folder instead, or "
                          "`pip install pyarrow`") from None
    yield from pq.read_table(path).to_pylist()


def _cv_bench_item(row: dict, root: str, report: ReadReport) -> CVBenchItem | None:
    missing = [k for k in ("idx", "question", "choices", "answer", "source") if k not in row]
    if missing:
        report.skip(f"missing field {missing[0]}")
        return None
    if row["source"] not in CV_BENCH_SOURCES:
        report.skip("unknown source")
        return None
    choices = row["choices"]
    if not isinstance(choices, list) or not 2 <= len(choices) <= 26:
        report.skip("choices is not a list of 2-26 options")
        return None
    try:
        letter = answer_letter(row["answer"])
    except ValueError:
        report.skip("answer is not an option letter")
        return None
    if letter not in option_letters(len(choices)):
        report.skip("answer outside the options")
        return None
    item = CVBenchItem(idx=row["idx"], type=str(row.get("type") or CV_BENCH_SOURCES[row["source"]]),
                       task=str(row.get("task", "")), question=str(row["question"]),
                       choices=[str(c) for c in choices], answer=letter, source=row["source"])
    image = row.get("image")
    if isinstance(image, dict) and image.get("bytes"):
        item.image_bytes = image["bytes"]
    elif row.get("filename"):
        item.image_path = os.path.join(root, row["filename"])
        if not os.path.isfile(item.image_path):
            report.skip("image file missing")
            return None
    else:
        report.skip("no image (neither embedded bytes nor filename)")
        return None
    return item


def read_cv_bench(path: str) -> tuple[list[CVBenchItem], ReadReport]:
    """All usable CV-Bench questions under ``path`` (folder, ``.jsonl`` or ``.parquet``)."""
    report = ReadReport()
    items: list[CVBenchItem] = []
    for file in cv_bench_files(path):
        root = os.path.dirname(os.path.abspath(file))
        rows = _parquet_rows(file) if file.endswith(".parquet") else _jsonl(file, report)
        for row in rows:
            item = _cv_bench_item(row, root, report)
            if item is not None:
                items.append(item)
    report.kept = len(items)
    if not items:
        raise ValueError(f"no usable CV-Bench question in {path} ({report.summary('records')})")
    return items, report


def read_pope(folder: str, image_folder: str | None = None,
              splits: tuple[str, ...] = POPE_SPLITS) -> tuple[list[PopeItem], ReadReport]:
    """POPE questions of ``splits`` from ``folder``; images are looked up in ``image_folder``."""
    image_folder = image_folder or folder
    report = ReadReport()
    items: list[PopeItem] = []
    for split in splits:
        if split not in POPE_SPLITS:
            raise ValueError(f"unknown POPE split {split!r}; known: {', '.join(POPE_SPLITS)}")
        path = os.path.join(folder, POPE_FILE.format(split=split))
        if not os.path.exists(path):
            raise FileNotFoundError(f"POPE file {path} not found; download output/coco/"
                                    f"{POPE_FILE.format(split=split)} from the POPE repository into {folder}")
        for row in _jsonl(path, report):
            if any(k not in row for k in ("question_id", "image", "text", "label")):
                report.skip("missing field")
                continue
            label = str(row["label"]).strip().lower()
            if label not in ("yes", "no"):
                report.skip("label is not yes/no")
                continue
            image_path = os.path.join(image_folder, row["image"])
            if not os.path.isfile(image_path):
                report.skip("image file missing")
                continue
            items.append(PopeItem(split=split, question_id=row["question_id"], question=str(row["text"]),
                                  label=label, image_path=image_path))
    report.kept = len(items)
    if not items:
        raise ValueError(f"no usable POPE question in {folder} ({report.summary('records')})")
    return items, report


__all__ = ["CV_BENCH_FILES", "POPE_SPLITS", "CVBenchItem", "PopeItem", "ReadReport", "cv_bench_files",
           "read_cv_bench", "read_pope"]
