"""Collation: decoded samples → one model batch, by padding or by packing.

``pad``: one sample per row, right-padded to the longest row (rounded up to ``pad_to_multiple_of``);
``document_ids`` is None (one document per row).

``pack``: samples are placed greedily (first fit, longest first) into rows of at most ``pack_tokens``
tokens, and every row is exactly ``pack_tokens`` wide, whatever the samples: one static width, so the
compiled FlexAttention kernel and its BlockMask builder compile once for the run instead of once per
new batch width. ``document_ids`` numbers the samples of a row 1, 2, 3, … (0 on padding). The attention modes
keep documents apart and restart position ids per document (``pipeline.model.attention``), so a packed
row computes exactly what the separate padded rows compute — only with less padding.

Either way the batch is::

    input_ids     long [R, L]   pad_id on padding
    modality_ids  long [R, L]   pipeline.tokens ids, PAD (0) on padding
    pixel_values  float [n, 3, H, W]   every image of the batch in row-major slot order (n may be 0), in
                                      ``pixel_dtype`` (the training dtype: bf16 halves the host-to-device copy)
    document_ids  long [R, L] or None
    num_samples   int           samples consumed (kept + skipped): what the loader's resume state counts
    num_target_tokens int       TEXT_TARGET tokens that carry a loss (for loss normalisation)
    skipped       dict[str, dict[str, int]] samples dropped in this batch: {source: {reason: count}}
    sources       list[str]     source of every kept sample

Only the keys in :data:`MODEL_INPUTS` go to the model. A sample that is too long, or that the dataset
marked unreadable, is dropped and counted in ``skipped`` by its record's source and the reason
(:data:`SKIP_REASONS`, or the dataset's own); the trainer sums the counts over ranks into the run's
metrics (:class:`pipeline.metrics.DroppedSamples`). When nothing is left, the batch is a single
placeholder row without targets (loss 0), so every rank still runs the same forward and backward —
ZeRO-3 gathers parameters collectively and would hang if one rank skipped a step.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import numpy as np
import torch

from pipeline.model.aki import target_positions
from pipeline.tokens import PAD, TEXT_INPUT

MODEL_INPUTS = ("input_ids", "modality_ids", "pixel_values", "document_ids")
SKIP_KEY = "skip"   # a sample dict carrying this key (the reason) was dropped by the dataset
OVER_MAX_LENGTH = "over_max_length"   # the reason of a sample longer than ``data.max_length`` (dropped here)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _fill_rows(pieces: Sequence[np.ndarray], row_lengths: np.ndarray, width: int, fill: int) -> torch.Tensor:
    """Write the row-major concatenation of ``pieces`` into a ``[rows, width]`` tensor, ``fill`` elsewhere."""
    out = np.full((len(row_lengths), width), fill, dtype=np.int64)
    out[np.arange(width)[None, :] < row_lengths[:, None]] = np.concatenate(pieces) if pieces else []
    return torch.from_numpy(out)


def pack_rows(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Greedy first-fit-decreasing bin packing: sample indices per row, each row's total <= ``budget``.

    Within a row the samples keep their original order (deterministic, easy to inspect).
    """
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > budget:
            raise ValueError(f"sample of {lengths[i]} tokens does not fit a packed row of {budget} tokens")
        row = next((r for r, space in enumerate(free) if space >= lengths[i]), None)
        if row is None:
            rows.append([])
            free.append(budget)
            row = len(rows) - 1
        rows[row].append(i)
        free[row] -= lengths[i]
    return [sorted(r) for r in rows]


def collate(samples: Sequence[dict[str, Any]], mode: str, pad_id: int, pack_tokens: int = 2048,
            pad_to_multiple_of: int = 1, pixel_dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Batch decoded samples (``input_ids``, ``modality_ids``, ``pixel_values`` each) by ``mode``."""
    if not samples:
        raise ValueError("collate got no samples")
    lengths = [len(s["input_ids"]) for s in samples]
    if mode == "pad":
        rows = [[i] for i in range(len(samples))]
    elif mode == "pack":
        rows = pack_rows(lengths, pack_tokens)
    else:
        raise ValueError(f"unknown collate mode {mode!r}; use 'pad' or 'pack'")
    order = [i for row in rows for i in row]                       # samples in row-major order
    row_lengths = np.array([sum(lengths[i] for i in row) for row in rows])
    width = pack_tokens if mode == "pack" else _round_up(int(row_lengths.max()), pad_to_multiple_of)
    batch = {
        "input_ids": _fill_rows([samples[i]["input_ids"] for i in order], row_lengths, width, pad_id),
        "modality_ids": _fill_rows([samples[i]["modality_ids"] for i in order], row_lengths, width, PAD),
        "pixel_values": torch.cat([samples[i]["pixel_values"] for i in order]).to(pixel_dtype),
        "document_ids": None,
    }
    if mode == "pack":
        doc_numbers = np.concatenate([np.repeat(np.arange(1, len(row) + 1), [lengths[i] for i in row])
                                      for row in rows])
        batch["document_ids"] = _fill_rows([doc_numbers], row_lengths, width, 0)
    batch["num_target_tokens"] = int(target_positions(batch["modality_ids"], batch["document_ids"]).sum())
    batch["sources"] = [samples[i].get("source", "") for i in order]
    return batch


class Collator:
    """The loader's ``collate_fn``: drops skipped / over-long samples (counted), then pads or packs."""

    def __init__(self, mode: str, pad_id: int, max_length: int, pack_tokens: int = 2048,
                 pad_to_multiple_of: int = 8, image_size: int = 0, pixel_dtype: torch.dtype = torch.float32):
        if mode == "pack" and pack_tokens < max_length:
            raise ValueError(f"pack_tokens={pack_tokens} cannot hold a sample of max_length={max_length}")
        self.mode, self.pad_id, self.max_length = mode, pad_id, max_length
        self.pack_tokens, self.pad_to_multiple_of, self.image_size = pack_tokens, pad_to_multiple_of, image_size
        self.pixel_dtype = pixel_dtype

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        skipped: Counter[tuple[str, str]] = Counter()
        kept = []
        for sample in samples:
            if SKIP_KEY in sample:
                skipped[sample.get("source", ""), sample[SKIP_KEY]] += 1
            elif len(sample["input_ids"]) > self.max_length:
                skipped[sample.get("source", ""), OVER_MAX_LENGTH] += 1
            else:
                kept.append(sample)
        batch = collate(kept or [self._placeholder()], self.mode, self.pad_id, self.pack_tokens,
                        self.pad_to_multiple_of, self.pixel_dtype)
        if not kept:
            batch["sources"] = []
        batch["num_samples"] = len(samples)
        batch["skipped"] = by_source(skipped)
        return batch

    def _placeholder(self) -> dict[str, Any]:
        """One pad-id token marked TEXT_INPUT and no image: a row with nothing to predict (loss 0)."""
        return {"input_ids": np.array([self.pad_id], np.int64), "modality_ids": np.array([TEXT_INPUT], np.int64),
                "pixel_values": torch.zeros(0, 3, self.image_size, self.image_size), "source": ""}


def by_source(counts: Counter[tuple[str, str]]) -> dict[str, dict[str, int]]:
    """``{(source, reason): n}`` as ``{source: {reason: n}}`` (sorted: the same on every rank)."""
    out: dict[str, dict[str, int]] = {}
    for (source, reason), n in sorted(counts.items()):
        out.setdefault(source, {})[reason] = n
    return out


__all__ = ["MODEL_INPUTS", "OVER_MAX_LENGTH", "SKIP_KEY", "Collator", "by_source", "collate", "pack_rows"]
