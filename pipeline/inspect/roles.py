"""Token roles for the pictures and the attention share: system, user, image, question, answer.

A role is read from the token contract (the modality ids of :mod:`pipeline.tokens`) and the token ids of
the chat role tags (:func:`pipeline.model.tokenizer.role_tag_ids`), never from a second copy of the
template. Within each document:

* ``IMAGE`` / ``TEXT_TARGET`` tokens are ``image`` / ``answer``;
* a ``TEXT_INPUT`` token before the document's first ``<|user|>`` tag (BOS, system message, or the whole
  prompt of a caption sample, which has no tags) is ``system``;
* after a ``<|user|>`` tag, a ``TEXT_INPUT`` token is ``user`` when an image follows it in the same turn
  (the tag and its newline before the image) and ``question`` otherwise: the prompt text that follows the
  image(s), up to the answer, role tags included. These are exactly the keys that ``mma`` unlocks for
  image queries, so an image token's attention to ``question`` tokens is zero under ``causal``.
"""
from __future__ import annotations

import enum

import numpy as np

from pipeline.model.tokenizer import SYSTEM_TAG, USER_TAG
from pipeline.tokens import IMAGE, PAD, TEXT_INPUT, TEXT_TARGET


class Role(enum.IntEnum):
    """What a token is in its sample (the bands of the mask pictures)."""

    PAD = 0
    SYSTEM = 1
    USER = 2
    IMAGE = 3
    QUESTION = 4
    ANSWER = 5


def _document_starts(document_ids: np.ndarray) -> np.ndarray:
    starts = np.ones(len(document_ids), dtype=bool)
    starts[1:] = document_ids[1:] != document_ids[:-1]
    return starts


def _image_ahead_in_turn(modality_ids: np.ndarray, doc_starts: np.ndarray) -> np.ndarray:
    """True where an IMAGE token follows in the same document before the next TEXT_TARGET token."""
    ahead = np.zeros(len(modality_ids), dtype=bool)
    seen = False
    for t in range(len(modality_ids) - 1, -1, -1):
        if t + 1 < len(modality_ids) and doc_starts[t + 1]:
            seen = False
        ahead[t] = seen
        if modality_ids[t] == IMAGE:
            seen = True
        elif modality_ids[t] == TEXT_TARGET:
            seen = False
    return ahead


def token_roles(input_ids: np.ndarray, modality_ids: np.ndarray, tag_ids: dict[str, int],
                document_ids: np.ndarray | None = None) -> np.ndarray:
    """Role (a :class:`Role` value) of every token of one row ``[L]``.

    ``tag_ids`` maps the chat role tags to their ids (:func:`pipeline.model.tokenizer.role_tag_ids`);
    ``document_ids`` numbers the packed documents of the row (None: one document).
    """
    ids, mods = np.asarray(input_ids), np.asarray(modality_ids)
    if ids.shape != mods.shape or ids.ndim != 1:
        raise ValueError(f"input_ids {ids.shape} and modality_ids {mods.shape} must be one row [L] of one shape")
    docs = np.ones_like(mods) if document_ids is None else np.asarray(document_ids)
    doc_starts = _document_starts(docs)
    image_ahead = _image_ahead_in_turn(mods, doc_starts)
    fixed = {PAD: Role.PAD, IMAGE: Role.IMAGE, TEXT_TARGET: Role.ANSWER}
    roles = np.empty(len(mods), dtype=np.int64)
    in_user_turn = False
    for t, (tid, mod) in enumerate(zip(ids.tolist(), mods.tolist())):
        if doc_starts[t] or (mod == TEXT_INPUT and tid == tag_ids[SYSTEM_TAG]):
            in_user_turn = False
        if mod == TEXT_INPUT and tid == tag_ids[USER_TAG]:
            in_user_turn = True
        if mod in fixed:
            roles[t] = fixed[mod]
        elif not in_user_turn:
            roles[t] = Role.SYSTEM
        else:
            roles[t] = Role.USER if image_ahead[t] else Role.QUESTION
    return roles


__all__ = ["Role", "token_roles"]
