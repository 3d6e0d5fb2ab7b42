"""Writing the SFT mixture file (``mixture.yaml``, format in :mod:`pipeline.data.mixture`): the paper's
Table 4 sampling ratios, ratio overrides, and the proportions of the sources actually built.

Only sources that were actually built are listed; their ratios are renormalised to sum 1 (streaming
would do the same).
"""
from __future__ import annotations

import os
from typing import Mapping

import yaml

from data_prep.holdout import HELDOUT_DIR
from pipeline.data.mixture import MIXTURE_FILE

# Paper Table 4 (== sampling_weights in the AKI SFT config); sums to 1.
TABLE4_RATIOS: dict[str, float] = {
    "vqav2": 0.103, "gqa": 0.103, "vsr": 0.026, "ocrvqa": 0.103, "aokvqa": 0.103, "scienceqa": 0.103,
    "refcoco": 0.103, "refcoco+": 0.103, "refcocog": 0.103, "vg": 0.047, "llava150k": 0.103,
}


def parse_ratio_overrides(items: list[str]) -> dict[str, float]:
    """``["vsr=0.05", "vg=0.1"]`` (the ``--ratio`` CLI flags) → ``{"vsr": 0.05, "vg": 0.1}``."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or out[name.strip()] < 0:
            raise ValueError(f"--ratio {item!r}: expected NAME=VALUE with a non-negative number, e.g. vsr=0.05")
    return out


def read_ratio_yaml(path: str) -> dict[str, float]:
    """A YAML mapping ``name: ratio`` (``--ratios-yaml``)."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict) or not all(isinstance(v, (int, float)) for v in data.values()):
        raise ValueError(f"{path}: expected a mapping of source name → ratio, e.g. `vsr: 0.05`")
    return {str(k): float(v) for k, v in data.items()}


def resolve_ratios(names: list[str], overrides: Mapping[str, float] = {}) -> dict[str, float]:
    """Ratio of each built source: Table 4 unless overridden. Unknown names must be given a ratio."""
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ValueError(f"ratio given for {unknown}, which are not among the built sources {names}")
    ratios = {}
    for name in names:
        if name not in overrides and name not in TABLE4_RATIOS:
            raise ValueError(f"source {name!r} has no Table 4 ratio; give one with --ratio {name}=VALUE")
        ratios[name] = float(overrides.get(name, TABLE4_RATIOS.get(name, 0.0)))
    if sum(ratios.values()) <= 0:
        raise ValueError(f"the ratios {ratios} sum to 0; at least one source needs a positive ratio")
    return ratios


def write_mixture(out_dir: str, ratios: Mapping[str, float], samples: Mapping[str, int],
                  heldout: Mapping[str, int] = {}) -> str:
    """Write ``out_dir/mixture.yaml`` for the built sources (dataset folder ``out_dir/<name>``); ``heldout``
    gives the held-out samples of each source (folder ``out_dir/heldout/<name>``; empty ones not listed)."""
    total = sum(ratios.values())
    streams = [{"name": name, "local": name, "proportion": round(ratio / total, 6), "ratio": ratio,
                "samples": int(samples.get(name, 0))} for name, ratio in ratios.items()]
    data: dict = {"streams": streams}
    held = [{"name": name, "local": f"{HELDOUT_DIR}/{name}", "samples": int(heldout[name])}
            for name in ratios if heldout.get(name)]
    if held:
        data["heldout"] = held
    path = os.path.join(out_dir, MIXTURE_FILE)
    with open(path, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    return path
