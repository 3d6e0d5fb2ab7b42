"""A restricted unpickler for data files such as RefCOCO's ``refs(*).p``.

``pickle.load`` runs whatever a file tells it to (any importable callable), so an untrusted pickle can
execute code. :func:`load_plain_pickle` only lets the file build builtin containers and scalars
(lists, dicts, tuples, sets, strings, numbers, booleans, None); any reference to a class or function
is refused before it is called. Python-2 pickles (RefCOCO's) load with ``encoding="latin1"``.
"""
from __future__ import annotations

import pickle
from typing import Any


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references a global (class or function) — refused."""


class _PlainDataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str, **kwargs):
        super().__init__(file, **kwargs)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickleError(
            f"{self._path}: refusing to load {module}.{name}: the pickle references code, and data files "
            "may only contain plain lists/dicts/strings/numbers. If the file is genuine, convert it in a "
            "sandbox (or use MDETR's finetune_refcoco*_train.json instead of the refs pickle)")


def load_plain_pickle(path: str, encoding: str = "latin1") -> Any:
    """Load a pickle that may only contain builtin containers and scalars."""
    with open(path, "rb") as f:
        return _PlainDataUnpickler(f, path, encoding=encoding).load()
