"""Shard integrity: every shard file is checked against ``index.json`` — its size, and its hash when the
dataset was written with hashes — when it is downloaded, decompressed, or found in the cache at start-up.

data_prep writes shards with :data:`SHARD_HASHES` (streaming's ``MDSWriter(hashes=...)``: the index then
records an xxh64 of every compressed and raw shard file). :class:`CheckedStream` is the
``streaming.Stream`` the loader reads them with:

* at start-up (the node's first process, before anything is read) every shard file already in the local
  folder is compared with the index: a file of the wrong size is removed; in a remote dataset's cache the
  hash is checked too (:meth:`CheckedStream.verify_cache`, one read of the cache), so a shard truncated
  or damaged under its real name by a crash is downloaded again instead of trusted;
* a shard downloaded (or decompressed from a local ``.zstd``) is checked before it is used: size and hash
  of the compressed file, decompression, size and hash of the raw file;
* a shard that fails is removed and downloaded once more; if the fresh copy fails too, the shard is
  corrupt at the source, and by ``on_corrupt`` (:data:`ON_CORRUPT`) the run stops with a
  :class:`CorruptShardError` naming the dataset and the object (``"stop"``, the default), or the shard is
  left out: its samples come out of the loader as skipped (reason :data:`CORRUPT_SHARD`), counted with the
  batch's other skips (``"skip"``).

A dataset written without hashes (before data_prep wrote them, or by another tool) still loads: its files
are checked by size, and a compressed shard by decompressing it.

Samples: :func:`id_problem` is what the loader (``pipeline.data.dataset.AKIStreamingDataset``) checks in
every sample before the model sees it — token ids within the tokenizer's, modality ids of a stored sample,
image slots holding the image token — refusing one that fails with a :class:`CorruptSampleError` naming
the dataset, the shard and the sample (``"skip"``: dropped as :data:`CORRUPT_SAMPLE`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from typing import Iterator

import numpy as np
import xxhash
from streaming import Stream
from streaming.base.compression import decompress
from streaming.base.format.base.reader import FileInfo, Reader
from streaming.base.format.index import get_index_basename
from streaming.base.hashing import get_hash, is_hash

from pipeline.tokens import IMAGE, TEXT_INPUT, TEXT_TARGET

logger = logging.getLogger(__name__)
STORED_MODALITIES = (TEXT_INPUT, IMAGE, TEXT_TARGET)     # never PAD: the collator pads

SHARD_HASHES = ["xxh64"]       # what data_prep writes (MDSWriter sorts and checks the names)
CHECKED_HASHES = ("xxh64", "xxh3_64", "xxh128", "sha1", "sha256", "md5")   # read: the first the index holds
ON_CORRUPT = ("stop", "skip")
CORRUPT_SHARD = "corrupt_shard"   # skip reason of the samples of a shard left out
CORRUPT_SAMPLE = "corrupt_sample"  # skip reason of a sample with out-of-range ids
SKIP_MARKER = ".corrupt"          # beside a left-out shard's name in the cache, while the run lasts
EXIT_CORRUPT = 65                 # EX_DATAERR: the data is damaged; running again will not help


class CorruptDataError(RuntimeError):
    """Training data that does not match what was written: the run must not train on it."""


class CorruptShardError(CorruptDataError):
    """A shard does not match ``index.json`` even after a fresh download (or has no copy to download)."""


class CorruptSampleError(CorruptDataError):
    """A sample whose token or modality ids are out of range (see :func:`id_problem`)."""


def check_on_corrupt(value: str) -> str:
    """``value`` if it is a known corrupt-shard policy, else a clear error."""
    if value not in ON_CORRUPT:
        raise ValueError(f"unknown corrupt-shard policy {value!r}; use one of {', '.join(ON_CORRUPT)}")
    return value


def id_problem(input_ids: np.ndarray, modality_ids: np.ndarray, num_token_ids: int | None,
               image_token_id: int | None = None) -> str | None:
    """What is wrong with a stored sample's ids, None if nothing: token ids outside ``[0, num_token_ids)``
    (the tokenizer's ids), modality ids other than TEXT_INPUT / IMAGE / TEXT_TARGET, lengths that differ,
    image slots that do not hold ``image_token_id`` (or that id outside an image slot)."""
    if len(input_ids) != len(modality_ids):
        return f"{len(input_ids)} input_ids but {len(modality_ids)} modality_ids"
    bad = np.flatnonzero(~np.isin(modality_ids, STORED_MODALITIES))
    if len(bad):
        return (f"modality id {int(modality_ids[bad[0]])} at position {int(bad[0])} (stored samples hold only "
                f"{', '.join(map(str, STORED_MODALITIES))})")
    if num_token_ids is not None:
        bad = np.flatnonzero((input_ids < 0) | (input_ids >= num_token_ids))
        if len(bad):
            return (f"token id {int(input_ids[bad[0]])} at position {int(bad[0])} is outside the tokenizer's "
                    f"{num_token_ids} ids")
    if image_token_id is not None:
        bad = np.flatnonzero((input_ids == image_token_id) != (modality_ids == IMAGE))
        if len(bad):
            return (f"position {int(bad[0])} holds token {int(input_ids[bad[0]])} with modality "
                    f"{int(modality_ids[bad[0]])}: image slots and the image token id {image_token_id} disagree")
    return None


def hash_name(info: FileInfo) -> str | None:
    """The hash algorithm to check ``info`` with: the first of :data:`CHECKED_HASHES` the index records
    (then any other streaming knows); None when the index holds no hash."""
    for algo in (*CHECKED_HASHES, *sorted(info.hashes or {})):
        if algo in (info.hashes or {}) and is_hash(algo):
            return algo
    return None


def file_problem(data: bytes | None, info: FileInfo, size: int | None = None) -> str | None:
    """What is wrong with a file's ``data`` (or, without data, its ``size``) against ``info``; None if
    nothing."""
    size = len(data) if data is not None else size
    if size != info.bytes:
        return f"{size} bytes instead of the {info.bytes} of index.json"
    algo = hash_name(info)
    if data is not None and algo is not None and get_hash(algo, data) != info.hashes[algo]:
        return f"its {algo} differs from index.json's"
    return None


def file_hash(path: str, algo: str, chunk: int = 1 << 22) -> str:
    """The hex digest of the file at ``path`` by ``algo`` (an xxhash or hashlib name), read in chunks
    (about 5 times faster than reading the whole file first)."""
    digest = getattr(xxhash, algo)() if algo in xxhash.algorithms_available else hashlib.new(algo)
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def verify_file(path: str, info: FileInfo, with_hash: bool = True) -> str | None:
    """What is wrong with the file at ``path`` against ``info`` (size, then hash if ``with_hash``); None
    if nothing."""
    size = os.path.getsize(path)
    algo = hash_name(info) if with_hash else None
    if size != info.bytes or algo is None:
        return file_problem(None, info, size)
    if file_hash(path, algo) != info.hashes[algo]:
        return f"its {algo} differs from index.json's"
    return None


class ShardMismatch(ValueError):
    """One shard file does not match the index (raised inside :meth:`CheckedStream.prepare_shard`)."""


class CheckedStream(Stream):
    """A ``streaming.Stream`` whose shard files are checked against the index (see the module docstring).

    ``name`` names the dataset in errors; ``on_corrupt`` is ``"stop"`` or ``"skip"``.
    """

    def __init__(self, *, name: str = "", on_corrupt: str = "stop", **kwargs):
        super().__init__(**kwargs)
        self.name = name
        self.on_corrupt = check_on_corrupt(on_corrupt)
        self._part = threading.local()      # the raw file info of the part being prepared, per thread

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_part", None)            # loader workers get a copy of the stream
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._part = threading.local()

    @property
    def downloads(self) -> bool:
        """True when shards come from a remote copy (and a damaged local copy can be downloaded again)."""
        return bool(self.remote) and self.remote != self.local

    # ---- naming ----------------------------------------------------------------------------------------

    @property
    def where(self) -> str:
        """The dataset, as errors name it."""
        location = self.remote or self.local
        return f"dataset {self.name!r} ({location})" if self.name else f"dataset {location}"

    def _path(self, info: FileInfo) -> str:
        return os.path.join(self.local, self.split, info.basename)

    def _object(self, info: FileInfo) -> str:
        """The object (or local file) a shard file comes from."""
        if self.remote:
            return "/".join(p.strip("/") for p in (self.remote, self.split, info.basename) if p)
        return self._path(info)

    def _files(self, shard: Reader) -> Iterator[FileInfo]:
        for raw_info, zip_info in shard.file_pairs:
            yield raw_info
            if zip_info is not None:
                yield zip_info

    def _marker(self, shard: Reader) -> str:
        return self._path(shard.file_pairs[0][0]) + SKIP_MARKER

    def is_skipped(self, shard: Reader) -> bool:
        """True when ``shard`` was found corrupt in this run and is left out (``on_corrupt: skip``)."""
        return os.path.exists(self._marker(shard))

    # ---- start-up: the files already in the local folder -------------------------------------------------

    def verify_cache(self) -> None:
        """Check every shard file already in a remote dataset's cache by size and hash against the cached
        ``index.json``, removing the damaged ones (they are downloaded again when used).

        For the node's first process before the dataset is built, so that reading a large cache holds
        neither streaming's set-up nor the node's registration lock. Nothing to do for a local folder or
        a cache without an index yet.
        """
        index = os.path.join(self.local, self.split, get_index_basename())
        if not self.downloads or not os.path.isfile(index):
            return
        try:
            with open(index) as f:
                shards = json.load(f)["shards"]
        except (OSError, ValueError, KeyError):
            return                              # streaming reports a broken index itself
        for shard in shards:
            for info in (FileInfo(**shard[k]) for k in ("raw_data", "zip_data") if shard.get(k)):
                path = self._path(info)
                problem = os.path.isfile(path) and verify_file(path, info)
                if problem:
                    logger.warning("%s: cached %s is damaged (%s): removed, it will be downloaded again",
                                   self.where, info.basename, problem)
                    os.remove(path)

    def set_up_local(self, shards: list[Reader], cache_usage_per_shard) -> None:
        """Remove the shard files that can be made again and do not have their size (then streaming counts
        what is left); forget the shards left out by an earlier run.

        A remote dataset's cache was also hashed by :meth:`verify_cache`. In a local dataset folder the
        decompressed files are checked by size (they are hashed when made, and the folder may be large);
        its source files — the ``.zstd`` files, checked when decompressed, or the shards of an
        uncompressed dataset — are never removed: a source of the wrong size is corrupt.
        """
        for shard in shards:
            if os.path.exists(self._marker(shard)):     # left out by an earlier run: try it again
                os.remove(self._marker(shard))
            for raw_info, zip_info in shard.file_pairs:
                if not self.downloads and zip_info is None:     # the shard itself: nothing to fetch again
                    problem = verify_file(self._path(raw_info), raw_info, with_hash=False)
                    if problem:
                        self._corrupt(shard, f"{raw_info.basename}: {problem}", "(no other copy to read)")
                    continue
                for info in (raw_info, zip_info if self.downloads else None):
                    if info is None or not os.path.isfile(self._path(info)):
                        continue
                    problem = verify_file(self._path(info), info, with_hash=False)
                    if problem:
                        logger.warning("%s: cached %s is damaged (%s): removed, it will be made again",
                                       self.where, info.basename, problem)
                        os.remove(self._path(info))
        super().set_up_local(shards, cache_usage_per_shard)

    # ---- use: download or decompress, then check ---------------------------------------------------------

    def _decompress_shard_part(self, zip_info: FileInfo, zip_filename: str, raw_filename: str,
                               compression: str | None) -> None:
        """Check the compressed file, decompress it, check the raw file, then write it (atomically)."""
        with open(zip_filename, "rb") as f:
            data = f.read()
        problem = file_problem(data, zip_info)
        if problem:
            raise ShardMismatch(f"{zip_info.basename}: {problem}")
        try:
            data = decompress(compression, data)
        except Exception as err:  # noqa: BLE001  (any decoder error means a damaged file)
            raise ShardMismatch(f"{zip_info.basename} cannot be decompressed ({type(err).__name__}: {err})") from None
        raw_info = getattr(self._part, "raw_info", None)
        problem = raw_info is not None and file_problem(data, raw_info)
        if problem:
            raise ShardMismatch(f"{raw_info.basename} (decompressed): {problem}")
        tmp = raw_filename + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.rename(tmp, raw_filename)
        if not self.safe_keep_zip:
            os.remove(zip_filename)

    def _prepare_shard_part(self, raw_info: FileInfo, zip_info: FileInfo | None = None,
                            compression: str | None = None) -> int:
        self._part.raw_info = raw_info      # for _decompress_shard_part
        return super()._prepare_shard_part(raw_info, zip_info, compression)

    def prepare_shard(self, shard: Reader) -> int:
        """Make ``shard`` present and checked; returns the change in cached bytes.

        A shard that fails its check is removed and downloaded once more; a second failure (or a first one
        with no remote copy) stops the run or, with ``on_corrupt: skip``, leaves the shard out.
        """
        if self.is_skipped(shard):
            return 0
        before = self._cached_bytes(shard)
        attempts = 2 if self.downloads else 1
        for attempt in range(attempts):
            try:
                super().prepare_shard(shard)
                for raw_info, zip_info in shard.file_pairs:
                    if zip_info is None and self.downloads:     # an uncompressed download: check it
                        problem = verify_file(self._path(raw_info), raw_info)
                        if problem:
                            raise ShardMismatch(f"{raw_info.basename}: {problem}")
                return self._cached_bytes(shard) - before
            except ShardMismatch as err:
                problem = str(err)
                self._remove(shard)
                if attempt + 1 < attempts:
                    logger.warning("%s: shard %s is damaged (%s): downloading it again", self.where,
                                   self._basename(shard), problem)
        self._corrupt(shard, problem, "after downloading it again" if self.downloads else "(no other copy to read)")
        return self._cached_bytes(shard) - before

    def _corrupt(self, shard: Reader, problem: str, again: str) -> None:
        """Stop the run (CorruptShardError) or, with ``on_corrupt: skip``, leave ``shard`` out."""
        source = self._object(shard.file_pairs[0][1] or shard.file_pairs[0][0])
        message = (f"{self.where}: shard {source} is corrupt {again}: {problem}; rebuild the dataset, or set "
                   f"data.on_corrupt_shard=skip to train without its samples")
        if self.on_corrupt == "stop":
            raise CorruptShardError(message)
        logger.warning("%s (left out: its samples are counted as skipped, reason %s)", message, CORRUPT_SHARD)
        with open(self._marker(shard), "w") as f:
            f.write(message + "\n")

    def _basename(self, shard: Reader) -> str:
        raw_info, zip_info = shard.file_pairs[0]
        return (zip_info or raw_info).basename

    def _cached_bytes(self, shard: Reader) -> int:
        return sum(os.path.getsize(p) for p in map(self._path, self._files(shard)) if os.path.isfile(p))

    def _remove(self, shard: Reader) -> None:
        """Remove the shard's files that can be made again (all of a download; the decompressed ones of a
        local folder)."""
        for raw_info, zip_info in shard.file_pairs:
            derived = [raw_info, zip_info] if self.downloads else [raw_info] if zip_info is not None else []
            for info in derived:
                if info is not None and os.path.isfile(self._path(info)):
                    os.remove(self._path(info))


__all__ = ["CORRUPT_SAMPLE", "CORRUPT_SHARD", "EXIT_CORRUPT", "CheckedStream", "CorruptDataError", "CorruptSampleError",
           "CorruptShardError", "ON_CORRUPT", "SHARD_HASHES", "check_on_corrupt", "file_problem", "hash_name",
           "id_problem", "verify_file"]
