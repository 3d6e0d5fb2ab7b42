"""Build SFT datasets: each source's parser → encode → one MDS folder per source, then ``mixture.yaml``.

The input is a *sources file* (YAML) naming, per source, the paths its parser reads (keys are those of
the source's ``files``; relative paths are relative to the sources file)::

    vqav2:
      questions: vqav2/v2_OpenEnded_mscoco_train2014_questions.json
      annotations: vqav2/v2_mscoco_train2014_annotations.json
      images: coco/train2014
    scienceqa:
      problems: scienceqa/problems.json
      splits: scienceqa/pid_splits.json
      images: scienceqa/images

With ``--holdout SPEC`` (a count per source or a fraction, :mod:`data_prep.holdout`) the records chosen by
the hash of their record id are written to their own MDS dataset instead of the training one (a count
takes the N smallest hashes among the records that yield a sample: the source is parsed twice)::

    OUT/vqav2/                 training samples; manifest.json "heldout": {"path": "../heldout/vqav2", ...}
    OUT/heldout/vqav2/         the held-out samples (index.json, shards, manifest.json, done marker)
    OUT/mixture.yaml           streams: [...] and heldout: [{name, local: heldout/vqav2, samples}, ...]

A finished source folder (done marker) is skipped on a re-run unless ``overwrite`` is set (a folder built
with another ``--holdout`` is refused, like other settings). The output may
be ``s3://bucket/prefix``: each source is written to a local staging folder and uploaded by MDS as it
goes; ``mixture.yaml`` is uploaded beside the sources last.

Errors: a record that cannot be converted or written is skipped and counted in the source's
``manifest.json`` under its reason (``skipped``), with the first few record ids in
``extra.skipped_examples``; the build goes on. A problem that makes a whole source unusable (a missing
file, a file in the wrong format) stops that source with a message naming the source and its files;
the other sources are still built, but ``mixture.yaml`` is not written. The run ends with one summary
line per source (samples written, records skipped by reason, or why it failed).

Exit codes of ``data_prep/build_sft_mixture.py``: 0 — every source built and ``mixture.yaml`` written
(skipped records are listed in the summary); 1 — at least one source could not be built (fix it and
re-run: finished sources are reused), or the bucket of an ``s3://`` output cannot be used; 2 — bad
command line or sources file.
"""
from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import os
import sys
from typing import Any, Iterator, Mapping

import yaml
from tqdm import tqdm

from data_prep.holdout import HELDOUT_DIR, Holdout, expected_entry, manifest_entry, parse_holdout, smallest
from data_prep.mixture import MIXTURE_FILE, resolve_ratios, write_mixture
from data_prep.records import Parsed, Sample
from data_prep.sft import SftOptions, get_sft_source
from data_prep.writer import (SHARD_SIZE_LIMIT, START_METHOD, DatasetWriter, EncodeSettings, cached_converter,
                              check_reusable, convert_item, fetch_folder_file, is_done)
from pipeline.chat import get_layout
from pipeline.data import remote as storage
from pipeline.data.format import MANIFEST_NAME, Manifest, read_manifest


def read_sources_file(path: str) -> dict[str, dict[str, str]]:
    """Source name → {path key → absolute path}, validated against the registry."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of source name → {{path key: path}}")
    base = os.path.dirname(os.path.abspath(path))
    out = {}
    for name, paths in data.items():
        source = get_sft_source(str(name))
        if not isinstance(paths, dict):
            raise ValueError(f"{path}: `{name}` must map path keys ({', '.join(source.files)}) to paths")
        known = set(source.files) | set(source.optional_files)
        unknown = sorted(set(paths) - known)
        if unknown:
            raise ValueError(f"{path}: `{name}` has unknown path keys {unknown}; known: {sorted(known)}")
        out[str(name)] = {k: os.path.join(base, os.path.expanduser(str(v))) for k, v in paths.items()}
    return out


def routed_items(name: str, paths: Mapping[str, str], options: SftOptions,
                 holdout: Holdout | None) -> Iterator[tuple[bool, Parsed]]:
    """``(held out?, sample or skip)`` for every item of source ``name``, in file order; a record's items
    all go to the same side (:mod:`data_prep.holdout`)."""
    source = get_sft_source(name)
    chosen = None
    if holdout is not None and holdout.is_count:        # first pass: the ids of records that yield a sample
        chosen = smallest(name, (rid for rid, items in source.parse_records(dict(paths), options)
                                 if any(isinstance(item, Sample) for item in items)), holdout.value)
    for rid, items in source.parse_records(dict(paths), options):
        held = holdout is not None and (rid in chosen if chosen is not None else holdout.holds_out(name, rid))
        for item in items:
            yield held, item


def _convert_routed(settings: EncodeSettings, name: str, routed: tuple[bool, Parsed]) -> tuple[bool, Any]:
    held, item = routed
    return held, convert_item(settings, name, item)


def build_source(name: str, paths: Mapping[str, str], out_dir: str, settings: EncodeSettings,
                 options: SftOptions = SftOptions(), workers: int = 1,
                 size_limit: str | int = SHARD_SIZE_LIMIT, remote_dir: str | None = None,
                 holdout: Holdout | None = None) -> Manifest:
    """Parse one source and write ``out_dir/<name>`` (MDS + manifest), uploaded to ``remote_dir/<name>``;
    with ``holdout`` its held-out records go to ``out_dir/heldout/<name>`` (and ``remote_dir/heldout/<name>``)."""
    source = get_sft_source(name)
    converter = cached_converter(settings)
    manifest = converter.new_manifest(name, source.license, options=dataclasses.asdict(options))
    items = routed_items(name, paths, options, holdout)
    convert = functools.partial(_convert_routed, settings, name)
    pool = multiprocessing.get_context(START_METHOD).Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(convert, items, chunksize=64) if pool else map(convert, items)
        writer = DatasetWriter(os.path.join(out_dir, name), manifest, size_limit,
                               storage.join(remote_dir, name) if remote_dir else None)
        held_writer, held_ids = None, []
        if holdout is not None:
            held_manifest = converter.new_manifest(name, source.license, options=dataclasses.asdict(options),
                                                   holdout=holdout.value)
            held_writer = DatasetWriter(os.path.join(out_dir, HELDOUT_DIR, name), held_manifest, size_limit,
                                        storage.join(remote_dir, HELDOUT_DIR, name) if remote_dir else None)
        for held, result in tqdm(results, desc=name, unit="sample"):
            if not held:
                writer.add(result)
            elif held_writer.add(result):
                held_ids.append(result["id"])
        if held_writer is not None:         # the held-out folder is finished before the training one
            manifest.heldout = manifest_entry(f"../{HELDOUT_DIR}/{name}", held_writer.finish().samples, holdout,
                                              held_ids)
        writer.finish()
    finally:
        if pool:
            pool.terminate()
    return manifest


class SourceFailed(RuntimeError):
    """Sources that could not be built at all: ``failures`` maps each name to why."""

    def __init__(self, failures: Mapping[str, str]):
        self.failures = dict(failures)
        super().__init__("could not build " + "; ".join(f"{n}: {why}" for n, why in failures.items())
                         + " — fix these and re-run (finished sources are reused); mixture.yaml not written")


def summary_line(name: str, manifest: Manifest | None, failure: str = "") -> str:
    """``name: N samples, T tokens; skipped K (reason n, …)[; held out H]``, or why the source failed."""
    if manifest is None:
        return f"{name}: FAILED — {failure}"
    total = sum(manifest.skipped.values())
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(manifest.skipped.items()))
    return (f"{name}: {manifest.samples} samples, {manifest.tokens} tokens; skipped {total}"
            + (f" ({reasons})" if reasons else "")
            + (f"; held out {manifest.heldout['samples']}" if manifest.heldout else ""))


def _build_or_reuse(name: str, paths: Mapping[str, str], local_dir: str, remote_dir: str | None,
                    settings: EncodeSettings, options: SftOptions, workers: int, overwrite: bool,
                    holdout: Holdout | None = None) -> Manifest:
    """The manifest of source ``name``: built (and uploaded to ``remote_dir``), or reused when finished."""
    folder = storage.join(remote_dir or local_dir, name)
    if is_done(folder) and not overwrite:
        part_staging = os.path.join(local_dir, name)
        expected = cached_converter(settings).new_manifest(name, "", options=dataclasses.asdict(options))
        expected.heldout = expected_entry(holdout)
        check_reusable(folder, expected, part_staging)
        print(f"{name}: already built in {folder}; skipping (pass --overwrite to rebuild)")
        return read_manifest(fetch_folder_file(folder, MANIFEST_NAME, part_staging))
    return build_source(name, paths, local_dir, settings, options, workers, remote_dir=remote_dir, holdout=holdout)


def build_sft_mixture(sources: Mapping[str, Mapping[str, str]], out_dir: str, settings: EncodeSettings,
                      options: SftOptions = SftOptions(), ratios: Mapping[str, float] = {},
                      workers: int = 1, overwrite: bool = False, staging: str | None = None,
                      holdout: Holdout | str | float | None = None) -> str:
    """Build every source in ``sources`` (skipping finished ones) and write ``mixture.yaml``.

    ``holdout`` (a count per source or a fraction, :func:`data_prep.holdout.parse_holdout`) also writes
    each source's held-out records to ``heldout/<source>`` and lists them under ``heldout:`` in the mixture.

    ``out_dir`` may be an ``s3://`` URL; ``staging`` is then the local folder written before the upload
    (default: :func:`pipeline.data.remote.staging_folder`). Returns where ``mixture.yaml`` was written.
    A source that cannot be built does not stop the others; :class:`SourceFailed` is raised at the
    end (after the summary) and ``mixture.yaml`` is not written.
    """
    if not sources:
        raise ValueError("no SFT sources given; list them in the sources file (see data_prep/sft/build.py)")
    resolved = resolve_ratios(list(sources), ratios)      # fail on bad ratios before hours of work
    holdout = None if holdout is None else parse_holdout(holdout)
    remote_dir = out_dir if storage.is_remote(out_dir) else None
    if remote_dir:
        storage.check_bucket(remote_dir)
    local_dir = (staging or storage.staging_folder(remote_dir)) if remote_dir else out_dir
    os.makedirs(local_dir, exist_ok=True)
    manifests: dict[str, Manifest] = {}
    failures: dict[str, str] = {}
    for name, paths in sources.items():
        try:
            manifest = _build_or_reuse(name, paths, local_dir, remote_dir, settings, options, workers, overwrite,
                                       holdout)
        except Exception as err:  # noqa: BLE001  (a whole-source problem; the other sources go on)
            files = ", ".join(f"{k}={v}" for k, v in paths.items())
            failures[name] = f"{type(err).__name__}: {err} (files: {files})"
            print(f"{name}: cannot be built: {failures[name]}", file=sys.stderr)
            continue
        if manifest.samples == 0:
            held = f"; held out: {manifest.heldout['samples']}" if manifest.heldout else ""
            failures[name] = (f"no samples written (split {options.split!r}; skipped: {manifest.skipped or 'none'}"
                              f"{held}); check the files, --split and --holdout")
        manifests[name] = manifest
        print(summary_line(name, manifest))
    print("summary:")
    for name in sources:
        print("  " + summary_line(name, None if name in failures else manifests[name], failures.get(name, "")))
    if failures:
        raise SourceFailed(failures)
    path = write_mixture(local_dir, resolved, {n: m.samples for n, m in manifests.items()},
                         {n: m.heldout["samples"] for n, m in manifests.items() if m.heldout})
    if remote_dir:
        path = storage.join(remote_dir, MIXTURE_FILE)
        storage.upload(os.path.join(local_dir, MIXTURE_FILE), path)
    return path


def main(argv: list[str] | None = None) -> None:
    """Command line of ``data_prep/build_sft_mixture.py``."""
    import argparse

    from data_prep.holdout import add_holdout_arg
    from data_prep.mixture import parse_ratio_overrides, read_ratio_yaml
    from data_prep.writer import add_encode_args, add_output_args, settings_from_args

    parser = argparse.ArgumentParser(description="Build one MDS dataset per SFT source and mixture.yaml.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sources", required=True, help="YAML: source name → its file paths (see module doc)")
    add_output_args(parser, "folder (one sub-folder per source + mixture.yaml)")
    parser.add_argument("--only", default="", help="comma-separated subset of the sources file to build")
    parser.add_argument("--ratio", action="append", default=[], metavar="NAME=VALUE",
                        help="override a Table 4 sampling ratio (repeatable)")
    parser.add_argument("--ratios-yaml", help="YAML mapping source name → ratio (overrides Table 4)")
    parser.add_argument("--whole-conversations", action="store_true",
                        help="LLaVA: keep each conversation as one sample (default: one sample per turn)")
    parser.add_argument("--shuffle-options", action="store_true",
                        help="shuffle multiple-choice options (a seeded copy; the letter follows the answer)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train", help="split kept from files that mix splits")
    parser.add_argument("--overwrite", action="store_true", help="rebuild sources that are already finished")
    add_holdout_arg(parser)
    add_encode_args(parser, default_max_text_tokens=512)
    args = parser.parse_args(argv)
    try:
        sources = read_sources_file(args.sources)
        if args.only:
            wanted = [n.strip() for n in args.only.split(",") if n.strip()]
            missing = sorted(set(wanted) - set(sources))
            if missing:
                raise ValueError(f"--only names {missing} that are not in {args.sources}")
            sources = {n: sources[n] for n in wanted}
        ratios = {**(read_ratio_yaml(args.ratios_yaml) if args.ratios_yaml else {}),
                  **parse_ratio_overrides(args.ratio)}
        resolve_ratios(list(sources), ratios)
        settings = settings_from_args(args)
    except (OSError, ValueError, yaml.YAMLError) as err:
        parser.error(str(err))                                     # exit code 2
    options = SftOptions(args.shuffle_options, args.seed, args.whole_conversations, args.split)
    if args.whole_conversations and get_layout(args.text_layout).single_turn:
        parser.error(f"--whole-conversations needs a multi-turn text layout, but --text-layout {args.text_layout} "
                     "holds one turn per sample; drop the flag or pass --text-layout phi3_chat")
    try:
        path = build_sft_mixture(sources, args.out, settings, options, ratios, args.workers, args.overwrite,
                                 args.staging, args.holdout)
    except storage.RemoteError as err:          # bucket missing, credentials wrong: no traceback
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except SourceFailed as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"wrote {path}")
