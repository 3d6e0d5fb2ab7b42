"""Held-out samples chosen by a hash of their record id: the same split on every rebuild, disjoint by id.

``--holdout SPEC`` (both data builders) is either a count (an integer N ≥ 1: held-out records per source)
or a fraction in (0, 1). Each record id gets a number ``u`` in [0, 1) from the SHA-1 of
``f"{source}\\0{record_id}"`` (the first 8 bytes, big-endian, over 2**64), so the split depends only on
the source name and the id — never on the order of the files, the number of workers, parts or jobs:

* a fraction holds out every record with ``u < fraction`` (decided one record at a time);
* a count holds out the N records with the smallest ``(u, id)`` among the records that yield a sample.

An id is on one side only: all samples of one record (the turns of a conversation, the questions of a
book cover) go to the same side. Where the held-out data is written, and how the manifests point at it:
:mod:`data_prep.sft.build`, :mod:`data_prep.pretrain`, :func:`pipeline.data.format.heldout_path`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import heapq
from typing import Any, Iterable, Union

HELDOUT_DIR = "heldout"       # the held-out datasets' folder inside a builder's output folder


@dataclasses.dataclass(frozen=True)
class Holdout:
    """A parsed ``--holdout``: ``value`` is an int (a count) or a float in (0, 1) (a fraction)."""

    value: Union[int, float]

    @property
    def is_count(self) -> bool:
        return isinstance(self.value, int)

    def holds_out(self, source: str, record_id: str) -> bool:
        """A fraction's decision for one record (counts need every id first: :func:`smallest`)."""
        assert not self.is_count, "a count is decided over all ids: use smallest()"
        return record_hash(source, record_id) < self.value

    def __str__(self) -> str:
        return str(self.value)


def parse_holdout(text: Any) -> Holdout:
    """``"1000"`` → a count, ``"0.01"`` → a fraction; anything else is a ``ValueError`` saying what to write.

    Usable as an argparse ``type`` (argparse reports the message as a usage error, before any work).
    """
    if isinstance(text, Holdout):
        return text
    raw = str(text).strip()
    hint = ("--holdout takes a count of held-out records per source (an integer ≥ 1, e.g. 1000) or a "
            f"fraction between 0 and 1 (e.g. 0.01), not {raw!r}")
    if isinstance(text, bool):
        raise ValueError(hint)
    try:
        count = int(raw)
    except ValueError:
        pass
    else:
        if count < 1:
            raise ValueError(hint)
        return Holdout(count)
    try:
        fraction = float(raw)
    except ValueError:
        raise ValueError(hint) from None
    if not 0.0 < fraction < 1.0:          # also refuses nan and inf
        raise ValueError(hint)
    return Holdout(fraction)


def record_hash(source: str, record_id: str) -> float:
    """The record's number in [0, 1): SHA-1 of ``source\\0record_id``, first 8 bytes over 2**64."""
    digest = hashlib.sha1(f"{source}\0{record_id}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def smallest(source: str, record_ids: Iterable[str], count: int) -> frozenset[str]:
    """The ``count`` distinct ids with the smallest :func:`record_hash` (ties broken by the id)."""
    return frozenset(rid for _, rid in heapq.nsmallest(count, {(record_hash(source, r), r) for r in record_ids}))


def manifest_entry(path: str, samples: int, holdout: Holdout, ids: list[str]) -> dict[str, Any]:
    """The ``heldout`` field of a training dataset's manifest (:class:`pipeline.data.format.Manifest`)."""
    return {"path": path, "samples": int(samples), "spec": holdout.value, "ids": list(ids)}


def expected_entry(holdout: Holdout | None) -> dict[str, Any] | None:
    """What a reuse check compares (:func:`data_prep.writer.check_reusable`): the spec only."""
    return None if holdout is None else {"spec": holdout.value}


def add_holdout_arg(parser, what: str = "a count per source (e.g. 1000) or a fraction (e.g. 0.01)") -> None:
    """``--holdout SPEC`` for a builder's command line; a bad value is a usage error (exit code 2)."""
    import argparse

    def holdout_type(text: str) -> Holdout:
        try:
            return parse_holdout(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parser.add_argument("--holdout", type=holdout_type, default=None, metavar="SPEC",
                        help=f"hold out records chosen by a hash of their id: {what}; written as MDS datasets "
                             "under OUT/heldout/ (data_prep/holdout.py)")
