"""Encode :class:`~data_prep.records.Sample` objects and write them as one MDS dataset + manifest.

:class:`Converter` turns a sample into an MDS row (images normalised, text tokenized with
:func:`pipeline.chat.encode`); :class:`DatasetWriter` wraps :class:`streaming.MDSWriter`, counts every
written row and every skip by reason in a :class:`pipeline.data.format.Manifest`, and marks the folder
finished only when everything is on disk (so an interrupted job is redone, a finished one skipped).
With a ``remote`` URL the folder is a local staging area: MDS uploads each shard as it is written, then
the manifest and, last, the done marker go to the bucket (see :mod:`pipeline.data.remote`).
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
from data_prep.records import CONVERSION_ERROR, OVER_LENGTH, WRITE_ERROR, Parsed, Sample, Skip
from pipeline.chat import DEFAULT_LAYOUT, LAYOUTS, OverLength, encode, get_layout
from pipeline.data import remote as storage
from pipeline.data.format import MANIFEST_NAME, MDS_COLUMNS, Manifest, join_images
from pipeline.data.integrity import SHARD_HASHES
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
        """An MDS row for ``item``, or a :class:`Skip` saying why it cannot be written.

        An unexpected error on one sample is that sample's problem, not the build's: it comes back as a
        ``conversion_error`` skip naming the error (counted in the manifest, the build goes on).
        """
        if isinstance(item, Skip):
            return item
        try:
            return self._convert(item, source)
        except Exception as err:  # noqa: BLE001  (one sample must never end a build; the error is kept)
            return Skip(CONVERSION_ERROR, item.id, f"{type(err).__name__}: {err}")

    def _convert(self, item: Sample, source: str) -> dict[str, Any] | Skip:
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
    """One dataset folder: MDS shards written with zstd, ``manifest.json`` and a done marker.

    ``index.json`` records an xxh64 of every shard file (compressed and raw,
    :data:`pipeline.data.integrity.SHARD_HASHES`): training checks each download and each cached copy
    against it.

    With ``remote`` (``s3://bucket/prefix``), ``folder`` is the local staging folder and everything is
    uploaded there; an unfinished remote folder is rewritten under the same object names (MDS numbers
    its shards), so a re-run never duplicates a shard.
    """

    def __init__(self, folder: str, manifest: Manifest, size_limit: str | int = SHARD_SIZE_LIMIT,
                 remote: str | None = None):
        self.folder = folder
        self.remote = remote
        self.manifest = manifest
        if os.path.isdir(folder):       # leftovers of an interrupted run are redone from scratch
            shutil.rmtree(folder)
        os.makedirs(folder)
        self._mds = MDSWriter(columns=MDS_COLUMNS, out=(folder, remote) if remote else folder,
                              compression="zstd", hashes=SHARD_HASHES, size_limit=size_limit)
        self._examples: dict[str, list[str]] = {}

    def add(self, result: dict[str, Any] | Skip) -> bool:
        """Write a row, or count a skip under its reason; True when a row was written.

        A row the MDS writer refuses (it encodes a row before adding it, so nothing partial is kept)
        is counted as ``write_error`` and the build goes on; an ``OSError`` (disk full, …) still stops it.
        """
        if isinstance(result, Skip):
            self._count_skip(result)
            return False
        truncated = result.pop("_truncated", False)
        flags = result.pop("_flags", ())
        try:
            self._mds.write(result)
        except OSError:
            raise                   # the disk, not the row: the build cannot go on
        except Exception as err:  # noqa: BLE001  (one row must never end a build; the error is kept)
            self._count_skip(Skip(WRITE_ERROR, str(result.get("id", "")), f"{type(err).__name__}: {err}"))
            return False
        for flag in flags:
            counts = self.manifest.extra.setdefault("counts", {})
            counts[flag] = counts.get(flag, 0) + 1
        self.manifest.samples += 1
        self.manifest.tokens += len(result["input_ids"])
        self.manifest.target_tokens += int(np.sum(result["modality_ids"] == TEXT_TARGET))
        self.manifest.truncated += int(truncated)
        return True

    def _count_skip(self, skip: Skip) -> None:
        """Count ``skip`` under its reason; the first few record ids (with the detail) are kept."""
        self.manifest.skip(skip.reason)
        kept = self._examples.setdefault(skip.reason, [])
        if len(kept) < SKIP_EXAMPLES_KEPT:
            kept.append(f"{skip.id}: {skip.detail}" if skip.detail else skip.id)

    def finish(self) -> Manifest:
        """Flush the shards, write the manifest, then the done marker."""
        self._mds.finish()
        os.makedirs(self.folder, exist_ok=True)     # MDS removes a staging folder once it is uploaded
        if self._examples:
            self.manifest.extra["skipped_examples"] = self._examples
        self.manifest.write(self.folder)
        with open(os.path.join(self.folder, DONE_MARKER), "w") as f:
            f.write("ok\n")
        if self.remote:
            for name in (MANIFEST_NAME, DONE_MARKER):       # the marker last: it says "complete"
                storage.upload(os.path.join(self.folder, name), storage.join(self.remote, name))
        return self.manifest

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()


def is_done(folder: str) -> bool:
    """True when ``folder`` (a local folder or a URL) holds a finished dataset (its marker is written last)."""
    marker = storage.join(folder, DONE_MARKER)
    return storage.exists(marker) if storage.is_remote(folder) else os.path.exists(marker)


def fetch_folder_file(folder: str, name: str, staging: str | None) -> str:
    """The local folder holding ``folder/name``: ``folder`` itself, or ``staging`` after a download."""
    if not storage.is_remote(folder):
        return folder
    assert staging is not None, f"{folder}: a remote folder needs a local staging folder"
    storage.download(storage.join(folder, name), os.path.join(staging, name))
    return staging


def add_output_args(parser, what: str) -> None:
    """``--out`` (a folder or ``s3://bucket/prefix``) and ``--staging`` for the converters."""
    parser.add_argument("--out", required=True,
                        help=f"output {what}: a local folder, or s3://bucket/prefix to upload there (endpoint "
                             "and credentials from S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)")
    parser.add_argument("--staging", default=None,
                        help="local staging folder for an s3:// --out (default: one under the temp folder, "
                             "derived from the URL)")


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


def check_reusable(folder: str, expected: Manifest, staging: str | None = None) -> None:
    """Refuse to reuse a finished folder that was built with another tokenizer, N, image size, budget or
    ``--holdout`` (``expected.heldout`` carries the new spec: :func:`data_prep.holdout.expected_entry`).

    A remote ``folder``'s manifest is read through the local ``staging`` folder.
    """
    from pipeline.data.format import read_manifest

    found = read_manifest(fetch_folder_file(folder, MANIFEST_NAME, staging))
    keys = ("num_visual_tokens", "image_size", "tokenizer_fingerprint", "text_layout")
    diffs = [f"{k} {getattr(found, k)} != {getattr(expected, k)}" for k in keys
             if getattr(found, k) != getattr(expected, k)]
    for k in ("max_text_tokens", "options", "ocr_granularity", "ocr_include_raw_caption"):
        if found.extra.get(k) != expected.extra.get(k):
            diffs.append(f"{k} {found.extra.get(k)} != {expected.extra.get(k)}")
    old_spec, new_spec = ((m.heldout or {}).get("spec") for m in (found, expected))
    if old_spec != new_spec:
        diffs.append(f"--holdout {old_spec if old_spec is not None else '(none)'} != "
                     f"{new_spec if new_spec is not None else '(none)'}")
    if diffs:
        raise ValueError(f"{folder} is already built with other settings ({'; '.join(diffs)}); "
                         "choose another output folder or delete it (SFT: pass --overwrite)")
