"""Reading img2dataset webdataset tars: members grouped into samples by key.

img2dataset writes ``NNNNNNNNN.jpg`` / ``.txt`` / ``.json`` per successful download (keys have gaps where
downloads failed). A sample is the run of consecutive members sharing the part of the file name before
the first dot. A tar that ends in the middle of a member (an interrupted copy or download) yields the
complete samples before the cut, then one :class:`~data_prep.records.Skip` with reason
``truncated_tar`` for the sample that was cut.
"""
from __future__ import annotations

import glob
import os
import tarfile
from typing import Iterator, Union

from data_prep.records import TRUNCATED_TAR, Skip

Members = dict[str, bytes]          # extension (lower case, without the dot) → file bytes
TarItem = Union[tuple[str, Members], Skip]


def list_tars(inputs: list[str]) -> list[str]:
    """Expand files, folders (their ``*.tar``) and glob patterns into one sorted list of tar paths."""
    found: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found.extend(glob.glob(os.path.join(item, "*.tar")))
        elif any(c in item for c in "*?["):
            found.extend(glob.glob(item))
        elif os.path.isfile(item):
            found.append(item)
        else:
            raise FileNotFoundError(f"input {item!r} is neither a tar file, a folder of tars nor a glob that "
                                    "matches; pass the img2dataset output folder (the one holding 00000.tar …)")
    tars = sorted(set(os.path.abspath(p) for p in found if p.endswith(".tar")))
    if not tars:
        raise FileNotFoundError(f"no .tar files found in {inputs}; expected img2dataset webdataset output")
    return tars


def _split_name(name: str) -> tuple[str, str]:
    base = os.path.basename(name)
    key, _, ext = base.partition(".")
    return os.path.join(os.path.dirname(name), key), ext.lower()


def read_samples(path: str) -> Iterator[TarItem]:
    """Yield ``(key, members)`` for every sample of the tar at ``path``, in archive order."""
    key, members = None, {}
    truncated = False
    with open(path, "rb") as fobj:
        try:
            with tarfile.open(fileobj=fobj, mode="r:") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    mkey, ext = _split_name(info.name)
                    if mkey != key and key is not None:
                        yield key, members
                        members = {}
                    key = mkey
                    data = tar.extractfile(info).read()
                    if len(data) != info.size:
                        raise tarfile.ReadError("unexpected end of data")
                    members[ext] = data
                end = tar.offset
        except (tarfile.ReadError, EOFError):
            truncated = True
        else:
            # A cut inside a member header ends the iteration silently: the rest must be zero padding.
            fobj.seek(end)
            truncated = any(fobj.read())
    if truncated:
        yield Skip(TRUNCATED_TAR, key or os.path.basename(path), f"{path} ends inside a member")
    elif key is not None:
        yield key, members
