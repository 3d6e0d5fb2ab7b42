"""The SFT mixture file: which dataset folders training streams, with which sampling proportion.

``mixture.yaml`` (written by ``data_prep/build_sft_mixture.py`` next to the dataset folders)::

    streams:
      - name: vqav2            # source name
        local: vqav2           # dataset folder, relative to this file's folder (or absolute)
        proportion: 0.1145     # share of the combined epoch; proportions sum to 1
        ratio: 0.103           # the ratio given (Table 4 or an override) before normalising
        samples: 443757        # samples in the folder (from its manifest)
      - ...

Training reads it with :func:`load_mixture` and builds one ``streaming.Stream(local=…,
proportion=…)`` per entry.
"""
from __future__ import annotations

import os

import yaml

MIXTURE_FILE = "mixture.yaml"


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


__all__ = ["MIXTURE_FILE", "load_mixture"]
