"""Held-out datasets of a run, for the evaluation while training (:mod:`pipeline.train_eval`).

Which ones: ``eval.datasets`` when the recipe lists them (local folders or ``s3://`` URLs, resolved like
``data.datasets``), otherwise the held-out twins that data prep wrote beside the run's own datasets
(``--holdout``; each training manifest's ``heldout`` field names its folder, resolved by
:func:`pipeline.data.format.heldout_path`), over every data phase, each folder once, labelled with the
training stream's name.

How they are read: one streaming dataset per folder, by sample index (no shuffle, no sharding over
ranks: the evaluator picks its samples), with the training data's checks (shard hashes, id ranges).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.data.dataset import AKIStreamingDataset, StreamSource


def heldout_sources(config: Config) -> list[StreamSource]:
    """The held-out datasets of a run (see the module docstring). Reads manifests (downloads remote ones)."""
    from pipeline.config import DatasetSource, data_phases
    from pipeline.data import remote as storage
    from pipeline.data.dataset import StreamSource, dataset_source, resolve_sources, source_manifest
    from pipeline.data.format import heldout_path

    cache_dir = config.data.cache_dir
    if config.eval.datasets is not None:
        return [dataset_source(DatasetSource(path=s.path, remote=s.remote, local=s.local, name=s.name), cache_dir)
                for s in config.eval.datasets]
    out, seen = [], set()
    for phase in data_phases(config.data):
        for source in resolve_sources(phase, cache_dir):
            location = heldout_path(source.remote or source.local, source_manifest(source))
            if location is None or location in seen:
                continue
            seen.add(location)
            if storage.is_remote(location):
                out.append(StreamSource(source.name, storage.cache_folder(location, cache_dir), 1.0, location))
            else:
                out.append(StreamSource(source.name, location, 1.0))
    return out


def open_heldout(source: StreamSource, config: Config, tokenizer: Any, image_processor: Any) -> AKIStreamingDataset:
    """A streaming dataset of one held-out folder, read by index (``get_item``)."""
    from pipeline.data.dataset import AKIStreamingDataset
    from pipeline.data.registration import one_registration_at_a_time
    from pipeline.model.sizes import get_model_size
    from pipeline.model.tokenizer import image_token_id

    size = get_model_size(config.model.size)
    on_corrupt = config.data.on_corrupt_shard
    with one_registration_at_a_time():
        return AKIStreamingDataset(
            image_processor=image_processor, image_size=size.image_size, num_visual_tokens=size.num_visual_tokens,
            num_token_ids=len(tokenizer), image_token_id=image_token_id(tokenizer), on_corrupt=on_corrupt,
            streams=[source.stream(on_corrupt)], batch_size=config.eval.micro_batch, shuffle=False,
            download_retry=config.data.download_retry, download_timeout=config.data.download_timeout)


__all__ = ["heldout_sources", "open_heldout"]
