"""The training data loader: the mixture's MDS streams → decoded samples → collated micro batches.

``streaming.StreamingDataset`` does the heavy lifting: one ``Stream(local=folder, proportion=p)`` per
dataset folder (``Stream(remote=s3://..., local=cache)`` for a dataset in object storage, downloaded into
a per-node cache that ``data.cache_limit`` bounds by evicting shards), deterministic shuffling from a seed
(the same order on any number of ranks), sharding over ranks and workers, and a resumable position.
:class:`AKIStreamingDataset` only decodes each stored sample (JPEG bytes → ``pixel_values`` with the
model's image processor), and
:class:`AKIDataLoader` (a ``StreamingDataLoader``) collates with :class:`pipeline.data.collate.Collator`
and counts consumed samples, so ``state_dict()`` / ``load_state_dict()`` resume at the exact sample.

Before anything streams, every dataset folder's manifest is checked against the model: the number of
visual tokens N and the tokenizer fingerprint must match (:func:`pipeline.data.format.check_manifest`).
A record that cannot be decoded is not fatal: it is marked, dropped by the collator and counted in the
batch's ``skipped`` by reason.

Damaged data is never trained on (:mod:`pipeline.data.integrity`): every shard file is checked against
``index.json`` (size, and hash when the dataset has hashes) when it is downloaded or decompressed and
when a cached copy is reused, and every sample's token and modality ids are checked against the
tokenizer before the model sees them; what fails stops the run naming the dataset, the shard and the
sample, or with ``data.on_corrupt_shard: skip`` is dropped and counted.
"""
from __future__ import annotations

import dataclasses
import os
import posixpath
from typing import Any, Callable, Sequence

import numpy as np
import torch
from streaming import Stream, StreamingDataLoader, StreamingDataset

from pipeline.config import (Config, DataConfig, DataPhase, DatasetSource, data_phases, resolve_path,
                             training_dtype)
from pipeline.data import remote as storage
from pipeline.data.collate import SKIP_KEY, Collator
from pipeline.data.downloads import FailFastDownloads, RetryingStream
from pipeline.data.format import (MANIFEST_NAME, Manifest, check_manifest, image_lengths, read_manifest,
                                  split_images)
from pipeline.data.integrity import (CORRUPT_SAMPLE, CORRUPT_SHARD, EXIT_CORRUPT, CheckedStream, CorruptSampleError,
                                     CorruptShardError, check_on_corrupt, id_problem)
from pipeline.data.mixture import load_mixture
from pipeline.data.registration import one_registration_at_a_time
from pipeline.model.sizes import get_model_size
from pipeline.recipes import ConfigError, parse_proportion
from pipeline.tokens import IMAGE

# image_processor(list of JPEG bytes) -> float tensor [n, 3, H, W] (pipeline.model.images.ImageProcessor)
ImageProcessorFn = Callable[[Sequence[bytes]], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class StreamSource:
    """One dataset folder to stream and its sampling proportion; ``remote``: the URL ``local`` caches."""

    name: str
    local: str
    proportion: float
    remote: str | None = None
    samples: int | None = None
    """A seeded sample of this many samples per epoch (streaming's ``choose``); None: all, by ``proportion``."""

    def stream(self, on_corrupt: str = "stop") -> Stream:
        """The mosaicml-streaming Stream of this source (``on_corrupt``: ``data.on_corrupt_shard``)."""
        if self.samples is not None:
            return TrainingStream(name=self.name, on_corrupt=on_corrupt, remote=self.remote, local=self.local,
                                  choose=self.samples)
        return TrainingStream(name=self.name, on_corrupt=on_corrupt, remote=self.remote, local=self.local,
                              proportion=self.proportion)


class TrainingStream(CheckedStream, RetryingStream):
    """A stream whose shard files are checked (:class:`~pipeline.data.integrity.CheckedStream`) and whose
    downloads retry blips (:class:`~pipeline.data.downloads.RetryingStream`)."""


def resolve_sources(data: DataPhase | DataConfig, cache_dir: str | None = None) -> list[StreamSource]:
    """The streams of one data phase: from the mixture file (:mod:`pipeline.data.mixture`) or the
    ``datasets`` list. Remote datasets are cached under ``cache_dir`` (``data.cache_dir``).

    A mixture in a bucket is downloaded into the cache; its datasets are streamed from beside it.
    """
    if data.mixture is not None:
        path = data.mixture if storage.is_remote(data.mixture) else str(resolve_path(data.mixture))
        try:
            local_path = storage.fetch(path, storage.cache_folder(posixpath.dirname(path), cache_dir))
            entries = load_mixture(local_path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"config `data.mixture`: cannot read {path}: {e}") from None
        sources = [StreamSource(name, local, parse_proportion(p, f"{path}: stream {name!r} proportion"))
                   for name, local, p in entries]
        if storage.is_remote(path):     # entries are relative to the mixture file: the same in the bucket
            sources = [_beside(s, path, os.path.dirname(local_path), cache_dir) for s in sources]
    elif data.datasets:
        sources = [dataset_source(s, cache_dir) for s in data.datasets]
    else:
        raise ConfigError("config has no data: set `data.mixture` or `data.datasets`")
    sources = [s for s in sources if s.proportion > 0]
    if not sources:
        raise ConfigError("every data stream has proportion 0; give at least one a positive proportion")
    return sources


def dataset_source(s: DatasetSource, cache_dir: str | None) -> StreamSource:
    """The stream of one ``data.datasets`` (or ``eval.datasets``) entry: a local folder, or a URL and its
    cache folder."""
    if s.remote is None:
        assert s.path is not None
        return StreamSource(s.name or os.path.basename(os.path.normpath(s.path)), str(resolve_path(s.path)),
                            s.proportion, samples=s.samples)
    local = str(resolve_path(s.local)) if s.local else storage.cache_folder(s.remote, cache_dir)
    name = s.name or posixpath.basename(s.remote.rstrip("/"))
    return StreamSource(name, local, s.proportion, s.remote, s.samples)


def _beside(source: StreamSource, mixture_url: str, fetched_dir: str, cache_dir: str | None) -> StreamSource:
    """A stream of a mixture read from a bucket: its folder is relative to the mixture's URL."""
    url = storage.join(posixpath.dirname(mixture_url), os.path.relpath(source.local, fetched_dir))
    return dataclasses.replace(source, remote=url, local=storage.cache_folder(url, cache_dir))


def source_manifest(source: StreamSource) -> Manifest:
    """The manifest of a stream; a remote one is downloaded into its cache folder first."""
    if source.remote is not None:
        storage.download(storage.join(source.remote, MANIFEST_NAME), os.path.join(source.local, MANIFEST_NAME))
    return read_manifest(source.local)


def check_data_access(data: DataConfig) -> None:
    """Read the mixtures and every stream's manifest of every phase, so that a missing bucket, a wrong
    credential or a wrong prefix is one clear error before training starts (raises ConfigError)."""
    storage.configure_retries(data.download_retry, data.download_timeout)
    for source in (s for phase in data_phases(data) for s in resolve_sources(phase, data.cache_dir)):
        try:
            source_manifest(source)
        except (OSError, storage.RemoteError) as err:
            raise ConfigError(f"data stream {source.name!r}: {err}") from None


def check_sources(sources: Sequence[StreamSource], num_visual_tokens: int, fingerprint: str,
                  text_layout: str) -> None:
    """Refuse dataset folders built for another N or tokenizer (reads each manifest.json)."""
    for source in sources:
        check_manifest(source_manifest(source), source.remote or source.local, num_visual_tokens, fingerprint,
                       text_layout)


class AKIStreamingDataset(FailFastDownloads, StreamingDataset):
    """A StreamingDataset whose samples are decoded for the model.

    Each sample is ``{input_ids int64[L], modality_ids int64[L], pixel_values float[n, 3, S, S],
    source, id}``, or ``{"skip": reason, source, id}`` when the record cannot be used.

    ``num_token_ids`` (the tokenizer's size) and ``image_token_id`` bound the stored ids: a sample outside
    them raises :class:`~pipeline.data.integrity.CorruptSampleError` naming the dataset, the shard and the
    sample (``on_corrupt="skip"``: it is dropped as ``corrupt_sample``); None: only modality ids are checked.
    """

    def __init__(self, *, image_processor: ImageProcessorFn, image_size: int, num_visual_tokens: int,
                 num_token_ids: int | None = None, image_token_id: int | None = None, on_corrupt: str = "stop",
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.image_processor = image_processor
        self.image_size = image_size
        self.num_visual_tokens = num_visual_tokens
        self.num_token_ids = num_token_ids
        self.image_token_id = image_token_id
        self.on_corrupt = check_on_corrupt(on_corrupt)

    def on_exception(self, future: Any) -> None:
        """A shard found corrupt by a background download ends the process with its one line (status
        EXIT_CORRUPT, not the storage error's: running again would not help); other errors as before."""
        err = future.exception()
        if isinstance(err, CorruptShardError):
            from pipeline.watchdog import exit_now

            exit_now(str(err), EXIT_CORRUPT)
        else:
            super().on_exception(future)

    def _where(self, sample_id: int) -> str:
        """Where ``sample_id`` is stored: its dataset, shard file and index in the shard."""
        shard_id, index = self.spanner[sample_id]
        stream = self.streams[self.stream_per_shard[shard_id]]
        raw_info, zip_info = self.shards[shard_id].file_pairs[0]
        dataset = getattr(stream, "where", f"dataset {stream.remote or stream.local}")
        return f"{dataset}: shard {(zip_info or raw_info).basename}, sample {index}"

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
        stream = self.streams[self.stream_per_shard[self.spanner[sample_id][0]]]
        shard = self.shards[self.spanner[sample_id][0]]
        left_out = {SKIP_KEY: CORRUPT_SHARD, "source": getattr(stream, "name", ""), "id": ""}
        if isinstance(stream, CheckedStream) and stream.is_skipped(shard):
            return left_out
        try:
            raw = super().get_item(sample_id, retry)
        except RuntimeError:        # streaming's "failed to download a shard": one just left out, here?
            if isinstance(stream, CheckedStream) and stream.is_skipped(shard):
                return left_out
            raise
        meta = {"source": raw.get("source", ""), "id": raw.get("id", "")}
        modality_ids = np.asarray(raw["modality_ids"]).astype(np.int64)
        problem = id_problem(np.asarray(raw["input_ids"]), modality_ids, self.num_token_ids, self.image_token_id)
        if problem:
            if self.on_corrupt == "skip":
                return {SKIP_KEY: CORRUPT_SAMPLE, **meta}
            raise CorruptSampleError(f"{self._where(sample_id)} (record {meta['id']!r}): {problem}; the shard is "
                                     "damaged or was written with another tokenizer: rebuild the dataset, or set "
                                     "data.on_corrupt_shard=skip to drop such samples")
        n_slots = int((modality_ids == IMAGE).sum())
        try:
            lengths = image_lengths(raw["image_lengths"])
        except ValueError:
            return {SKIP_KEY: "unreadable_image", **meta}
        if n_slots % self.num_visual_tokens or n_slots // self.num_visual_tokens != len(lengths):
            return {SKIP_KEY: "image_count_mismatch", **meta}
        try:
            jpegs = split_images(raw["images"], lengths)
            pixel_values = (self.image_processor(jpegs) if jpegs
                            else torch.zeros(0, 3, self.image_size, self.image_size))
        except ValueError:
            return {SKIP_KEY: "unreadable_image", **meta}
        return {"input_ids": np.asarray(raw["input_ids"]).astype(np.int64), "modality_ids": modality_ids,
                "pixel_values": pixel_values, **meta}


class AKIDataLoader(StreamingDataLoader):
    """StreamingDataLoader that counts *samples* (not packed rows) for its resume state."""

    def _get_batch_size(self, batch: Any) -> int:
        return int(batch["num_samples"])


def build_dataset(config: Config, tokenizer_fingerprint: str, image_processor: ImageProcessorFn | None = None,
                  check: bool = True, phase: DataPhase | None = None, num_token_ids: int | None = None,
                  image_token_id: int | None = None) -> AKIStreamingDataset:
    """The StreamingDataset of one data phase (default: the recipe's first); checks the manifests first
    unless ``check`` is False. ``num_token_ids`` / ``image_token_id`` (from the tokenizer) bound every
    sample's ids (:class:`AKIStreamingDataset`).

    Streams limited to ``samples`` use streaming's fixed sampling: the same seeded subset in every epoch.
    """
    size = get_model_size(config.model.size)
    phase = phase or data_phases(config.data)[0]
    sources = resolve_sources(phase, config.data.cache_dir)
    if check:
        check_sources(sources, size.num_visual_tokens, tokenizer_fingerprint, config.model.text_layout)
    if image_processor is None:
        from pipeline.model.images import ImageProcessor

        image_processor = ImageProcessor(size.image_size)
    limited = any(s.samples is not None for s in sources)
    cache_limit = _phase_cache_limit(sources, config.data, phase.name)
    try:
        on_corrupt = check_on_corrupt(config.data.on_corrupt_shard)
    except ValueError as err:
        raise ConfigError(f"config `data.on_corrupt_shard`: {err}") from None
    streams = [s.stream(on_corrupt) for s in sources]
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:     # the node's first process, before any lock is taken
        for stream in streams:
            stream.verify_cache()
    try:
        with one_registration_at_a_time():
            dataset = AKIStreamingDataset(
                image_processor=image_processor, image_size=size.image_size, num_visual_tokens=size.num_visual_tokens,
                num_token_ids=num_token_ids, image_token_id=image_token_id, on_corrupt=on_corrupt,
                streams=streams, batch_size=config.train.micro_batch_size,
                shuffle=config.data.shuffle, shuffle_seed=config.data.shuffle_seed,
                sampling_method="fixed" if limited else "balanced", cache_limit=cache_limit,
                predownload=config.data.predownload, num_canonical_nodes=config.data.num_canonical_nodes,
                download_retry=config.data.download_retry, download_timeout=config.data.download_timeout)
    except ValueError as err:
        if cache_limit and "cache" in str(err).lower():         # streaming's own cache-limit checks
            raise ConfigError(f"config `data.cache_limit` ({cache_limit}): {err}") from None
        raise
    _check_cache_limit(dataset, config.data)
    for source, available in zip(sources, dataset.samples_per_stream.tolist()):
        if source.samples is not None and source.samples > available:
            raise ConfigError(f"data phase {phase.name!r}: stream {source.name!r} ({source.remote or source.local}) "
                              f"holds {available} samples, fewer than its `samples` ({source.samples}); lower "
                              "`samples` or drop it")
    return dataset


def _phase_cache_limit(sources: Sequence[StreamSource], data: DataConfig, phase: str) -> str | None:
    """``data.cache_limit`` for a phase of remote streams; None for a phase of local folders.

    To make room for a download, streaming evicts the least recently read shard of *any* stream of the
    dataset, a local folder's included (which could not be downloaded again), so a phase mixing both
    under a limit is refused.
    """
    remote = [s.remote is not None for s in sources]
    if not data.cache_limit or not any(remote):
        return None
    if not all(remote):
        local = [s.name for s in sources if s.remote is None]
        raise ConfigError(f"data phase {phase!r} mixes local folders ({', '.join(local)}) with remote datasets "
                          "under `data.cache_limit`: the cache would evict the local folders' own shards; "
                          "upload them too, or drop `data.cache_limit`")
    return data.cache_limit


def cache_shards_needed(readers: int, predownload: int) -> int:
    """The fewest shards a node's cache must hold for ``readers`` processes each ``predownload`` samples ahead.

    streaming evicts the least recently used shard; a reader's window of samples between the one it
    yields and the one it downloads spans up to ``predownload + 1`` shards (shuffled samples come from
    different shards), and as many more may have been read since the oldest of them was downloaded. A
    cache that cannot hold both can evict a shard still waited for, and streaming then waits for it
    forever. One more shard is the download in progress.
    """
    return readers * (2 * (predownload + 1) + 1)


def _check_cache_limit(dataset: StreamingDataset, data: DataConfig) -> None:
    """Refuse a ``data.cache_limit`` too small for the node's readers (ranks x loader workers)."""
    if not dataset.cache_limit:
        return
    readers = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) * max(1, data.num_workers)
    shards = cache_shards_needed(readers, dataset.predownload)
    largest = int(dataset.max_shard_size_across_all_streams)
    if dataset.cache_limit < shards * largest:
        raise ConfigError(f"config `data.cache_limit` ({dataset.cache_limit} bytes) is too small for {readers} "
                          f"reading process(es) per node (ranks x max(1, data.num_workers)), each "
                          f"{dataset.predownload} samples ahead (data.predownload): give at least "
                          f"{shards * largest} bytes ({shards} x the largest shard, {largest} bytes), lower "
                          "`data.predownload` or `data.num_workers`, or set no limit")


def build_collator(config: Config, pad_id: int) -> Collator:
    """The recipe's collate function (pixels in the training dtype: bf16 runs ship half the bytes)."""
    d = config.data
    return Collator(d.collate, pad_id, d.max_length, d.pack_tokens, d.pad_to_multiple_of,
                    get_model_size(config.model.size).image_size, training_dtype(config))


def build_dataloader(config: Config, tokenizer: Any, image_processor: ImageProcessorFn | None = None,
                     check: bool = True, phase: DataPhase | None = None,
                     pin_memory: bool | None = None) -> AKIDataLoader:
    """Micro-batch loader of one rank: ``micro_batch_size`` samples per batch, collated by the recipe.

    Batches land in pinned (page-locked) host memory when a GPU is present (``pin_memory`` None), so the
    trainer's ``non_blocking`` copies run asynchronously instead of staging through pageable memory.

    Rank and world size come from the usual environment (RANK, WORLD_SIZE, LOCAL_WORLD_SIZE) that
    torchrun / DeepSpeed set. ``tokenizer`` gives the pad id and the fingerprint the data must match.
    """
    from pipeline.model.tokenizer import image_token_id, tokenizer_fingerprint

    dataset = build_dataset(config, tokenizer_fingerprint(tokenizer), image_processor, check, phase,
                            num_token_ids=len(tokenizer), image_token_id=image_token_id(tokenizer))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return AKIDataLoader(dataset, batch_size=config.train.micro_batch_size, collate_fn=build_collator(config, pad_id),
                         num_workers=config.data.num_workers, drop_last=True,
                         persistent_workers=config.data.num_workers > 0,
                         pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                         # its own generator: starting an iterator (at step 0, or at a resumed step) then
                         # draws no number from torch's global RNG, which a resume restores for dropout
                         generator=torch.Generator().manual_seed(config.train.seed))


__all__ = ["AKIDataLoader", "AKIStreamingDataset", "StreamSource", "build_collator", "build_dataloader",
           "build_dataset", "check_data_access", "check_sources", "dataset_source", "resolve_sources",
           "source_manifest"]
