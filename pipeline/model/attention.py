"""Attention modes: one visibility rule per mode, and the masks and position ids derived from it.

Every mode is a rule over a (query, key) pair of tokens of the same document (DESIGN.md):

==============  ==========================================================================================
``causal``      k ≤ q
``mma``         k ≤ q, or q is IMAGE and k is TEXT_INPUT                                     (paper Eq. 5)
``mma_general`` k ≤ q, or q and k are both input (TEXT_INPUT or IMAGE) and of different modality  (Eq. 6)
``cca``         causal over concentric positions: the N slots of an image form a g×g grid (g² = N); a slot
                on ring r (0 = periphery) gets position ``image_start + r``, so an image slot sees the rings
                from the periphery inwards up to its own, and text after the image continues at
                ``image_start + number_of_rings`` (Xing et al. 2024, Concentric Causal Attention)
==============  ==========================================================================================

A pair with k after q (a non-causal edge) is only allowed inside one *turn* — the input between two
answers of a document — so in a multi-turn conversation no answer reaches an earlier token through a
later turn's question (that question sees the answer causally).

"k ≤ q" is read on the mode's *position ids*, which restart at 0 in every packed document; for the first
three modes they are the token's index in its document, for ``cca`` the concentric positions above.
PAD keys are never visible and tokens of different documents never see each other. Rows of PAD queries
are empty in :func:`dense_mask`; :func:`sdpa_mask` gives them a self edge so a softmax never sees an
empty row (their outputs are ignored).

The rule is written once per mode, as a function of broadcastable tensors; :func:`dense_mask` evaluates
it on ``[B, L, L]`` grids (SDPA, CPU, tests) and :func:`block_mask` hands it to FlexAttention as a
``mask_mod`` (GPU, compiled, block-sparse).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from pipeline.tokens import IMAGE, PAD, TEXT_INPUT, TEXT_TARGET

# rule(modality_q, modality_k, position_q, position_k) -> bool tensor, same-document pairs only.
Rule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _causal(mq: torch.Tensor, mk: torch.Tensor, pq: torch.Tensor, pk: torch.Tensor) -> torch.Tensor:
    return pk <= pq


def _mma(mq: torch.Tensor, mk: torch.Tensor, pq: torch.Tensor, pk: torch.Tensor) -> torch.Tensor:
    return (pk <= pq) | ((mq == IMAGE) & (mk == TEXT_INPUT))


def _is_input(m: torch.Tensor) -> torch.Tensor:
    return (m == TEXT_INPUT) | (m == IMAGE)


def _mma_general(mq: torch.Tensor, mk: torch.Tensor, pq: torch.Tensor, pk: torch.Tensor) -> torch.Tensor:
    return (pk <= pq) | (_is_input(mq) & _is_input(mk) & (mq != mk))


@dataclasses.dataclass(frozen=True)
class AttentionMode:
    """One attention mode: its visibility rule and whether image slots get concentric positions."""

    name: str
    rule: Rule
    concentric_positions: bool = False


MODES: dict[str, AttentionMode] = {m.name: m for m in (
    AttentionMode("causal", _causal),
    AttentionMode("mma", _mma),
    AttentionMode("mma_general", _mma_general),
    AttentionMode("cca", _causal, concentric_positions=True),
)}


def get_mode(mode: str) -> AttentionMode:
    """Look up ``mode`` in :data:`MODES`, with an error that lists the known modes."""
    try:
        return MODES[mode]
    except (KeyError, TypeError):
        raise ValueError(f"unknown attention mode {mode!r}; choose one of: {', '.join(MODES)}") from None


# ---------------------------------------------------------------------------------------------------
# Layout: documents, image slots and position ids, computed once per batch (vectorised, no Python loops).
# ---------------------------------------------------------------------------------------------------

def _check(modality_ids: torch.Tensor, document_ids: torch.Tensor | None) -> torch.Tensor:
    if modality_ids.dim() != 2:
        raise ValueError(f"modality_ids must be [batch, length], got shape {tuple(modality_ids.shape)}")
    if document_ids is None:
        return (modality_ids != PAD).long()
    if document_ids.shape != modality_ids.shape:
        raise ValueError(f"document_ids shape {tuple(document_ids.shape)} != modality_ids shape "
                         f"{tuple(modality_ids.shape)}; give one document id per token")
    return document_ids.long()


def _segment_starts(flag_new: torch.Tensor) -> torch.Tensor:
    """Index of the start of the segment each token belongs to (segments begin where ``flag_new``)."""
    idx = torch.arange(flag_new.shape[1], device=flag_new.device).expand_as(flag_new)
    return torch.where(flag_new, idx, torch.zeros_like(idx)).cummax(dim=1).values


def _boundaries(document_ids: torch.Tensor) -> torch.Tensor:
    new_doc = torch.ones_like(document_ids, dtype=torch.bool)
    new_doc[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return new_doc


def _image_slots(modality_ids: torch.Tensor, new_doc: torch.Tensor,
                 num_visual_tokens: int | None) -> tuple[torch.Tensor, int]:
    """Slot index (0..N-1) of every IMAGE token within its image, and N.

    Consecutive images form one IMAGE run; it is cut every N slots. Without ``num_visual_tokens``
    N is taken as the shortest IMAGE run in the batch.
    """
    is_img = modality_ids == IMAGE
    run_start = is_img.clone()
    run_start[:, 1:] &= ~is_img[:, :-1] | new_doc[:, 1:]
    offset = torch.arange(modality_ids.shape[1], device=modality_ids.device) - _segment_starts(run_start)
    if num_visual_tokens is None:
        if not is_img.any():
            return torch.zeros_like(offset), 1
        run_end = is_img.clone()
        run_end[:, :-1] &= ~(is_img[:, 1:] & ~run_start[:, 1:])
        num_visual_tokens = int((offset[is_img & run_end] + 1).min())
    return torch.where(is_img, offset % num_visual_tokens, torch.zeros_like(offset)), num_visual_tokens


def _grid_side(num_visual_tokens: int) -> int:
    side = math.isqrt(num_visual_tokens)
    if side * side != num_visual_tokens:
        raise ValueError(f"cca needs a square latent grid, but an image has N={num_visual_tokens} "
                         "visual tokens (not a square number); use a size whose num_latents is g*g")
    return side


def position_ids(modality_ids: torch.Tensor, mode: str, document_ids: torch.Tensor | None = None,
                 num_visual_tokens: int | None = None) -> torch.Tensor:
    """Position ids [B, L] for the LLM: 0.. per document, PAD tokens excluded (they get 0).

    Left padding is therefore handled: a row's first real token has position 0. In ``cca`` the N slots
    of an image share ``ring_count`` positions (one per concentric ring, periphery first).
    """
    spec = get_mode(mode)
    docs = _check(modality_ids, document_ids)
    new_doc = _boundaries(docs)
    real = (modality_ids != PAD).long()
    if spec.concentric_positions:
        slot, n = _image_slots(modality_ids, new_doc, num_visual_tokens)
        side = _grid_side(n)
        rings = (side + 1) // 2
        row, col = slot // side, slot % side
        ring = torch.minimum(torch.minimum(row, col), torch.minimum(side - 1 - row, side - 1 - col))
        is_img = modality_ids == IMAGE
        # An image advances the position by `rings`: its first `rings` slots count 1, the rest 0.
        step = torch.where(is_img, (slot < rings).long(), real)
    else:
        step = real
    before = step.cumsum(dim=1) - step
    base = before - before.gather(1, _segment_starts(new_doc))
    if spec.concentric_positions:
        base = torch.where(is_img, base - torch.clamp(slot, max=rings) + ring, base)
    return base * real


def _turns(modality_ids: torch.Tensor) -> torch.Tensor:
    """Turn index [B, L]: it grows at every input token that directly follows an answer (TEXT_TARGET)."""
    after_answer = torch.zeros_like(modality_ids, dtype=torch.bool)
    after_answer[:, 1:] = _is_input(modality_ids[:, 1:]) & (modality_ids[:, :-1] == TEXT_TARGET)
    return after_answer.long().cumsum(dim=1)


def _visible(spec: AttentionMode, mq: torch.Tensor, mk: torch.Tensor, pq: torch.Tensor, pk: torch.Tensor,
             dq: torch.Tensor, dk: torch.Tensor, tq: torch.Tensor, tk: torch.Tensor) -> torch.Tensor:
    """The full rule: same document, neither side PAD, the mode's rule, non-causal pairs within a turn."""
    return (dq == dk) & (mq != PAD) & (mk != PAD) & spec.rule(mq, mk, pq, pk) & ((pk <= pq) | (tq == tk))


def dense_mask(modality_ids: torch.Tensor, mode: str, document_ids: torch.Tensor | None = None,
               num_visual_tokens: int | None = None) -> torch.Tensor:
    """Bool mask [B, L, L]: True where query (dim 1) may attend key (dim 2)."""
    spec = get_mode(mode)
    docs = _check(modality_ids, document_ids)
    pos = position_ids(modality_ids, mode, document_ids, num_visual_tokens)
    m = modality_ids.long()
    turn = _turns(m)
    return _visible(spec, m[:, :, None], m[:, None, :], pos[:, :, None], pos[:, None, :],
                    docs[:, :, None], docs[:, None, :], turn[:, :, None], turn[:, None, :])


def sdpa_mask(modality_ids: torch.Tensor, mode: str, document_ids: torch.Tensor | None = None,
              num_visual_tokens: int | None = None) -> torch.Tensor:
    """4-D bool mask [B, 1, L, L] for ``attn_implementation="sdpa"``: :func:`dense_mask` plus a self
    edge on PAD queries, so no softmax row is empty (PAD outputs are never used)."""
    mask = dense_mask(modality_ids, mode, document_ids, num_visual_tokens)
    pad_self = torch.diag_embed(modality_ids == PAD)
    return (mask | pad_self)[:, None]


def block_mask(modality_ids: torch.Tensor, mode: str, document_ids: torch.Tensor | None = None,
               num_visual_tokens: int | None = None, block_size: int = 128, compile: bool = False):
    """FlexAttention ``BlockMask`` of the same rule as :func:`dense_mask` (heads broadcast).

    Blocks whose pairs are all invisible are skipped by the kernel, which is where the speed comes
    from on packed or padded batches. ``compile=True`` builds the mask with a compiled kernel (GPU).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    spec = get_mode(mode)
    docs = _check(modality_ids, document_ids)
    pos = position_ids(modality_ids, mode, document_ids, num_visual_tokens)
    m = modality_ids.long()
    turn = _turns(m)

    def mask_mod(b, h, q_idx, kv_idx):
        return _visible(spec, m[b, q_idx], m[b, kv_idx], pos[b, q_idx], pos[b, kv_idx],
                        docs[b, q_idx], docs[b, kv_idx], turn[b, q_idx], turn[b, kv_idx])

    batch, length = modality_ids.shape
    return create_block_mask(mask_mod, batch, None, length, length, device=modality_ids.device,
                             BLOCK_SIZE=block_size, _compile=compile)


__all__ = ["MODES", "AttentionMode", "get_mode", "dense_mask", "sdpa_mask", "block_mask", "position_ids"]
