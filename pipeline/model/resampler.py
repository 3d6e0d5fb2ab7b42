"""Perceiver Resampler: the vision-language connector (Flamingo; as in OpenFlamingo and xgen-mm).

A fixed set of learned latents reads the vision tower's patch features through cross-attention. Each
layer lets the latents attend to ``[media; latents]`` (the latents see each other as well as the image),
then applies a feed-forward block; both are pre-norm residual blocks. The output has ``num_latents``
vectors per image whatever the number of patches (729 → 144 for AKI); ``AKIModel`` projects them to the
LLM width.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class ResamplerConfig:
    """Dimensions of the Perceiver Resampler (``ModelSize.resampler`` holds these as a dict)."""

    dim: int            # width of the latents; equals the vision tower's hidden size
    depth: int          # number of (cross-attention, feed-forward) layers
    heads: int          # attention heads
    dim_head: int       # width of one head
    ff_mult: int        # feed-forward hidden width = dim * ff_mult
    num_latents: int    # output tokens per image (N, the number of visual tokens in the LLM sequence)


class PerceiverAttention(nn.Module):
    """Latents attend to ``[media; latents]`` (pre-norm, no biases)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        media, latents = self.norm_media(media), self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Sequential):
    """Pre-norm GELU MLP without biases."""

    def __init__(self, dim: int, mult: int):
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class ResamplerLayer(nn.Module):
    def __init__(self, config: ResamplerConfig):
        super().__init__()
        self.attn = PerceiverAttention(config.dim, config.heads, config.dim_head)
        self.ff = FeedForward(config.dim, config.ff_mult)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        latents = latents + self.attn(media, latents)
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    """``[n_images, n_patches, dim]`` vision features → ``[n_images, num_latents, dim]``."""

    def __init__(self, config: ResamplerConfig):
        super().__init__()
        self.config = config
        self.latents = nn.Parameter(torch.randn(config.num_latents, config.dim))
        self.layers = nn.ModuleList(ResamplerLayer(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim)

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        if media.dim() != 3 or media.shape[-1] != self.config.dim:
            raise ValueError(f"resampler input must be [n_images, n_patches, {self.config.dim}], "
                             f"got shape {tuple(media.shape)}")
        latents = self.latents.to(media.dtype).expand(media.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(media, latents)
        return self.norm(latents)


__all__ = ["ResamplerConfig", "PerceiverResampler"]
