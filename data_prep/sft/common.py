"""What every SFT parser shares: the task inputs of paper Table 5, options, boxes, the source type.

The chat wrapper (system message, role tags, ``<image>`` slots) comes from :mod:`pipeline.chat` and the
per-task *input* text (paper Table 5) and option format from :mod:`pipeline.templates`, which inference
shares.

A source is an :class:`SftSource`: the files it reads (``files``: key → what the file is), a function
``records(paths)`` that loads the original files and yields ``(record_id, raw_record)``, and a function
``samples(record_id, raw, paths, options)`` that turns one raw record into samples. A raw record whose
conversion raises ``KeyError`` / ``TypeError`` / ``ValueError`` / ``IndexError`` / ``AttributeError`` is
counted as ``malformed_record``; a missing file, a file that cannot be read at all, or an option the
files cannot satisfy (``RuntimeError``) makes the whole source unusable: its build stops with an error
naming the source and the file (see :mod:`data_prep.sft.build`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
from typing import Any, Callable, Iterable, Iterator, Sequence

from data_prep.records import EMPTY_TEXT, MALFORMED_RECORD, ImageRef, Parsed, Sample, Skip
from pipeline.chat import Chat
from pipeline.templates import LETTERS, format_options

CLAMPED_BOX = "clamped_box"


@dataclasses.dataclass(frozen=True)
class SftOptions:
    """Choices that change the samples a source yields."""

    shuffle_options: bool = False       # shuffle multiple-choice options (a copy, seeded per record)
    seed: int = 0
    whole_conversations: bool = False   # LLaVA: one sample per conversation instead of one per turn
    split: str = "train"                # which split of sources that mix splits in one file


class RecordError(ValueError):
    """A record that cannot become a sample; ``reason`` is a skip reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


Paths = dict[str, str]


@dataclasses.dataclass(frozen=True)
class SftSource:
    """One SFT dataset: its files, how to read them, how to turn a record into samples."""

    name: str
    license: str
    files: dict[str, str]                      # required path keys → description (for error messages)
    records: Callable[[Paths], Iterable[tuple[str, Any]]]
    samples: Callable[[str, Any, Paths, SftOptions], Iterable[Parsed]]
    optional_files: dict[str, str] = dataclasses.field(default_factory=dict)

    def check_paths(self, paths: Paths) -> None:
        """Fail before any work when a required path key is not given or a given path does not exist."""
        missing = [k for k in self.files if k not in paths]
        if missing:
            need = "; ".join(f"`{k}`: {self.files[k]}" for k in missing)
            raise ValueError(f"source {self.name} needs paths for {need}")
        described = {**self.optional_files, **self.files}
        for key, path in paths.items():
            if not os.path.exists(path):
                raise FileNotFoundError(f"source {self.name}: `{key}` ({described.get(key, key)}) not found at "
                                        f"{path}; fix the path in the sources file")

    def parse(self, paths: Paths, options: SftOptions = SftOptions()) -> Iterator[Parsed]:
        """Every sample (or skip) of the source, in file order."""
        for _, items in self.parse_records(paths, options):
            yield from items

    def parse_records(self, paths: Paths,
                      options: SftOptions = SftOptions()) -> Iterator[tuple[str, list[Parsed]]]:
        """``(record id, its samples or its skip)`` for every record of the source, in file order."""
        self.check_paths(paths)
        for record_id, raw in self.records(paths):
            try:
                yield record_id, list(self.samples(record_id, raw, paths, options))
            except RecordError as err:
                yield record_id, [Skip(err.reason, record_id, str(err))]
            except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
                yield record_id, [Skip(MALFORMED_RECORD, record_id, f"{type(err).__name__}: {err}")]


def load_json(path: str, what: str) -> Any:
    """Load a whole JSON file, failing with the file name and what it should be."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found at {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); expected {what}") from None


def json_list_records(path: str, what: str, id_key: str) -> Iterator[tuple[str, Any]]:
    """``(record id, record)`` for each element of a JSON list file (``id_key``, else ``#index``)."""
    records = load_json(path, what)
    if not isinstance(records, list):
        raise ValueError(f"{path} is not a JSON list: expected {what}")
    for i, rec in enumerate(records):
        yield str(rec.get(id_key, f"#{i}")) if isinstance(rec, dict) else f"#{i}", rec


def text(value: Any, what: str) -> str:
    """A non-empty stripped string, or a :class:`RecordError`."""
    if not isinstance(value, str):
        raise TypeError(f"{what} is {type(value).__name__}, expected a string")
    value = value.strip()
    if not value:
        raise RecordError(EMPTY_TEXT, f"empty {what}")
    return value


def sft_sample(sample_id: str, images: Sequence[ImageRef], turns: Sequence[tuple[str, str]],
               flags: Sequence[str] = ()) -> Sample:
    """A chat sample: system message, the images at the start of the first user turn, the turns."""
    return Sample(sample_id, list(images), Chat(tuple(turns)), tuple(flags))


def lettered_options(choices: Sequence[str], answer_index: int, options: SftOptions,
                     record_id: str) -> tuple[str, str]:
    """``A. c1\\nB. c2…`` and the answer letter; shuffles a *copy* (seeded per record) when enabled.

    The answer letter is recomputed from the answer text after shuffling, so repeated draws can never
    point at the wrong option.
    """
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"{len(choices)} choices; expected 2 to {len(LETTERS)}")
    if not 0 <= answer_index < len(choices):
        raise IndexError(f"answer index {answer_index} outside the {len(choices)} choices")
    shown = [text(c, "choice") for c in choices]
    answer = shown[answer_index]
    if options.shuffle_options:
        shown = list(shown)
        random.Random(f"{options.seed}:{record_id}").shuffle(shown)
    letter = LETTERS[shown.index(answer)]
    return format_options(shown), letter


def format_bbox(x: float, y: float, w: float, h: float, width: float, height: float) -> tuple[str, bool]:
    """COCO ``[x, y, w, h]`` pixels → ``<bbox>[x1, y1][x2, y2]</bbox>`` normalised, 3 decimals.

    Coordinates are divided by the original image size and clamped to [0, 1]; the second value says
    whether clamping changed anything (counted as ``clamped_box`` in the manifest).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} is not positive")
    raw = (x / width, y / height, (x + w) / width, (y + h) / height)
    box = [min(1.0, max(0.0, v)) for v in raw]
    clamped = any(a != b for a, b in zip(raw, box))
    return "<bbox>[{:.3f}, {:.3f}][{:.3f}, {:.3f}]</bbox>".format(*box), clamped


def first_existing(candidates: Sequence[str]) -> str:
    """The first path that exists, else the first candidate (reported later as a missing image)."""
    return next((c for c in candidates if os.path.isfile(c)), candidates[0])
