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

A finished source folder (done marker) is skipped on a re-run unless ``overwrite`` is set.
"""
from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import os
from typing import Mapping

import yaml
from tqdm import tqdm

from data_prep.mixture import resolve_ratios, write_mixture
from data_prep.sft import SftOptions, get_sft_source
from data_prep.writer import (SHARD_SIZE_LIMIT, START_METHOD, DatasetWriter, EncodeSettings, cached_converter,
                              check_reusable, convert_item, is_done)
from pipeline.data.format import Manifest, read_manifest
from pipeline.chat import get_layout


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


def build_source(name: str, paths: Mapping[str, str], out_dir: str, settings: EncodeSettings,
                 options: SftOptions = SftOptions(), workers: int = 1,
                 size_limit: str | int = SHARD_SIZE_LIMIT) -> Manifest:
    """Parse one source and write ``out_dir/<name>`` (MDS + manifest)."""
    source = get_sft_source(name)
    converter = cached_converter(settings)
    manifest = converter.new_manifest(name, source.license, options=dataclasses.asdict(options))
    items = source.parse(dict(paths), options)
    convert = functools.partial(convert_item, settings, name)
    pool = multiprocessing.get_context(START_METHOD).Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(convert, items, chunksize=64) if pool else map(convert, items)
        with DatasetWriter(os.path.join(out_dir, name), manifest, size_limit) as writer:
            for result in tqdm(results, desc=name, unit="sample"):
                writer.add(result)
    finally:
        if pool:
            pool.terminate()
    return manifest


def build_sft_mixture(sources: Mapping[str, Mapping[str, str]], out_dir: str, settings: EncodeSettings,
                      options: SftOptions = SftOptions(), ratios: Mapping[str, float] = {},
                      workers: int = 1, overwrite: bool = False) -> str:
    """Build every source in ``sources`` (skipping finished ones) and write ``mixture.yaml``."""
    if not sources:
        raise ValueError("no SFT sources given; list them in the sources file (see data_prep/sft/build.py)")
    resolved = resolve_ratios(list(sources), ratios)      # fail on bad ratios before hours of work
    os.makedirs(out_dir, exist_ok=True)
    samples = {}
    for name, paths in sources.items():
        folder = os.path.join(out_dir, name)
        if is_done(folder) and not overwrite:
            check_reusable(folder, cached_converter(settings).new_manifest(
                name, "", options=dataclasses.asdict(options)))
            print(f"{name}: already built in {folder}; skipping (pass --overwrite to rebuild)")
            manifest = read_manifest(folder)
        else:
            manifest = build_source(name, paths, out_dir, settings, options, workers)
        samples[name] = manifest.samples
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(manifest.skipped.items())) or "none"
        print(f"{name}: {manifest.samples} samples, {manifest.tokens} tokens; skipped: {skipped}")
    return write_mixture(out_dir, resolved, samples)


def main(argv: list[str] | None = None) -> None:
    """Command line of ``data_prep/build_sft_mixture.py``."""
    import argparse

    from data_prep.mixture import parse_ratio_overrides, read_ratio_yaml
    from data_prep.writer import add_encode_args, settings_from_args

    parser = argparse.ArgumentParser(description="Build one MDS dataset per SFT source and mixture.yaml.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sources", required=True, help="YAML: source name → its file paths (see module doc)")
    parser.add_argument("--out", required=True, help="output folder (one sub-folder per source + mixture.yaml)")
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
    add_encode_args(parser, default_max_text_tokens=512)
    args = parser.parse_args(argv)
    sources = read_sources_file(args.sources)
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        missing = sorted(set(wanted) - set(sources))
        if missing:
            raise SystemExit(f"--only names {missing} that are not in {args.sources}")
        sources = {n: sources[n] for n in wanted}
    ratios = {**(read_ratio_yaml(args.ratios_yaml) if args.ratios_yaml else {}), **parse_ratio_overrides(args.ratio)}
    options = SftOptions(args.shuffle_options, args.seed, args.whole_conversations, args.split)
    if args.whole_conversations and get_layout(args.text_layout).single_turn:
        raise SystemExit(f"--whole-conversations needs a multi-turn text layout, but --text-layout "
                         f"{args.text_layout} holds one turn per sample; drop the flag or pass --text-layout phi3_chat")
    path = build_sft_mixture(sources, args.out, settings_from_args(args), options, ratios, args.workers,
                             args.overwrite)
    print(f"wrote {path}")
