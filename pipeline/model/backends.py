"""Attention backends: which mask object each transformers ``attn_implementation`` receives.

The attention *rule* lives in :mod:`pipeline.model.attention`; a backend only says how the rule is handed
to the LLM's attention kernel:

* ``sdpa``                 — a 4-D boolean mask ``[B, 1, Q, K]`` (CPU, tests, generation);
* ``flex_attention``       — a FlexAttention ``BlockMask`` run by transformers' compiled kernel (GPU);
* ``flex_attention_eager`` — the same ``BlockMask`` run by the uncompiled ``flex_attention`` (CPU checks
  of the BlockMask path; registered below through transformers' public ``AttentionInterface``);
* ``eager``                — an additive float mask ``[B, 1, Q, K]`` (0 visible, -inf hidden) for transformers'
  eager attention, which computes the attention probabilities explicitly and returns them from every
  attention layer (``pipeline.inspect`` reads them; slow and memory-hungry, not for training).

Each backend turns a batch layout into the prefill mask, and an explicit boolean visibility matrix (the
decode steps of generation) into its own mask type.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from transformers import AttentionInterface

from pipeline.model import attention


@dataclasses.dataclass(frozen=True)
class AttentionBackend:
    """How masks reach one ``attn_implementation``."""

    name: str
    # (modality_ids [B, L], mode, document_ids | None, num_visual_tokens) -> mask for the LLM
    layout_mask: Callable[[torch.Tensor, str, torch.Tensor | None, int], Any]
    # bool [B, 1, Q, K] (True = visible) -> mask for the LLM
    from_dense: Callable[[torch.Tensor], Any]


def _block_mask(modality_ids: torch.Tensor, mode: str, document_ids: torch.Tensor | None,
                num_visual_tokens: int) -> BlockMask:
    return attention.block_mask(modality_ids, mode, document_ids, num_visual_tokens,
                                compile=modality_ids.is_cuda)


def dense_to_block_mask(visible: torch.Tensor) -> BlockMask:
    """A ``BlockMask`` from an explicit bool matrix ``[B, 1, Q, K]``."""
    batch, _, q_len, kv_len = visible.shape

    def mask_mod(b, h, q_idx, kv_idx):
        return visible[b, 0, q_idx, kv_idx]

    return create_block_mask(mask_mod, batch, None, q_len, kv_len, device=visible.device,
                             _compile=visible.is_cuda)


def flex_attention_eager(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                         value: torch.Tensor, attention_mask: BlockMask, scaling: float | None = None,
                         dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: uncompiled ``flex_attention`` with a ``BlockMask``."""
    if not isinstance(attention_mask, BlockMask):
        raise ValueError("attn_implementation 'flex_attention_eager' needs a FlexAttention BlockMask as "
                         f"attention_mask, got {type(attention_mask).__name__}")
    if dropout > 0:
        raise ValueError("flex attention has no attention dropout; set the LLM's attention_dropout to 0")
    with warnings.catch_warnings():   # running uncompiled is this backend's purpose
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        out = flex_attention(query, key, value, block_mask=attention_mask, scale=scaling,
                             enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("flex_attention_eager", flex_attention_eager)


def additive_mask(visible: torch.Tensor) -> torch.Tensor:
    """The float mask eager attention adds to its scores: 0 where ``visible``, -inf elsewhere.

    -inf is safe: no row is empty (:func:`pipeline.model.attention.sdpa_mask` gives PAD queries a self edge).
    """
    return torch.zeros(visible.shape, device=visible.device).masked_fill(~visible, float("-inf"))


def _additive_layout_mask(modality_ids: torch.Tensor, mode: str, document_ids: torch.Tensor | None,
                          num_visual_tokens: int) -> torch.Tensor:
    return additive_mask(attention.sdpa_mask(modality_ids, mode, document_ids, num_visual_tokens))


BACKENDS: dict[str, AttentionBackend] = {b.name: b for b in (
    AttentionBackend("sdpa", attention.sdpa_mask, lambda visible: visible),
    AttentionBackend("flex_attention", _block_mask, dense_to_block_mask),
    AttentionBackend("flex_attention_eager", attention.block_mask, dense_to_block_mask),
    AttentionBackend("eager", _additive_layout_mask, additive_mask),
)}


def get_backend(name: str) -> AttentionBackend:
    """Look up an ``attn_implementation``, with an error listing the supported ones."""
    try:
        return BACKENDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unsupported attn_implementation {name!r}; choose one of: "
                         f"{', '.join(BACKENDS)}") from None


__all__ = ["AttentionBackend", "BACKENDS", "additive_mask", "get_backend", "dense_to_block_mask",
           "flex_attention_eager"]
