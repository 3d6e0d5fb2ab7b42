"""The SFT mixture file: which dataset folders training streams, with which sampling proportion.

``mixture.yaml`` (written by ``data_prep/build_sft_mixture.py`` next to the dataset folders)::

    streams:
      - name: vqav2            # source name (registry key in data_prep.sft)
        local: vqav2           # dataset folder, relative to this file's folder (or absolute)
        proportion: 0.1145     # share of the combined epoch; proportions sum to 1
        ratio: 0.103           # the ratio given (Table 4 or an override) before normalising
        samples: 443757        # samples in the folder (from its manifest)
      - ...

Training reads it with :func:`load_mixture` and builds one ``streaming.Stream(local=…,
proportion=…)`` per entry. Only sources that were actually built are listed; their ratios are
renormalised to sum 1 (streaming would do the same).
"""
from __future__ import annotations

import os
from typing import Mapping

import yaml

MIXTURE_FILE = "mixture.yaml"

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


def write_mixture(out_dir: str, ratios: Mapping[str, float], samples: Mapping[str, int]) -> str:
    """Write ``out_dir/mixture.yaml`` for the built sources (dataset folder ``out_dir/<name>``)."""
    total = sum(ratios.values())
    streams = [{"name": name, "local": name, "proportion": round(ratio / total, 6), "ratio": ratio,
                "samples": int(samples.get(name, 0))} for name, ratio in ratios.items()]
    path = os.path.join(out_dir, MIXTURE_FILE)
    with open(path, "w") as f:
        yaml.safe_dump({"streams": streams}, f, sort_keys=False)
    return path


def load_mixture(path: str) -> list[tuple[str, str, float]]:
    """``[(name, absolute dataset folder, proportion), …]`` from a ``mixture.yaml``."""
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict) or not isinstance(data.get("streams"), list):
        raise ValueError(f"{path}: expected `streams:` with a list of {{name, local, proportion}}; "
                         "write it with data_prep/build_sft_mixture.py")
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for entry in data["streams"]:
        try:
            name, local, proportion = str(entry["name"]), str(entry["local"]), float(entry["proportion"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: stream entry {entry!r} needs name, local and a numeric proportion "
                             f"({err!r})") from None
        out.append((name, os.path.normpath(os.path.join(base, local)), proportion))
    return out
