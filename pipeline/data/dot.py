"""Dual-order training (DOT, paper §3.2): text-then-image (T&I) samples made at load time.

Samples are stored once, image first (I&T). The T&I order is a permutation of a batch's tokens
computed from ``modality_ids`` (and ``document_ids`` for packed rows) alone — no second copy of the data.

The rule, per document. An *image run* is a maximal run of consecutive IMAGE tokens (several images
written back to back form one run). The *text run after it* is the maximal run of tokens of one
modality that directly follows it in the same document. The image run moves:

* text run is TEXT_TARGET (pre-training: ``<s><image>{caption}<|endofchunk|>``) → to before the run's
  last ``target_tail`` tokens. The recipe key ``data.ti_pt_image`` (:data:`TI_PT_IMAGE`) chooses them:

  - ``before_end`` (the shipped recipes): ``<s>{caption}<image><|endofchunk|>`` — the caption's end
    (:func:`caption_end_tokens`: ``<|endofchunk|>``, and EOS where the layout has one) is predicted after
    the image, so the loss depends on the image and the connector gets gradient;
  - ``last``: ``<s>{caption}<|endofchunk|><image>`` — nothing is predicted after the image: such a step
    trains the LLM as a text-only language model and the connector (and SigLIP) get no gradient.

  The paper states only that T&I places the text before the image (§3.2; its Figure 4 template is an
  image that the text we work from does not reproduce), so this is our choice, stated in the recipes;
* text run is TEXT_INPUT (finetuning: ``<|user|>\\n<image>\\n{question}<|end|>\\n<|assistant|>\\n``) → to
  before the run's last ``tail_tokens`` tokens, the chat template's prompt suffix
  ``<|end|>\\n<|assistant|>\\n`` (:func:`prompt_suffix_tokens` counts them with the tokenizer):
  ``<|user|>\\n\\n{question}<image><|end|>\\n<|assistant|>\\n{answer}`` — the question, then the image,
  then the turn ends;
* an image run with no text after it in its document (or followed by padding) stays where it is.

Every other token keeps its relative order; tokens never leave their document; an image never passes
another image, so the images' row-major order — the order of ``pixel_values`` — is unchanged. Modality
ids travel with their tokens, so the loss is still on the same answer/caption tokens.

What each order trains (tests/test_dot.py checks these on a tiny model); the loss is on the same
tokens in both orders of a sample, SigLIP is frozen in all of them:

* PT I&T ``<s><image>{caption}<|endofchunk|>``: caption + end; gradient to connector and LLM;
* PT T&I, ``before_end``: ``<s>{caption}<image><|endofchunk|>``: caption + end; connector and LLM
  (the connector only through the end tokens, the caption itself is predicted before the image);
* PT T&I, ``last``: ``<s>{caption}<|endofchunk|><image>``: caption + end; LLM only;
* SFT I&T ``…<|user|>\n<image>\n{question}<|end|>\n<|assistant|>\n{answer}``: answer; connector and LLM;
* SFT T&I ``…<|user|>\n\n{question}<image><|end|>\n<|assistant|>\n{answer}``: answer; connector and LLM.

Schedule (paper Eq. 4): a stage lists its orders, e.g. ``["ti", "it"]``;
each takes an equal, consecutive share of the stage's optimizer steps (T&I first, then I&T, ending in
the inference order), and each reads the same samples (pipeline/data/phases.py). ``optim.schedule_span``
says whether one LR schedule spans both orders or each order runs its own. ``["it"]`` is the standard
pipeline and ``["ti"]`` / ``["it"]`` the DOT ablations without one order.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from pipeline import chat
from pipeline.tokens import IMAGE, PAD, TEXT_INPUT, TEXT_TARGET

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


def caption_end_tokens(tokenizer: PreTrainedTokenizerBase, layout: str = chat.DEFAULT_LAYOUT) -> int:
    """Number of target tokens the PT template puts after the caption text (``<|endofchunk|>``, plus EOS
    in a layout that ends samples with it), found by encoding a caption through pipeline.chat."""
    caption = "a photo"
    enc = chat.encode(tokenizer, chat.pretrain_segments(caption, layout), num_visual_tokens=1)
    target = enc.input_ids[enc.modality_ids == TEXT_TARGET].tolist()
    text = tokenizer.encode(caption, add_special_tokens=False)
    if target[:len(text)] != list(text):
        raise ValueError("this tokenizer does not encode a caption the same inside the PT template as alone, "
                         "so DOT cannot find where the caption ends")
    return len(target) - len(text)


# data.ti_pt_image -> target tokens kept after the image in a T&I pre-training sample
TI_PT_IMAGE: dict[str, Callable[[PreTrainedTokenizerBase, str], int]] = {
    "before_end": caption_end_tokens,
    "last": lambda tokenizer, layout: 0,
}


def text_first_permutation(modality_ids: torch.Tensor, document_ids: torch.Tensor | None = None,
                           tail_tokens: int = 0, target_tail: int = 0) -> torch.Tensor:
    """Index tensor ``[B, L]`` such that ``x.gather(1, perm)`` is the T&I order of I&T rows ``x``.

    ``tail_tokens`` / ``target_tail``: tokens left after a moved image at the end of a TEXT_INPUT /
    TEXT_TARGET run (the chat prompt's suffix; the caption's end, see :data:`TI_PT_IMAGE`)."""
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
    tail = torch.where(m_after == TEXT_INPUT, tail_tokens, target_tail)
    anchor = torch.maximum(next_start, text_end - tail)
    # Sort keys: token p -> 2p; a moved image token -> just before the token at its anchor.
    key = torch.where(movable, 2 * anchor - 1, 2 * pos)
    return key.argsort(dim=1, stable=True)


def to_text_first(batch: dict[str, Any], tail_tokens: int, target_tail: int = 0) -> dict[str, Any]:
    """A copy of ``batch`` (from pipeline.data.collate) in T&I order; ``pixel_values`` is unchanged."""
    perm = text_first_permutation(batch["modality_ids"], batch.get("document_ids"), tail_tokens, target_tail)
    out = dict(batch)
    for key in ("input_ids", "modality_ids", "document_ids"):
        if out.get(key) is not None:
            out[key] = out[key].gather(1, perm)
    return out


def reorder_sample(input_ids: np.ndarray, modality_ids: np.ndarray, tail_tokens: int,
                   target_tail: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """T&I order of one stored sample (numpy in, numpy out, dtypes kept)."""
    perm = text_first_permutation(torch.from_numpy(modality_ids.astype(np.int64))[None], None, tail_tokens,
                                  target_tail)[0]
    perm = perm.numpy()
    return input_ids[perm], modality_ids[perm]


@dataclasses.dataclass
class DotSchedule:
    """Which input order each optimizer step of a stage trains on."""

    orders: list[str]
    """Orders in training sequence, e.g. ["ti", "it"]; each gets an equal consecutive share of the steps."""
    total_steps: int
    """Optimizer steps of the stage."""

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

    def start_steps(self) -> list[int]:
        """First step of each order (the smallest step whose :meth:`order_for_step` is that order)."""
        return [-(-k * self.total_steps // len(self.orders)) for k in range(len(self.orders))]


__all__ = ["DotSchedule", "TI_PT_IMAGE", "caption_end_tokens", "prompt_suffix_tokens", "reorder_sample",
           "text_first_permutation", "to_text_first", "IMAGE_FIRST", "TEXT_FIRST"]
