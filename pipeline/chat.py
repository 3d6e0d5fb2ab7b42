"""Text layouts (paper Table 5 templates) and their encoding into ``input_ids`` + ``modality_ids``.

This is the one place the chat format lives. Data prep, training-time re-ordering, generation and
evaluation all build samples through :func:`pretrain_segments` / :func:`chat_segments` (or a
layout's :meth:`TextLayout.segments` for layout-neutral :class:`Caption` / :class:`Chat` content) and
:func:`encode`.

Two named layouts (:data:`LAYOUTS`), both starting every sample with BOS:

``released`` (default; the layout the released AKI-4B was trained on, see OFFICIAL_AKI.md)::

    PT:   <s><image>{caption}<|endofchunk|><|endoftext|>
    SFT:  <s><|system|>\\n{system}<|end|>\\n<|user|>\\n<image>\\n{input}<|end|>\\n<|assistant|>\\n{target}<|endoftext|>

  The target starts right after ``<|assistant|>`` (its ``\\n`` is a target token) and ends with EOS,
  no ``<|end|>``. One turn per sample (data prep splits LLaVA's dialogues into one sample per turn).
  With the ``mma`` mode, image tokens then see the prompt up to and including ``<|assistant|>`` and never
  the answer: the official mask.

``phi3_chat`` (Phi-3's own chat format)::

    PT:   <s><image>{caption}<|endofchunk|>
    SFT:  <s><|system|>\\n{system}<|end|>\\n<|user|>\\n<image>\\n{input}<|end|>\\n<|assistant|>\\n{target}<|end|>

  Multi-turn conversations repeat ``\\n<|user|>\\n…<|end|>\\n<|assistant|>\\n…<|end|>``.

``<image>`` becomes N image-slot tokens (N = the model's visual tokens). Text is text: the layout's
control tokens (role tags, ``<|endofchunk|>``, ``<image>``, BOS, EOS) are placed by the layout as their
ids, and the record's text (caption, system message, question, answer) is always tokenized as ordinary
text, so a caption holding ``<|endoftext|>`` or a question holding ``<|assistant|>`` or ``<image>`` can
neither end a sample, inject a role nor add an image. :func:`encode` tokenizes each run of text between
two control tokens at once — for ordinary text exactly what tokenizing the whole template string gives,
as the official code does (a tokenizer splits a string at its special tokens and encodes the pieces
apart) — and gives every token the modality of the segment its text came from (a token straddling two
segments is refused, so the boundaries are exact). Generation prompts end where the answer starts; in
the released layout the prompt carries the answer's leading ``\\n`` as its first (TEXT_TARGET) token.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence, Union

import numpy as np
from transformers import PreTrainedTokenizerBase

from pipeline.model.tokenizer import (ASSISTANT_TAG, END_OF_CHUNK, END_TAG, IMAGE_TOKEN, SYSTEM_TAG, USER_TAG,
                                      control_token_id, encode_text, image_token_id, special_token_ids)
from pipeline.tokens import IMAGE, TEXT_INPUT, TEXT_TARGET

SYSTEM_MESSAGE = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")


@dataclasses.dataclass(frozen=True)
class Segment:
    """A run of tokens with one modality: ordinary text (``text``), one control token of the layout
    (``control``: a role tag, ``<|endofchunk|>``, an image's ``<image>``), or the end-of-text token.

    ``text`` is encoded as text whatever it holds; only ``control`` becomes a control token's id.
    """

    modality: int
    text: str | None = None
    end_of_text: bool = False    # the tokenizer's EOS (a TEXT_TARGET segment without text)
    control: str | None = None   # a control token of the layout, placed as its id


def text(modality: int, value: str) -> Segment:
    """Ordinary text of one modality (a record's caption, question or answer, the template's newlines)."""
    return Segment(modality, value)


def tag(modality: int, token: str) -> Segment:
    """One control token of the layout (``<|user|>``, ``<|end|>``, ``<|endofchunk|>`` …)."""
    return Segment(modality, control=token)


def image() -> Segment:
    """One image: one ``<image>`` that expands to N IMAGE slots at encoding time."""
    return Segment(IMAGE, control=IMAGE_TOKEN)


EOS_SEGMENT = Segment(TEXT_TARGET, end_of_text=True)


def render(segments: Sequence[Segment], eos: str = "<|endoftext|>") -> str:
    """The template string of ``segments`` (control tokens and ``<image>`` written out, EOS as ``eos``): what
    the official code tokenizes as one string. For reading and tests; :func:`encode` never parses it."""
    return "".join(eos if seg.end_of_text else seg.control if seg.control is not None else seg.text
                   for seg in segments)


# ---- layout-neutral content ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Caption:
    """A pre-training sample's text: the caption of its image."""

    text: str


@dataclasses.dataclass(frozen=True)
class Chat:
    """An SFT sample's text: (user input, assistant answer) turns; a last answer None is a prompt."""

    turns: tuple[tuple[str, str | None], ...]
    system: str = SYSTEM_MESSAGE


Content = Union[Caption, Chat]


# ---- layouts --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TextLayout:
    """How content becomes text: what closes an answer, whether samples end with EOS, turn splitting."""

    name: str
    answer_end: str          # control token closing each answer ("" when the sample's EOS closes it)
    end_with_eos: bool       # every training sample ends with EOS (TEXT_TARGET)
    newline_in_answer: bool  # the ``\n`` after ``<|assistant|>`` belongs to the answer (TEXT_TARGET)
    single_turn: bool        # one (input, answer) turn per sample
    description: str = ""

    def pretrain_segments(self, caption: str) -> list[Segment]:
        """PT template ``<image>{caption}<|endofchunk|>`` (then EOS): the caption is the target."""
        segs = [image(), text(TEXT_TARGET, caption), tag(TEXT_TARGET, END_OF_CHUNK)]
        return segs + [EOS_SEGMENT] if self.end_with_eos else segs

    def chat_segments(self, turns: Sequence[tuple[str, str | None]], num_images: int = 1,
                      system: str = SYSTEM_MESSAGE) -> list[Segment]:
        """SFT template for (user input, assistant answer) turns; the images open the first user turn.

        A last turn whose answer is None ends the prompt where the answer starts — the form generation
        and evaluation prefill.
        """
        if not turns:
            raise ValueError("chat_segments needs at least one (input, answer) turn")
        if self.single_turn and len(turns) > 1:
            raise ValueError(f"layout {self.name!r} holds one turn per sample, got {len(turns)}: give each turn "
                             "its own sample (or use the phi3_chat layout)")
        I, T = TEXT_INPUT, TEXT_TARGET
        segs = [tag(I, SYSTEM_TAG), text(I, f"\n{system}"), tag(I, END_TAG), text(I, "\n")]
        for i, (user, answer) in enumerate(turns):
            segs.append(tag(I, USER_TAG))
            if i == 0 and num_images:
                segs.append(text(I, "\n"))
                segs.extend(image() for _ in range(num_images))
            segs += [text(I, f"\n{user}"), tag(I, END_TAG), text(I, "\n"), tag(I, ASSISTANT_TAG)]
            if not self.newline_in_answer:
                segs.append(text(I, "\n"))
            if answer is None:
                if i != len(turns) - 1:
                    raise ValueError("only the last turn may leave its answer empty (the prompt to answer)")
                if self.newline_in_answer:
                    segs.append(text(T, "\n"))
                return segs
            segs.append(text(T, ("\n" if self.newline_in_answer else "") + answer))
            if self.answer_end:
                segs.append(tag(T, self.answer_end))
            if i != len(turns) - 1:
                segs.append(text(I, "\n"))
        return segs + [EOS_SEGMENT] if self.end_with_eos else segs

    def segments(self, content: Content, num_images: int) -> list[Segment]:
        """The segments of layout-neutral ``content`` with ``num_images`` images."""
        if isinstance(content, Caption):
            if num_images != 1:
                raise ValueError(f"a caption sample has exactly one image, got {num_images}")
            return self.pretrain_segments(content.text)
        return self.chat_segments(content.turns, num_images, content.system)

    @property
    def prompt_end(self) -> str:
        """The text that ends a prompt's input part (the question's end and the assistant tag)."""
        return f"{END_TAG}\n{ASSISTANT_TAG}" + ("" if self.newline_in_answer else "\n")


LAYOUTS: dict[str, TextLayout] = {
    layout.name: layout for layout in (
        TextLayout("released", answer_end="", end_with_eos=True, newline_in_answer=True, single_turn=True,
                   description="the released AKI-4B's layout: BOS … EOS, answer from the \\n after "
                               "<|assistant|> to EOS"),
        TextLayout("phi3_chat", answer_end=END_TAG, end_with_eos=False, newline_in_answer=False,
                   single_turn=False, description="Phi-3 chat: answers end with <|end|>, multi-turn samples"),
    )
}
DEFAULT_LAYOUT = "released"


def get_layout(name: str | TextLayout) -> TextLayout:
    """Look up a layout by name (a :class:`TextLayout` passes through), with a clear error."""
    if isinstance(name, TextLayout):
        return name
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ValueError(f"unknown text layout {name!r}; known layouts: {', '.join(sorted(LAYOUTS))}") from None


def pretrain_segments(caption: str, layout: str | TextLayout = DEFAULT_LAYOUT) -> list[Segment]:
    """PT segments of ``caption`` in ``layout`` (see :meth:`TextLayout.pretrain_segments`)."""
    return get_layout(layout).pretrain_segments(caption)


def chat_segments(turns: Sequence[tuple[str, str | None]], num_images: int = 1, system: str = SYSTEM_MESSAGE,
                  layout: str | TextLayout = DEFAULT_LAYOUT) -> list[Segment]:
    """SFT segments of ``turns`` in ``layout`` (see :meth:`TextLayout.chat_segments`)."""
    return get_layout(layout).chat_segments(turns, num_images, system)


# ---- encoding -------------------------------------------------------------------------------------------

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


def _tokenize_text(tokenizer: PreTrainedTokenizerBase, segments: Sequence[Segment]
                   ) -> tuple[list[int], list[int]]:
    """The ids of ``segments`` (each image as one ``<image>``) and the modality of each id.

    A control segment becomes its token's id. Each run of text segments between two control tokens is
    tokenized at once as ordinary text (:func:`pipeline.model.tokenizer.encode_text`); whitespace next to
    a control token that absorbs it (an added token's ``lstrip`` / ``rstrip``) is dropped, as the tokenizer
    does on a whole string. The modality of a token is that of the segment where its text starts; every
    boundary inside a run is checked to fall between two tokens (the tokens of the text before it are a
    prefix of the run's tokens).
    """
    special = special_token_ids(tokenizer)
    added = tokenizer.added_tokens_decoder
    ids: list[int] = []
    mods: list[int] = []
    run: list[Segment] = []
    strip_left = False
    for seg in [*segments, None]:
        if seg is not None and seg.control is None:
            if seg.text is None:
                raise ValueError(f"a segment needs text or a control token: {seg}")
            run.append(seg)
            continue
        token_id = None if seg is None else control_token_id(tokenizer, seg.control)
        token = added.get(token_id)
        _tokenize_run(tokenizer, run, special, strip_left, bool(getattr(token, "lstrip", False)), ids, mods)
        run = []
        if seg is not None:
            ids.append(token_id)
            mods.append(seg.modality)
            strip_left = bool(getattr(token, "rstrip", False))
    return ids, mods


def _tokenize_run(tokenizer: PreTrainedTokenizerBase, run: Sequence[Segment], special: frozenset[int],
                  strip_left: bool, strip_right: bool, ids: list[int], mods: list[int]) -> None:
    """Append the ids and modalities of a run of text segments (see :func:`_tokenize_text`)."""
    joined, bounds = "", []
    for seg in run:
        joined += seg.text
        bounds.append(len(joined))
    lo = len(joined) - len(joined.lstrip()) if strip_left else 0
    hi = max(lo, len(joined.rstrip()) if strip_right else len(joined))
    joined = joined[lo:hi]
    run_ids = encode_text(tokenizer, joined, special)
    start = 0
    for seg, end in zip(run, bounds):
        end = min(max(end - lo, 0), len(joined))
        if end == len(joined):
            stop = len(run_ids)
        else:
            prefix = encode_text(tokenizer, joined[:end], special)
            stop = len(prefix)
            if prefix != run_ids[:stop]:
                raise ValueError(f"the tokenizer merges text across the boundary after "
                                 f"{joined[max(0, end - 20):end]!r}; a token must not span two roles of the template")
        mods.extend([seg.modality] * (stop - start))
        start = max(start, stop)
    ids.extend(run_ids)


def encode(tokenizer: PreTrainedTokenizerBase, segments: Sequence[Segment], num_visual_tokens: int,
           max_text_tokens: int | None = None, add_bos: bool = True) -> Encoded:
    """Tokenize ``segments`` into ids and per-token modality ids.

    ``max_text_tokens`` bounds the text tokens (image slots are not counted, as in the paper's max
    length): the tail of the target text is cut to fit, keeping a final EOS. If the TEXT_INPUT part
    alone, or the prompt plus at least one target token, does not fit, :class:`OverLength` is raised so
    the caller can count and drop the sample.
    """
    segments = list(segments)
    eos = bool(segments) and segments[-1].end_of_text
    body = segments[:-1] if eos else segments
    if any(seg.end_of_text for seg in body):
        raise ValueError("EOS may only end a sample (the last segment)")
    if eos and tokenizer.eos_token_id is None:
        raise ValueError("the layout ends samples with EOS but the tokenizer has no eos_token")
    ids, mods = _tokenize_text(tokenizer, body)
    img_id = image_token_id(tokenizer)
    input_ids = np.asarray(ids, np.int64)
    modality_ids = np.asarray(mods, np.uint8)
    if len(input_ids) and ((input_ids == img_id) != (modality_ids == IMAGE)).any():
        raise ValueError(f"the image placeholder {IMAGE_TOKEN!r} appears outside an image segment")
    # Expand each image placeholder into N slots.
    repeats = np.where(modality_ids == IMAGE, num_visual_tokens, 1)
    input_ids, modality_ids = np.repeat(input_ids, repeats).astype(np.int32), np.repeat(modality_ids, repeats)
    if add_bos and tokenizer.bos_token_id is not None:
        input_ids = np.concatenate([np.array([tokenizer.bos_token_id], np.int32), input_ids])
        modality_ids = np.concatenate([np.array([TEXT_INPUT], np.uint8), modality_ids])
    truncated = False
    budget = None if max_text_tokens is None else max_text_tokens - int(eos)
    if budget is not None:
        is_text = modality_ids != IMAGE
        if int(is_text.sum()) > budget:
            # Keep tokens up to the position where the (budget)-th text token sits.
            cut = int(np.flatnonzero(is_text)[budget - 1]) + 1 if budget > 0 else 0
            dropped, kept = modality_ids[cut:], modality_ids[:cut]
            if (dropped == TEXT_INPUT).any() or (dropped == IMAGE).any() or not (kept == TEXT_TARGET).any():
                raise OverLength(f"prompt needs more than {max_text_tokens} text tokens")
            input_ids, modality_ids, truncated = input_ids[:cut], kept, True
    if eos:
        input_ids = np.concatenate([input_ids, np.array([tokenizer.eos_token_id], np.int32)])
        modality_ids = np.concatenate([modality_ids, np.array([TEXT_TARGET], np.uint8)])
    return Encoded(input_ids, modality_ids, truncated)
