"""Dual-order training (DOT, paper §3.2): text-then-image (T&I) samples made at load time.

Samples are stored once, image first (I&T). The T&I order is a permutation of a batch's tokens
computed from ``modality_ids`` (and ``document_ids`` for packed rows) alone — no second copy of the data.

The rule, per document. An *image run* is a maximal run of consecutive IMAGE tokens (several images
written back to back form one run). The *text run after it* is the maximal run of tokens of one
modality that directly follows it in the same document. The image run moves:

* text run is TEXT_TARGET (pre-training: ``<s><image>{caption}<|endofchunk|>``) → to the end of that run:
  ``<s>{caption}<|endofchunk|><image>``;
* text run is TEXT_INPUT (finetuning: ``<|user|>\\n<image>\\n{question}<|end|>\\n<|assistant|>\\n``) → to
  before the run's last ``tail_tokens`` tokens, the chat template's prompt suffix
  ``<|end|>\\n<|assistant|>\\n`` (:func:`prompt_suffix_tokens` counts them with the tokenizer):
  ``<|user|>\\n\\n{question}<image><|end|>\\n<|assistant|>\\n{answer}`` — the question, then the image,
  then the turn ends;
* an image run with no text after it in its document (or followed by padding) stays where it is.

Every other token keeps its relative order; tokens never leave their document; an image never passes
another image, so the images' row-major order — the order of ``pixel_values`` — is unchanged. Modality
ids travel with their tokens, so the loss is still on the same answer/caption tokens.

Schedule (paper Eq. 4): a stage lists its orders, e.g. ``["ti", "it"]``; each takes an equal,
consecutive share of the stage's optimizer steps (T&I first, then I&T, ending in the inference order).
``["it"]`` is the standard pipeline and ``["ti"]`` / ``["it"]`` the DOT ablations without one order.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from pipeline import chat
from pipeline.tokens import IMAGE, PAD, TEXT_INPUT

IMAGE_FIRST, TEXT_FIRST = "it", "ti"


def prompt_suffix_tokens(tokenizer: PreTrainedTokenizerBase, layout: str = chat.DEFAULT_LAYOUT) -> int:
    """Number of tokens of the prompt's input end (``TextLayout.prompt_end``: ``<|end|>\\n<|assistant|>``,
    then ``\\n`` in ``phi3_chat``).

    Checked against a prompt encoded by the chat template, so a tokenizer that merges the suffix with
    the question text is refused instead of silently splitting a token.
    """
    text_layout = chat.get_layout(layout)
    suffix = tokenizer.encode(text_layout.prompt_end, add_special_tokens=False)
    prompt = chat.encode(tokenizer, text_layout.chat_segments([("What is shown?", None)]), num_visual_tokens=1)
    inputs = prompt.input_ids[prompt.modality_ids == TEXT_INPUT]
    if inputs[-len(suffix):].tolist() != list(suffix):
        raise ValueError(f"this tokenizer does not encode the prompt's end {text_layout.prompt_end!r} the same "
                         "inside a prompt as alone, so DOT cannot find where the question ends")
    return len(suffix)


def text_first_permutation(modality_ids: torch.Tensor, document_ids: torch.Tensor | None = None,
                           tail_tokens: int = 0) -> torch.Tensor:
    """Index tensor ``[B, L]`` such that ``x.gather(1, perm)`` is the T&I order of I&T rows ``x``."""
    m = modality_ids.long()
    B, L = m.shape
    docs = (m != PAD).long() if document_ids is None else document_ids.long()
    pos = torch.arange(L, device=m.device).expand(B, L)
    run_start = torch.ones_like(m, dtype=torch.bool)
    run_start[:, 1:] = (m[:, 1:] != m[:, :-1]) | (docs[:, 1:] != docs[:, :-1])
    # next_start[p]: first run start after p (L when none), by a suffix minimum.
    starts = torch.where(run_start, pos, torch.full_like(pos, L))
    suffix_min = starts.flip(1).cummin(1).values.flip(1)
    next_start = torch.cat([suffix_min[:, 1:], torch.full_like(pos[:, :1], L)], dim=1)
    after = next_start.clamp(max=L - 1)                      # first token after the image run
    m_after, d_after = m.gather(1, after), docs.gather(1, after)
    movable = (m == IMAGE) & (next_start < L) & (m_after != PAD) & (m_after != IMAGE) & (d_after == docs)
    text_end = next_start.gather(1, after)                   # end (exclusive) of the text run after it
    anchor = torch.where(m_after == TEXT_INPUT, torch.maximum(next_start, text_end - tail_tokens), text_end)
    # Sort keys: token p -> 2p; a moved image token -> just before the token at its anchor.
    key = torch.where(movable, 2 * anchor - 1, 2 * pos)
    return key.argsort(dim=1, stable=True)


def to_text_first(batch: dict[str, Any], tail_tokens: int) -> dict[str, Any]:
    """A copy of ``batch`` (from pipeline.data.collate) in T&I order; ``pixel_values`` is unchanged."""
    perm = text_first_permutation(batch["modality_ids"], batch.get("document_ids"), tail_tokens)
    out = dict(batch)
    for key in ("input_ids", "modality_ids", "document_ids"):
        if out.get(key) is not None:
            out[key] = out[key].gather(1, perm)
    return out


def reorder_sample(input_ids: np.ndarray, modality_ids: np.ndarray, tail_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """T&I order of one stored sample (numpy in, numpy out, dtypes kept)."""
    perm = text_first_permutation(torch.from_numpy(modality_ids.astype(np.int64))[None], None, tail_tokens)[0]
    perm = perm.numpy()
    return input_ids[perm], modality_ids[perm]


@dataclasses.dataclass
class DotSchedule:
    """Which input order each optimizer step of a stage trains on."""

    orders: list[str]
    """Orders in training sequence, e.g. ["ti", "it"]; each gets an equal consecutive share of the steps."""
    total_steps: int
    """Optimizer steps of the stage."""
    tail_tokens: int = 0
    """Prompt-suffix length kept after a moved image (see :func:`prompt_suffix_tokens`)."""

    def __post_init__(self) -> None:
        bad = [o for o in self.orders if o not in (IMAGE_FIRST, TEXT_FIRST)]
        if not self.orders or bad:
            raise ValueError(f"DOT orders {self.orders!r}: use 'it' (image first) and/or 'ti' (text first)")
        if self.total_steps < len(self.orders):
            raise ValueError(f"{self.total_steps} steps cannot be split between orders {self.orders}")

    def order_for_step(self, step: int) -> str:
        """Order of optimizer step ``step`` (0-based: the number of steps already taken)."""
        share = min(max(step, 0) * len(self.orders) // self.total_steps, len(self.orders) - 1)
        return self.orders[share]

    def apply(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        """``batch`` in the order of ``step`` (unchanged for I&T: the stored order)."""
        if self.order_for_step(step) == TEXT_FIRST:
            return to_text_first(batch, self.tail_tokens)
        return batch


def build_dot_schedule(orders: list[str], total_steps: int, tokenizer: PreTrainedTokenizerBase,
                       layout: str = chat.DEFAULT_LAYOUT) -> DotSchedule:
    """The schedule of a recipe: ``build_dot_schedule(cfg.data.orders, cfg.train.total_steps, tokenizer,
    cfg.model.text_layout)``."""
    return DotSchedule(list(orders), total_steps, prompt_suffix_tokens(tokenizer, layout))


__all__ = ["DotSchedule", "build_dot_schedule", "prompt_suffix_tokens", "reorder_sample",
           "text_first_permutation", "to_text_first", "IMAGE_FIRST", "TEXT_FIRST"]
