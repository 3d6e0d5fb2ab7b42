"""Reading and writing safetensors weights one tensor at a time (a 4B checkpoint in a few GiB of RAM).

:class:`TensorSource` opens a folder's ``model.safetensors`` or its sharded index
(``model.safetensors.index.json``) lazily: shapes and dtypes come from the headers, a tensor's data is
read only when asked for. :func:`write_safetensors` writes tensors produced one by one into a single
file or into shards with an index in huggingface_hub's naming (``model-00001-of-00002.safetensors``),
so ``huggingface_hub.load_torch_model`` and the official loader read the result. The file format
(8-byte header length, JSON header, raw little-endian data) is the safetensors specification.
"""
from __future__ import annotations

import contextlib
import json
import os
import struct
from pathlib import Path
from typing import Callable

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL"}
_DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}


class TensorSource(contextlib.AbstractContextManager):
    """The tensors of a weights folder, read lazily; use as a context manager."""

    def __init__(self, folder: str | os.PathLike):
        from safetensors import safe_open

        self.folder = Path(folder)
        index, single = self.folder / INDEX_FILE, self.folder / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{index} is not a safetensors index (a JSON object with a weight_map): {err}")
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            files = [SINGLE_FILE]
        else:
            raise ValueError(f"{self.folder} holds neither {SINGLE_FILE} nor {INDEX_FILE}: no weights to read")
        missing = [f for f in files if not (self.folder / f).is_file()]
        if missing:
            raise ValueError(f"{self.folder}: shard(s) {missing} named by {INDEX_FILE} are missing; copy the "
                             "complete checkpoint")
        self._stack = contextlib.ExitStack()
        self._where = {}
        for name in files:
            handle = self._stack.enter_context(safe_open(str(self.folder / name), framework="pt", device="cpu"))
            for key in handle.keys():
                self._where[key] = handle

    def keys(self) -> list[str]:
        return sorted(self._where)

    def spec(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """dtype and shape of ``key``, from the file header (no data read)."""
        sliced = self._where[key].get_slice(key)
        return _DTYPES_BY_NAME[sliced.get_dtype()], tuple(sliced.get_shape())

    def get(self, key: str) -> torch.Tensor:
        return self._where[key].get_tensor(key)

    def __exit__(self, *exc) -> None:
        self._stack.close()


def _header(entries: list[tuple[str, torch.dtype, tuple[int, ...], int]], metadata: dict[str, str]) -> bytes:
    header, offset = {"__metadata__": metadata}, 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)      # the data starts 8-byte aligned
    return struct.pack("<Q", len(blob)) + blob


def _write_file(path: Path, names: list[str], specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                load: Callable[[str], torch.Tensor], metadata: dict[str, str]) -> None:
    entries = [(n, specs[n][0], specs[n][1], _nbytes(*specs[n])) for n in names]
    with open(path, "wb") as f:
        f.write(_header(entries, metadata))
        for name, dtype, shape, _ in entries:
            tensor = load(name)
            if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                raise ValueError(f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, announced as "
                                 f"{dtype} {shape}")
            f.write(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    numel = 1
    for d in shape:
        numel *= d
    return numel * torch.empty(0, dtype=dtype).element_size()


def write_safetensors(folder: str | os.PathLike, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                      load: Callable[[str], torch.Tensor], max_shard_bytes: int | None = None,
                      metadata: dict[str, str] | None = None) -> list[str]:
    """Write the tensors ``specs`` names (name → dtype, shape), each produced by ``load(name)`` when its
    turn comes, into ``folder``: one ``model.safetensors``, or shards + index when the total exceeds
    ``max_shard_bytes`` (None: always one file). Returns the file names written."""
    folder = Path(folder)
    metadata = {"format": "pt", **(metadata or {})}
    names = sorted(specs)
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = _nbytes(*specs[name])
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    if len(shards) == 1:
        _write_file(folder / SINGLE_FILE, shards[0], specs, load, metadata)
        return [SINGLE_FILE]
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, shard in zip(files, shards):
        _write_file(folder / file, shard, specs, load, metadata)
    total = sum(_nbytes(*specs[n]) for n in names)
    index = {"metadata": {"total_size": total}, "weight_map": {n: f for f, shard in zip(files, shards) for n in shard}}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files + [INDEX_FILE]


__all__ = ["SINGLE_FILE", "INDEX_FILE", "TensorSource", "write_safetensors"]
