"""The SFT mixture file: which dataset folders training streams, with which sampling proportion.

``mixture.yaml`` (written by ``data_prep/build_sft_mixture.py`` next to the dataset folders)::

    streams:
      - name: vqav2            # source name
        local: vqav2           # dataset folder, relative to this file's folder (or absolute)
        proportion: 0.1145     # share of the combined epoch; proportions sum to 1
        ratio: 0.103           # the ratio given (Table 4 or an override) before normalising
        samples: 443757        # samples in the folder (from its manifest)
      - ...
    heldout:                   # only with data_prep --holdout: each source's held-out dataset
      - name: vqav2
        local: heldout/vqav2   # relative to this file's folder, like `local` above
        samples: 1000          # samples in that folder (sources whose holdout is empty are not listed)
      - ...

Training reads it with :func:`load_mixture` and builds one ``streaming.Stream(local=…,
proportion=…)`` per entry; :func:`load_heldout` gives the held-out datasets (none without the key).
"""
from __future__ import annotations

import os

from typing import Any

import yaml

MIXTURE_FILE = "mixture.yaml"


def _entries(path: str, key: str, value: str, cast: type, required: bool) -> list[tuple[str, str, Any]]:
    """``[(name, absolute folder, cast(entry[value])), …]`` of the list under ``key`` of a ``mixture.yaml``
    (``local`` folders are relative to the file); ``[]`` when an optional key is absent."""
    with open(path) as f:
        data = yaml.safe_load(f)
    entries = data.get(key) if isinstance(data, dict) else None
    if entries is None and not required:
        return []
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected `{key}:` with a list of {{name, local, {value}}}; "
                         f"write it with data_prep/build_sft_mixture.py{' --holdout' if not required else ''}")
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for entry in entries:
        try:
            name, local, number = str(entry["name"]), str(entry["local"]), cast(entry[value])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: {key} entry {entry!r} needs name, local and a numeric {value} "
                             f"({err!r})") from None
        out.append((name, os.path.normpath(os.path.join(base, local)), number))
    return out


def load_mixture(path: str) -> list[tuple[str, str, float]]:
    """``[(name, absolute dataset folder, proportion), …]`` from a ``mixture.yaml``."""
    return _entries(path, "streams", "proportion", float, required=True)


def load_heldout(path: str) -> list[tuple[str, str, int]]:
    """``[(name, absolute held-out dataset folder, samples), …]`` from a ``mixture.yaml``; ``[]`` when it
    has no ``heldout:`` key (built without ``--holdout``)."""
    return _entries(path, "heldout", "samples", int, required=False)


__all__ = ["MIXTURE_FILE", "load_heldout", "load_mixture"]
