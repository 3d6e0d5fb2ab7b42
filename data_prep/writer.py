"""Encode :class:`~data_prep.records.Sample` objects and write them as one MDS dataset + manifest.

:class:`Converter` turns a sample into an MDS row (images normalised, text tokenized with
:func:`pipeline.chat.encode`); :class:`DatasetWriter` wraps :class:`streaming.MDSWriter`, counts every
written row and every skip by reason in a :class:`pipeline.data.format.Manifest`, and marks the folder
finished only when everything is on disk (so an interrupted job is redone, a finished one skipped).
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import shutil
from typing import Any

import numpy as np
from streaming import MDSWriter

from data_prep.images import ImageError, read_image_file, to_encoder_jpeg
from data_prep.records import OVER_LENGTH, Parsed, Skip
from pipeline.chat import DEFAULT_LAYOUT, LAYOUTS, OverLength, encode, get_layout
from pipeline.data.format import MDS_COLUMNS, Manifest, join_images
from pipeline.model.sizes import get_model_size
from pipeline.model.tokenizer import load_tokenizer, tokenizer_fingerprint
from pipeline.tokens import TEXT_TARGET

DONE_MARKER = "_DONE"
# Worker processes: fork where available (no re-import of torch/transformers per worker; workers only use
# numpy, PIL and the tokenizer), spawn elsewhere.
START_METHOD = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
SHARD_SIZE_LIMIT = "64mb"
SKIP_EXAMPLES_KEPT = 5     # record ids kept per skip reason in the manifest, for debugging


@dataclasses.dataclass(frozen=True)
class EncodeSettings:
    """Everything that decides the bytes of a sample; picklable so worker processes can rebuild it."""

    tokenizer_path: str
    model_size: str
    max_text_tokens: int
    text_layout: str = DEFAULT_LAYOUT     # pipeline.chat layout of the text


class Converter:
    """Turns samples into MDS rows for one tokenizer / model size / text budget."""

    def __init__(self, settings: EncodeSettings):
        self.settings = settings
        self.tokenizer = load_tokenizer(settings.tokenizer_path)
        size = get_model_size(settings.model_size)
        self.image_size = size.image_size
        self.num_visual_tokens = size.num_visual_tokens
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        self.layout = get_layout(settings.text_layout)

    def new_manifest(self, source: str, license: str, **extra: Any) -> Manifest:
        """An empty manifest stamped with this converter's N, image size and tokenizer."""
        return Manifest(source=source, num_visual_tokens=self.num_visual_tokens, image_size=self.image_size,
                        tokenizer_fingerprint=self.fingerprint, text_layout=self.layout.name, license=license,
                        extra={"max_text_tokens": self.settings.max_text_tokens,
                               "model_size": self.settings.model_size, **extra})

    def convert(self, item: Parsed, source: str) -> dict[str, Any] | Skip:
        """An MDS row for ``item``, or a :class:`Skip` saying why it cannot be written."""
        if isinstance(item, Skip):
            return item
        try:
            jpegs = [to_encoder_jpeg(read_image_file(ref) if isinstance(ref, str) else ref, self.image_size)
                     for ref in item.images]
        except ImageError as err:
            return Skip(err.reason, item.id, str(err))
        try:
            segments = self.layout.segments(item.content, len(item.images))
            enc = encode(self.tokenizer, segments, self.num_visual_tokens, self.settings.max_text_tokens)
        except OverLength as err:
            return Skip(OVER_LENGTH, item.id, str(err))
        if enc.num_images != len(jpegs):
            raise AssertionError(f"sample {item.id}: {enc.num_images} image slots but {len(jpegs)} images")
        images, lengths = join_images(jpegs)
        return {"input_ids": enc.input_ids, "modality_ids": enc.modality_ids, "images": images,
                "image_lengths": lengths, "source": source, "id": item.id, "_truncated": enc.truncated,
                "_flags": tuple(item.flags)}


_CONVERTERS: dict[EncodeSettings, Converter] = {}


def cached_converter(settings: EncodeSettings) -> Converter:
    """This process's converter for ``settings`` (worker processes load the tokenizer once)."""
    if settings not in _CONVERTERS:
        _CONVERTERS[settings] = Converter(settings)
    return _CONVERTERS[settings]


def convert_item(settings: EncodeSettings, source: str, item: Parsed) -> dict[str, Any] | Skip:
    """Module-level entry point for worker pools: convert one parsed item."""
    return cached_converter(settings).convert(item, source)


class DatasetWriter:
    """One dataset folder: MDS shards written with zstd, ``manifest.json`` and a done marker."""

    def __init__(self, folder: str, manifest: Manifest, size_limit: str | int = SHARD_SIZE_LIMIT):
        self.folder = folder
        self.manifest = manifest
        if os.path.isdir(folder):       # leftovers of an interrupted run are redone from scratch
            shutil.rmtree(folder)
        os.makedirs(folder)
        self._mds = MDSWriter(columns=MDS_COLUMNS, out=folder, compression="zstd", size_limit=size_limit)
        self._examples: dict[str, list[str]] = {}

    def add(self, result: dict[str, Any] | Skip) -> None:
        """Write a row, or count a skip under its reason."""
        if isinstance(result, Skip):
            self.manifest.skip(result.reason)
            kept = self._examples.setdefault(result.reason, [])
            if len(kept) < SKIP_EXAMPLES_KEPT:
                kept.append(f"{result.id}: {result.detail}" if result.detail else result.id)
            return
        truncated = result.pop("_truncated", False)
        for flag in result.pop("_flags", ()):
            counts = self.manifest.extra.setdefault("counts", {})
            counts[flag] = counts.get(flag, 0) + 1
        self._mds.write(result)
        self.manifest.samples += 1
        self.manifest.tokens += len(result["input_ids"])
        self.manifest.target_tokens += int(np.sum(result["modality_ids"] == TEXT_TARGET))
        self.manifest.truncated += int(truncated)

    def finish(self) -> Manifest:
        """Flush the shards, write the manifest, then the done marker."""
        self._mds.finish()
        if self._examples:
            self.manifest.extra["skipped_examples"] = self._examples
        self.manifest.write(self.folder)
        with open(os.path.join(self.folder, DONE_MARKER), "w") as f:
            f.write("ok\n")
        return self.manifest

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()


def is_done(folder: str) -> bool:
    """True when ``folder`` holds a finished dataset (its done marker is written last)."""
    return os.path.exists(os.path.join(folder, DONE_MARKER))


def add_encode_args(parser, default_max_text_tokens: int) -> None:
    """The command-line flags every converter shares (tokenizer, model size, text budget, workers)."""
    parser.add_argument("--tokenizer", required=True,
                        help="tokenizer folder or hub id (loaded with pipeline.model.tokenizer.load_tokenizer)")
    parser.add_argument("--model-size", default="aki-4b",
                        help="pipeline.model.sizes entry: gives the image size and N visual tokens per image")
    parser.add_argument("--max-text-tokens", type=int, default=default_max_text_tokens,
                        help="text-token budget per sample (image slots not counted); longer targets are cut")
    parser.add_argument("--text-layout", default=DEFAULT_LAYOUT, choices=sorted(LAYOUTS),
                        help="text layout (pipeline.chat): 'released' is the released AKI-4B's, the default")
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="worker processes (default: all cores)")


def settings_from_args(args) -> EncodeSettings:
    get_model_size(args.model_size)          # fail early on an unknown size
    return EncodeSettings(str(args.tokenizer), args.model_size, args.max_text_tokens, args.text_layout)


def check_reusable(folder: str, expected: Manifest) -> None:
    """Refuse to reuse a finished folder that was built with another tokenizer, N, image size or budget."""
    from pipeline.data.format import read_manifest

    found = read_manifest(folder)
    keys = ("num_visual_tokens", "image_size", "tokenizer_fingerprint", "text_layout")
    diffs = [f"{k} {getattr(found, k)} != {getattr(expected, k)}" for k in keys
             if getattr(found, k) != getattr(expected, k)]
    for k in ("max_text_tokens", "options", "ocr_granularity", "ocr_include_raw_caption"):
        if found.extra.get(k) != expected.extra.get(k):
            diffs.append(f"{k} {found.extra.get(k)} != {expected.extra.get(k)}")
    if diffs:
        raise ValueError(f"{folder} is already built with other settings ({'; '.join(diffs)}); "
                         "choose another output folder or delete it (SFT: pass --overwrite)")
