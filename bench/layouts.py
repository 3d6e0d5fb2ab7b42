"""Synthetic token layouts with the shapes of AKI's training data (modality ids only, no text).

A PT sample is ``<s>`` + N image slots + a caption (TEXT_TARGET, ≤ 128 tokens); an SFT sample is the system
prompt and user tag (TEXT_INPUT) + N image slots + the question (TEXT_INPUT) + the answer (TEXT_TARGET),
≈ 150 text tokens on average (DESIGN.md, "AKI-4B dimensions"). Lengths are drawn from a seeded generator,
so every benchmark run sees the same batches; padding and packing are done by the real collator
(:mod:`pipeline.data.collate`).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from pipeline.data.collate import collate, pack_rows
from pipeline.tokens import IMAGE, TEXT_INPUT, TEXT_TARGET

SFT_PREFIX_TOKENS = 45      # "<s><|system|>\n{system message}<|end|>\n<|user|>\n" with the Phi-3 tokenizer
PT_MAX_TEXT = 128
SFT_MAX_TEXT = 512


def pt_sample(rng: np.random.Generator, num_visual_tokens: int, max_text: int = PT_MAX_TEXT) -> np.ndarray:
    """Modality ids of one PT sample: ``<s>``, the image, a caption of 8..max_text tokens."""
    caption = int(rng.integers(8, max_text + 1))
    return np.concatenate([np.full(1, TEXT_INPUT), np.full(num_visual_tokens, IMAGE),
                           np.full(caption, TEXT_TARGET)]).astype(np.uint8)


def sft_sample(rng: np.random.Generator, num_visual_tokens: int, text_mean: float = 150.0,
               max_text: int = SFT_MAX_TEXT) -> np.ndarray:
    """Modality ids of one single-turn SFT sample with ≈ ``text_mean`` text tokens (log-normal spread)."""
    prefix = min(SFT_PREFIX_TOKENS, max(1, int(text_mean) // 3))
    text = int(np.clip(rng.lognormal(np.log(text_mean), 0.5), prefix + 2, max_text))
    answer = max(1, int((text - prefix) * rng.uniform(0.05, 0.6)))
    question = text - prefix - answer
    return np.concatenate([np.full(prefix, TEXT_INPUT), np.full(num_visual_tokens, IMAGE),
                           np.full(question, TEXT_INPUT), np.full(answer, TEXT_TARGET)]).astype(np.uint8)


def make_sample(modality_ids: np.ndarray, rng: np.random.Generator, vocab_size: int, image_size: int,
                num_visual_tokens: int) -> dict[str, Any]:
    """A decoded sample as :func:`pipeline.data.collate.collate` takes it: random ids, random images."""
    n_images = int((modality_ids == IMAGE).sum()) // num_visual_tokens
    return {"input_ids": rng.integers(1, vocab_size, len(modality_ids)).astype(np.int64),
            "modality_ids": modality_ids.astype(np.int64),
            "pixel_values": torch.from_numpy(rng.standard_normal((n_images, 3, image_size, image_size),
                                                                 dtype=np.float32))}


def fill_rows(draw: Callable[[], np.ndarray], rows: int, row_len: int) -> list[np.ndarray]:
    """Samples from ``draw()`` until one more would need a row beyond ``rows`` when packed by the collator."""
    samples: list[np.ndarray] = []
    while True:
        nxt = draw()
        if samples and len(pack_rows([len(s) for s in samples + [nxt]], row_len)) > rows:
            return samples
        samples.append(nxt)


def packed_layout(rng: np.random.Generator, rows: int, row_len: int, num_visual_tokens: int,
                  text_mean: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``modality_ids`` and ``document_ids`` [rows, row_len] of SFT samples packed by the real collator."""
    max_text = max(4, row_len - num_visual_tokens)
    layouts = fill_rows(lambda: sft_sample(rng, num_visual_tokens, text_mean, max_text), rows, row_len)
    samples = [make_sample(m, rng, 2, 1, num_visual_tokens) for m in layouts]
    batch = collate(samples, "pack", pad_id=0, pack_tokens=row_len)
    return batch["modality_ids"], batch["document_ids"]
