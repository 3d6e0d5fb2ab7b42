"""The prompt templates (paper Table 5) and their encoding into ``input_ids`` + ``modality_ids``.

This is the one place the chat format lives. Data prep, training-time re-ordering, generation and
evaluation all build samples through :func:`pretrain_segments` / :func:`chat_segments` and
:func:`encode`.

Pre-training (Table 5)::

    <s><image>{caption}<|endofchunk|>

Supervised finetuning (Phi-3 chat format)::

    <s><|system|>\\n{system}<|end|>\\n<|user|>\\n<image>\\n{input}<|end|>\\n<|assistant|>\\n{target}<|end|>

where ``<image>`` becomes N image-slot tokens (N = the model's visual tokens). Each segment is
tokenized on its own, so the boundaries between roles are exact; every token of a segment gets the
segment's modality. A multi-turn conversation repeats ``\\n<|user|>\\n…<|end|>\\n<|assistant|>\\n…<|end|>``
with every answer TEXT_TARGET. The answer ends with ``<|end|>`` (TEXT_TARGET), so a model learns to stop;
generation stops at ``<|end|>``, ``<|endofchunk|>`` or EOS.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase

from pipeline.model.tokenizer import (ASSISTANT_TAG, END_OF_CHUNK, END_TAG, SYSTEM_TAG, USER_TAG,
                                      image_token_id)
from pipeline.tokens import IMAGE, TEXT_INPUT, TEXT_TARGET

SYSTEM_MESSAGE = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")


@dataclasses.dataclass(frozen=True)
class Segment:
    """A run of tokens with one modality: text (``text`` set) or one image (``text`` None)."""

    modality: int
    text: str | None = None


def image() -> Segment:
    """One image: expands to N IMAGE slots at encoding time."""
    return Segment(IMAGE)


def pretrain_segments(caption: str) -> list[Segment]:
    """PT template ``<image>{caption}<|endofchunk|>``: the caption is the target."""
    return [image(), Segment(TEXT_TARGET, caption + END_OF_CHUNK)]


def chat_segments(turns: Sequence[tuple[str, str | None]], num_images: int = 1,
                  system: str = SYSTEM_MESSAGE) -> list[Segment]:
    """SFT template for one or more (user input, assistant answer) turns.

    The images go at the start of the first user turn. A final turn whose answer is None ends the
    prompt with ``<|assistant|>\\n`` — the form generation and evaluation prefill.
    """
    if not turns:
        raise ValueError("chat_segments needs at least one (input, answer) turn")
    segs = [Segment(TEXT_INPUT, f"{SYSTEM_TAG}\n{system}{END_TAG}\n")]
    for i, (user, answer) in enumerate(turns):
        if i == 0 and num_images:
            segs.append(Segment(TEXT_INPUT, f"{USER_TAG}\n"))
            segs.extend(image() for _ in range(num_images))
            segs.append(Segment(TEXT_INPUT, f"\n{user}{END_TAG}\n{ASSISTANT_TAG}\n"))
        else:
            segs.append(Segment(TEXT_INPUT, f"{USER_TAG}\n{user}{END_TAG}\n{ASSISTANT_TAG}\n"))
        if answer is None:
            if i != len(turns) - 1:
                raise ValueError("only the last turn may leave its answer empty (the prompt to answer)")
            break
        segs.append(Segment(TEXT_TARGET, f"{answer}{END_TAG}"))
        if i != len(turns) - 1:
            segs.append(Segment(TEXT_INPUT, "\n"))
    return segs


@dataclasses.dataclass
class Encoded:
    """One tokenized sample laid out as the LLM sees it."""

    input_ids: np.ndarray      # int32[L]
    modality_ids: np.ndarray   # uint8[L]
    truncated: bool            # True when target text was cut to fit ``max_text_tokens``

    @property
    def num_images(self) -> int:
        return 0 if len(self.modality_ids) == 0 else int(
            np.sum((self.modality_ids[1:] == IMAGE) & (self.modality_ids[:-1] != IMAGE))
            + (self.modality_ids[0] == IMAGE))


class OverLength(ValueError):
    """The prompt alone exceeds the text budget: the sample cannot be kept."""


def encode(tokenizer: PreTrainedTokenizerBase, segments: Sequence[Segment], num_visual_tokens: int,
           max_text_tokens: int | None = None, add_bos: bool = True) -> Encoded:
    """Tokenize ``segments`` into ids and per-token modality ids.

    ``max_text_tokens`` bounds the text tokens (image slots are not counted, as in the paper's max
    length): the tail of the target text is cut to fit. If the TEXT_INPUT part alone, or the prompt
    plus at least one target token, does not fit, :class:`OverLength` is raised so the caller can
    count and drop the sample.
    """
    img_id = image_token_id(tokenizer)
    ids: list[np.ndarray] = []
    mods: list[np.ndarray] = []
    if add_bos and tokenizer.bos_token_id is not None:
        ids.append(np.array([tokenizer.bos_token_id], np.int32))
        mods.append(np.array([TEXT_INPUT], np.uint8))
    for seg in segments:
        if seg.modality == IMAGE:
            piece = np.full(num_visual_tokens, img_id, np.int32)
        else:
            piece = np.asarray(tokenizer.encode(seg.text, add_special_tokens=False), np.int32)
        ids.append(piece)
        mods.append(np.full(len(piece), seg.modality, np.uint8))
    input_ids = np.concatenate(ids) if ids else np.zeros(0, np.int32)
    modality_ids = np.concatenate(mods) if mods else np.zeros(0, np.uint8)
    truncated = False
    if max_text_tokens is not None:
        is_text = modality_ids != IMAGE
        n_text = int(is_text.sum())
        if n_text > max_text_tokens:
            # Keep tokens up to the position where the (max_text_tokens)-th text token sits.
            cut = int(np.flatnonzero(is_text)[max_text_tokens - 1]) + 1 if max_text_tokens > 0 else 0
            dropped = modality_ids[cut:]
            kept = modality_ids[:cut]
            if (dropped == TEXT_INPUT).any() or (dropped == IMAGE).any() or not (kept == TEXT_TARGET).any():
                raise OverLength(f"prompt needs more than {max_text_tokens} text tokens")
            input_ids, modality_ids, truncated = input_ids[:cut], kept, True
    return Encoded(input_ids, modality_ids, truncated)
