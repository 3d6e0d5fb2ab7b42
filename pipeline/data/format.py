"""The on-disk sample format (MDS columns) and the per-dataset manifest.

Data prep writes, and training reads, exactly these columns::

    input_ids      ndarray:int32   chat-templated ids, each image expanded to N placeholder ids
    modality_ids   ndarray:uint8   one pipeline.tokens id per token (never PAD)
    images         bytes           the sample's JPEG files, concatenated (empty when text-only)
    image_lengths  bytes           byte length of each JPEG in ``images``: little-endian int32, one per
                                   image (empty when text-only; MDS ndarray columns refuse empty arrays)
    source         str             dataset name (``vqav2``, ``kale``, ...)
    id             str             the record's id in its original files

Next to the MDS ``index.json`` each dataset folder holds ``manifest.json`` (see :class:`Manifest`):
N, image size, tokenizer fingerprint, counts, and the samples skipped by reason. Training refuses data
whose N or tokenizer fingerprint does not match the model (:func:`check_manifest`).

A dataset built with ``--holdout`` (:mod:`data_prep.holdout`) has a held-out twin, an MDS dataset of the
same format, and its manifest says where (absent without ``--holdout``)::

    "heldout": {"path": "../heldout/vqav2",   # relative to this dataset's folder (or URL)
                "samples": 1000,               # samples in the held-out dataset
                "spec": 1000,                  # the --holdout value: a count (int) or a fraction (float)
                "ids": ["262148000", ...]}     # the ``id`` of every held-out sample, in written order

:func:`heldout_path` resolves ``path`` against a local folder or an ``s3://`` URL.
"""
from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import urllib.parse
from collections import Counter
from typing import Any

import numpy as np

MDS_COLUMNS: dict[str, str] = {
    "input_ids": "ndarray:int32",
    "modality_ids": "ndarray:uint8",
    "images": "bytes",
    "image_lengths": "bytes",
    "source": "str",
    "id": "str",
}
MANIFEST_NAME = "manifest.json"
LENGTH_DTYPE = np.dtype("<i4")     # one ``image_lengths`` entry


def join_images(jpegs: list[bytes]) -> tuple[bytes, bytes]:
    """Pack JPEG files into the ``images`` / ``image_lengths`` columns (both empty for no image)."""
    return b"".join(jpegs), np.array([len(j) for j in jpegs], LENGTH_DTYPE).tobytes()


def image_lengths(column: bytes | np.ndarray) -> np.ndarray:
    """The ``image_lengths`` column as an int array (datasets written before it was bytes stored an array)."""
    if isinstance(column, (bytes, bytearray, memoryview)):
        if len(column) % LENGTH_DTYPE.itemsize:
            raise ValueError(f"image_lengths holds {len(column)} bytes, not a whole number of int32")
        return np.frombuffer(column, LENGTH_DTYPE)
    return np.asarray(column)


def split_images(blob: bytes, lengths: bytes | np.ndarray) -> list[bytes]:
    """Inverse of :func:`join_images`."""
    lengths = image_lengths(lengths)
    if int(np.sum(lengths)) != len(blob):
        raise ValueError(f"image_lengths sum to {int(np.sum(lengths))} bytes but images holds {len(blob)}")
    out, start = [], 0
    for n in lengths.tolist():
        out.append(blob[start:start + n])
        start += n
    return out


@dataclasses.dataclass
class Manifest:
    """What a dataset folder holds and how it was made."""

    source: str
    num_visual_tokens: int
    image_size: int
    tokenizer_fingerprint: str
    text_layout: str = ""      # pipeline.chat layout the text is in ("" in manifests older than layouts)
    samples: int = 0
    tokens: int = 0
    target_tokens: int = 0
    truncated: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    license: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    heldout: dict[str, Any] | None = None
    """Where this dataset's held-out samples are (``path``, ``samples``, ``spec``, ``ids``); None without."""

    def skip(self, reason: str, n: int = 1) -> None:
        """Count a record dropped for ``reason``."""
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    def merge(self, other: "Manifest") -> None:
        """Add another part's counts (e.g. one worker's shard range) into this one."""
        for field in ("samples", "tokens", "target_tokens", "truncated"):
            setattr(self, field, getattr(self, field) + getattr(other, field))
        self.skipped = dict(Counter(self.skipped) + Counter(other.skipped))

    def write(self, folder: str | os.PathLike) -> str:
        path = os.path.join(folder, MANIFEST_NAME)
        tmp = path + ".tmp"
        data = dataclasses.asdict(self)
        if data["heldout"] is None:         # datasets built without --holdout keep their old manifest
            del data["heldout"]
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
        return path


def read_manifest(folder: str | os.PathLike) -> Manifest:
    """Read ``manifest.json`` of a dataset folder, with a clear error when it is missing."""
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {folder} is not a dataset written by data_prep/ "
                                "(run data_prep/build_pretrain_shards.py or build_sft_mixture.py)")
    with open(path) as f:
        data = json.load(f)
    known = {f.name for f in dataclasses.fields(Manifest)}
    return Manifest(**{k: v for k, v in data.items() if k in known})


def heldout_path(dataset_location: str, manifest: Manifest) -> str | None:
    """The held-out twin of the dataset at ``dataset_location`` (a folder or an ``s3://`` URL), resolved
    like the location (``..`` normalised); None when the dataset was built without ``--holdout``."""
    if not manifest.heldout:
        return None
    relative = str(manifest.heldout["path"])
    parsed = urllib.parse.urlparse(str(dataset_location))
    if not parsed.scheme:
        return os.path.normpath(os.path.join(str(dataset_location), relative))
    path = posixpath.normpath(posixpath.join("/" + parsed.path.strip("/"), relative))
    return f"{parsed.scheme}://{parsed.netloc}{path.rstrip('/')}"


def check_manifest(manifest: Manifest, folder: str, num_visual_tokens: int, fingerprint: str,
                   text_layout: str) -> None:
    """Refuse data made for another model: N visual tokens, tokenizer and text layout must match."""
    if manifest.num_visual_tokens != num_visual_tokens:
        raise ValueError(f"dataset {folder} was built with N={manifest.num_visual_tokens} visual tokens per "
                         f"image but the model uses N={num_visual_tokens}; rebuild it with the model's size")
    if manifest.tokenizer_fingerprint != fingerprint:
        raise ValueError(f"dataset {folder} was tokenized with tokenizer {manifest.tokenizer_fingerprint} but "
                         f"the model's tokenizer is {fingerprint}: its token ids differ (shards made before "
                         "<pad>/<image>/<|endofchunk|> took the released AKI ids, or with another tokenizer "
                         "folder); rebuild it with data_prep/build_pretrain_shards.py or build_sft_mixture.py "
                         "--tokenizer <the model's tokenizer folder>")
    if manifest.text_layout != text_layout:
        raise ValueError(f"dataset {folder} holds text in layout {manifest.text_layout or '(unrecorded)'!r} but "
                         f"the recipe trains layout {text_layout!r} (model.text_layout); rebuild it with "
                         f"--text-layout {text_layout} or set model.text_layout={manifest.text_layout}")
