"""Pre-training shards: img2dataset webdataset tars → MDS in the PT template, in parallel.

Sources are a registry (:data:`PRETRAIN_SOURCES`): each knows how to read a caption out of a sample's
tar members. BLIP3-Kale keeps its caption in ``.txt``; for BLIP3-OCR-200m the ``.txt`` holds the
``captions`` JSON list and the caption is chosen by its ``granularity`` / ``include_datacomp_raw_cap``
fields (never by list position). Granularity 0 without the raw alt-text is the paper's "Level 1, basic
text extraction".

Layout of the output folder::

    OUT/part-00000/   MDS shards + index.json + manifest.json + _DONE  (one contiguous range of tars)
    OUT/part-00001/   ...
    OUT/index.json    all parts merged (streaming.base.util.merge_index)
    OUT/manifest.json all parts' counts merged

``OUT`` may be ``s3://bucket/prefix``: each part is written to a local staging folder and uploaded by
MDS as it goes (its manifest and done marker after it), the merged index and manifest are uploaded
beside the parts, and "finished" means the part's done marker is in the bucket.

Parts are fixed by ``tars_per_part`` (not by the number of workers), so the output is the same for any
worker count, a re-run skips finished parts, and several jobs (``job_index`` of ``num_jobs``) can share
one output folder; whichever job finds every part finished merges the index.

``--holdout FRACTION`` (:mod:`data_prep.holdout`) writes the samples whose key (the img2dataset sample
key, e.g. ``000010002``) hashes below the fraction to a held-out dataset beside the training one, part
for part, merged the same way::

    OUT/heldout/part-00000/   the held-out samples of part 0 (its manifest counts them)
    OUT/heldout/index.json    the held-out parts merged; OUT/heldout/manifest.json their counts
    OUT/manifest.json         "heldout": {"path": "heldout", "samples", "spec", "ids"} (parts: "../heldout/part-…")

Each index is merged from the list of its own parts' index files, so the training index never holds a
held-out shard and the held-out index never a training shard. Pre-training takes a fraction only: a
count (the N smallest hashes of all samples) would need every tar read before any part is written, in
every job, and would tie the finished parts to the whole list of tars; give ``N / samples`` instead.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import tempfile
from typing import Callable

from tqdm import tqdm

from data_prep.holdout import HELDOUT_DIR, Holdout, expected_entry, manifest_entry, parse_holdout
from data_prep.records import EMPTY_TEXT, MALFORMED_RECORD, MISSING_IMAGE, NON_UTF8_TEXT, Parsed, Sample, Skip
from data_prep.tars import Members, list_tars, read_samples
from data_prep.writer import (SHARD_SIZE_LIMIT, START_METHOD, DatasetWriter, EncodeSettings, cached_converter,
                              check_reusable, fetch_folder_file, is_done)
from pipeline.chat import Caption
from pipeline.data import remote as storage
from pipeline.data.format import MANIFEST_NAME, Manifest, read_manifest

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
PART_FORMAT = "part-{:05d}"


@dataclasses.dataclass(frozen=True)
class CaptionOptions:
    """How to pick a caption: OCR-200m level selection (ignored by single-caption sources)."""

    ocr_granularity: int = 0
    ocr_include_raw_caption: bool = False


class CaptionError(ValueError):
    """A caption that cannot be used; ``reason`` is a skip reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _text(members: Members) -> str:
    if "txt" not in members:
        raise CaptionError(MALFORMED_RECORD, "sample has no .txt member")
    try:
        return members["txt"].decode("utf-8")
    except UnicodeDecodeError as err:
        raise CaptionError(NON_UTF8_TEXT, f".txt is not UTF-8: {err}") from None


def kale_caption(members: Members, options: CaptionOptions) -> str:
    """BLIP3-Kale: the ``.txt`` member is the caption."""
    return _text(members)


def ocr200m_caption(members: Members, options: CaptionOptions) -> str:
    """BLIP3-OCR-200m: pick the entry of the ``captions`` JSON list with the wanted granularity."""
    try:
        entries = json.loads(_text(members))
        matches = [e["text"] for e in entries
                   if e["granularity"] == options.ocr_granularity
                   and bool(e["include_datacomp_raw_cap"]) == options.ocr_include_raw_caption]
    except (json.JSONDecodeError, TypeError, KeyError) as err:
        raise CaptionError(MALFORMED_RECORD, f"captions JSON does not parse: {err!r}") from None
    if len(matches) != 1 or not isinstance(matches[0], str):
        raise CaptionError(MALFORMED_RECORD, f"{len(matches)} captions with granularity "
                           f"{options.ocr_granularity} (raw caption {options.ocr_include_raw_caption})")
    return matches[0]


@dataclasses.dataclass(frozen=True)
class PretrainSource:
    """A captioning dataset downloaded with img2dataset."""

    name: str
    license: str
    caption: Callable[[Members, CaptionOptions], str]


PRETRAIN_SOURCES: dict[str, PretrainSource] = {s.name: s for s in (
    PretrainSource("kale", "BLIP3-Kale: Apache-2.0, research purposes only; image rights with their owners",
                   kale_caption),
    PretrainSource("ocr200m", "BLIP3-OCR-200m: Apache-2.0; image rights with their owners (DataComp-1B URLs)",
                   ocr200m_caption),
)}


def get_source(name: str) -> PretrainSource:
    try:
        return PRETRAIN_SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown pre-training source {name!r}; known: {', '.join(PRETRAIN_SOURCES)}") from None


def parse_sample(key: str, members: Members, source: PretrainSource, options: CaptionOptions) -> Parsed:
    """One tar sample → a PT :class:`Sample` (``<image>{caption}<|endofchunk|>``) or a :class:`Skip`."""
    image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
    if image is None:
        return Skip(MISSING_IMAGE, key, "no image member in the tar")
    try:
        caption = source.caption(members, options).strip()
    except CaptionError as err:
        return Skip(err.reason, key, str(err))
    if not caption:
        return Skip(EMPTY_TEXT, key, "empty caption")
    return Sample(id=key, images=[image], content=Caption(caption))


@dataclasses.dataclass(frozen=True)
class PartJob:
    """One worker's unit: a contiguous range of tars written to one MDS sub-folder."""

    folder: str
    tars: tuple[str, ...]
    source: str
    options: CaptionOptions
    settings: EncodeSettings
    size_limit: str | int
    remote: str | None = None
    """The part's URL when the output is in object storage (``folder`` is then its staging folder)."""
    holdout: Holdout | None = None
    heldout_folder: str | None = None
    """Where the part's held-out samples go (``OUT/heldout/part-…``; a staging folder for a bucket)."""
    heldout_remote: str | None = None

    @property
    def location(self) -> str:
        """Where the finished part lives: its URL, or its folder."""
        return self.remote or self.folder


def build_part(job: PartJob) -> Manifest:
    """Convert the tars of one part into its own MDS folder (re-done from scratch if unfinished); with a
    holdout, the held-out samples into ``job.heldout_folder``, finished before the part itself."""
    converter = cached_converter(job.settings)
    source = get_source(job.source)
    manifest = converter.new_manifest(source.name, source.license, input_tars=len(job.tars),
                                      **dataclasses.asdict(job.options))
    writer = DatasetWriter(job.folder, manifest, job.size_limit, job.remote)
    held_writer, held_ids = None, []
    if job.holdout is not None:
        held_manifest = converter.new_manifest(source.name, source.license, input_tars=len(job.tars),
                                               holdout=job.holdout.value, **dataclasses.asdict(job.options))
        held_writer = DatasetWriter(job.heldout_folder, held_manifest, job.size_limit, job.heldout_remote)
    for tar in job.tars:
        for item in read_samples(tar):
            parsed = item if isinstance(item, Skip) else parse_sample(*item, source, job.options)
            result = converter.convert(parsed, source.name)
            if held_writer is None or not job.holdout.holds_out(source.name, parsed.id):
                writer.add(result)
            elif held_writer.add(result):
                held_ids.append(parsed.id)
    if held_writer is not None:
        name = os.path.basename(job.folder.rstrip("/"))
        manifest.heldout = manifest_entry(f"../{HELDOUT_DIR}/{name}", held_writer.finish().samples, job.holdout,
                                          held_ids)
    writer.finish()
    return manifest


def fraction_holdout(holdout: Holdout | str | float | None) -> Holdout | None:
    """The parsed ``--holdout``; a count is refused (see the module docstring)."""
    holdout = None if holdout is None else parse_holdout(holdout)
    if holdout is not None and holdout.is_count:
        raise ValueError(f"--holdout {holdout}: pre-training sources take a fraction of the samples (e.g. "
                         f"--holdout 0.001), not a count: their tars are converted in independent parts; for "
                         f"about {holdout} held-out samples pass {holdout} / (samples in the source)")
    return holdout


def build_pretrain(inputs: list[str], out: str, source: str, settings: EncodeSettings,
                   options: CaptionOptions = CaptionOptions(), workers: int | None = None,
                   tars_per_part: int = 8, job_index: int = 0, num_jobs: int = 1,
                   size_limit: str | int = SHARD_SIZE_LIMIT, staging: str | None = None,
                   holdout: Holdout | str | float | None = None) -> Manifest | None:
    """Convert the tars in ``inputs`` into ``out``; returns the merged manifest once every part is done.

    ``out`` may be an ``s3://`` URL; ``staging`` is then the local folder the parts are written to before
    the upload (default: :func:`pipeline.data.remote.staging_folder`). ``holdout`` (a fraction) also
    writes the held-out samples to ``out/heldout`` (see the module docstring).
    """
    get_source(source)
    holdout = fraction_holdout(holdout)
    if not 0 <= job_index < num_jobs:
        raise ValueError(f"job_index {job_index} must be in [0, num_jobs={num_jobs})")
    remote = storage.is_remote(out)
    if remote:
        staging = staging or storage.staging_folder(out)
        storage.check_bucket(out)
    local_root = staging if remote else out
    tars = list_tars(inputs)
    ranges = [tuple(tars[i:i + tars_per_part]) for i in range(0, len(tars), tars_per_part)]
    parts = [PART_FORMAT.format(i) for i in range(len(ranges))]
    jobs = [PartJob(os.path.join(local_root, part), r, source, options, settings, size_limit,
                    storage.join(out, part) if remote else None, holdout,
                    os.path.join(local_root, HELDOUT_DIR, part) if holdout else None,
                    storage.join(out, HELDOUT_DIR, part) if holdout and remote else None)
            for part, r in zip(parts, ranges)]
    per_job = -(-len(jobs) // num_jobs)
    mine = jobs[job_index * per_job:(job_index + 1) * per_job]
    done = {j.location for j in jobs if is_done(j.location)}
    pending = [j for j in mine if j.location not in done]
    if len(pending) < len(mine):
        expected = cached_converter(settings).new_manifest(source, "", **dataclasses.asdict(options))
        expected.heldout = expected_entry(holdout)
        for job in mine:
            if job.location in done:
                check_reusable(job.location, expected, job.folder)
    os.makedirs(local_root, exist_ok=True)
    workers = max(1, min(workers or os.cpu_count() or 1, len(pending)))
    bar = tqdm(total=len(mine), initial=len(mine) - len(pending), desc=f"{source} parts", unit="part")
    if workers == 1:
        for job in pending:
            build_part(job)
            bar.update()
    else:
        with multiprocessing.get_context(START_METHOD).Pool(workers) as pool:
            for _ in pool.imap_unordered(build_part, pending):
                bar.update()
    bar.close()
    finished = sum(is_done(j.location) for j in jobs)
    if finished < len(jobs):
        print(f"{out}: {finished}/{len(jobs)} parts finished; the index is merged "
              "when the last job finishes (or re-run with the same arguments)")
        return None
    if holdout is not None:         # the held-out index first: a merged training index means both are there
        merge_parts(storage.join(out, HELDOUT_DIR), [storage.join(out, HELDOUT_DIR, p) for p in parts], staging)
    return merge_parts(out, [j.location for j in jobs], staging)


def merge_parts(out: str, folders: list[str], staging: str | None = None) -> Manifest:
    """Merge the parts' MDS indexes into ``out/index.json`` and their manifests into one.

    For an ``s3://`` ``out`` the parts are URLs: their indexes and manifests are read from the bucket and
    the merged ones uploaded beside them. Two jobs may merge at once (array tasks that finish together,
    then the merge job): each works in a private temporary folder (under ``out``, or under ``staging`` for
    a bucket) and replaces the index, then the manifest, each in one step (a rename or one upload).
    """
    from streaming.base.util import merge_index

    remote = storage.is_remote(out)
    parent = staging if remote else out
    assert parent is not None, f"{out}: a remote output needs a local staging folder"
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".merge-", dir=parent) as work:
        logging.disable(logging.WARNING)     # merge_index warns about its temporary folder on every call
        try:
            merge_index([storage.join(f, "index.json") for f in folders], work, keep_local=True)
        finally:
            logging.disable(logging.NOTSET)
        merged: Manifest | None = None
        examples: dict[str, list[str]] = {}
        held: list[dict] = []
        for folder in folders:
            part_staging = os.path.join(work, os.path.basename(folder.rstrip("/")))
            part = read_manifest(fetch_folder_file(folder, MANIFEST_NAME, part_staging))
            for reason, ids in part.extra.pop("skipped_examples", {}).items():
                examples.setdefault(reason, []).extend(ids)
            if part.heldout:
                held.append(part.heldout)
            if merged is None:
                merged = dataclasses.replace(part, samples=0, tokens=0, target_tokens=0, truncated=0, skipped={},
                                             extra={**part.extra, "input_tars": 0}, heldout=None)
            merged.merge(part)
            merged.extra["input_tars"] += part.extra.get("input_tars", 0)
        assert merged is not None
        merged.extra["parts"] = len(folders)
        if held:
            merged.heldout = manifest_entry(HELDOUT_DIR, sum(h["samples"] for h in held), Holdout(held[0]["spec"]),
                                            [i for h in held for i in h["ids"]])
        if examples:
            merged.extra["skipped_examples"] = {k: v[:5] for k, v in sorted(examples.items())}
        merged.write(work)
        for name in ("index.json", MANIFEST_NAME):
            if remote:
                storage.upload(os.path.join(work, name), storage.join(out, name))
            else:
                os.replace(os.path.join(work, name), os.path.join(out, name))
    return merged


def main(argv: list[str] | None = None) -> None:
    """Command line of ``data_prep/build_pretrain_shards.py``."""
    import argparse

    from data_prep.holdout import add_holdout_arg
    from data_prep.writer import add_encode_args, add_output_args, settings_from_args

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="img2dataset output: tar files, folders of tars or globs")
    add_output_args(parser, "dataset folder")
    parser.add_argument("--source", required=True, choices=sorted(PRETRAIN_SOURCES))
    parser.add_argument("--ocr-granularity", type=int, default=0,
                        help="OCR-200m caption granularity; 0 = the paper's Level 1 'basic text extraction'")
    parser.add_argument("--ocr-include-raw-caption", action="store_true",
                        help="OCR-200m: use the caption variant that includes the raw alt-text")
    parser.add_argument("--tars-per-part", type=int, default=8, help="input tars per output MDS sub-folder")
    parser.add_argument("--job-index", type=int, default=0, help="this job's index when several jobs share OUT")
    parser.add_argument("--num-jobs", type=int, default=1, help="number of jobs sharing OUT")
    parser.add_argument("--shard-size-limit", default=SHARD_SIZE_LIMIT, help="MDS shard size limit")
    add_holdout_arg(parser, "a fraction of the samples (e.g. 0.001)")
    add_encode_args(parser, default_max_text_tokens=128)
    args = parser.parse_args(argv)
    try:
        fraction_holdout(args.holdout)
    except ValueError as err:
        parser.error(str(err))                                     # exit code 2, before any work
    try:
        manifest = build_pretrain(args.inputs, args.out, args.source, settings_from_args(args),
                                  CaptionOptions(args.ocr_granularity, args.ocr_include_raw_caption),
                                  args.workers, args.tars_per_part, args.job_index, args.num_jobs,
                                  args.shard_size_limit, args.staging, args.holdout)
    except ValueError as err:       # bucket missing, credentials wrong, finished parts built otherwise
        raise SystemExit(f"error: {err}") from None
    if manifest is not None:
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(manifest.skipped.items())) or "none"
        print(f"{args.out}: {manifest.samples} samples, {manifest.tokens} tokens, "
              f"{manifest.truncated} captions truncated; skipped: {skipped}"
              + (f"; held out: {manifest.heldout['samples']} samples in {args.out.rstrip('/')}/heldout"
                 if manifest.heldout else ""))
