"""Model FLOPs of one AKI training step, the numerator of MFU (used by the trainer's logs and by
``bench.train_step``).

MFU = step_flops / (step_seconds × peak FLOP/s), peak = 989e12 (H100/H200 dense bf16). ``step_flops`` counts
the work the model must do, not what a kernel happens to spend (padding and recomputation are not counted):

* LLM body (trainable, forward + backward = 3 × forward): ``6 · N_body · T`` where ``N_body`` = LLM
  parameters without the input embedding and the LM head, ``T`` = tokens in the batch (all rows' real
  tokens for "useful" MFU, the padded ``R × L`` grid for "total");
* LM head: ``6 · d · V · P`` where ``P`` = positions whose next token is a TEXT_TARGET (the model computes
  logits only there);
* LLM attention scores and weighted sum: ``3 · 4 · d · layers · A`` where ``A`` = visible (query, key)
  pairs of the attention mode's mask: exact from ``pipeline.model.attention.dense_mask`` in
  :func:`batch_shape` (benchmarks), or the causal count :func:`causal_pairs` (the trainer, every step,
  without building an L² mask; a slight under-count for ``mma``, whose image tokens also read the prompt);
* connector (trainable): ``6 · N_connector · N`` per image for latents + projection, plus
  ``4 · 2 · dim · inner · depth · M`` for the keys/values of the ``M`` patch features (forward and weight
  gradient; the frozen features need no gradient) and
  ``3 · 4 · inner · depth · N · (M + N)`` for its attention;
* vision tower (frozen, forward only): ``2 · N_vision · M + 4 · hidden · layers · M²`` per image.
"""
from __future__ import annotations

import dataclasses

import torch

from pipeline.model.attention import dense_mask
from pipeline.tokens import PAD


@dataclasses.dataclass(frozen=True)
class ModelCounts:
    """Parameter counts and the dimensions the FLOPs formula needs."""

    llm_body: int          # LLM parameters without input embedding and LM head
    llm_hidden: int
    llm_layers: int
    vocab: int
    connector: int         # resampler + projection parameters (trainable)
    vision: int            # vision tower parameters (frozen)
    vision_hidden: int
    vision_layers: int
    patches: int           # M: patch features per image
    resampler_dim: int
    resampler_inner: int   # heads × dim_head
    resampler_depth: int
    num_latents: int       # N


def _numel(p: torch.Tensor) -> int:
    """Full size of a parameter, also when ZeRO-3 has partitioned it (``ds_numel``)."""
    return int(getattr(p, "ds_numel", p.numel()))


def count_model(model: torch.nn.Module) -> ModelCounts:
    """Counts from an ``AKIModel`` (its ``size`` and ``vision`` / ``resampler`` / ``projection`` / ``llm``)."""
    def n(module: torch.nn.Module) -> int:
        return sum(_numel(p) for p in module.parameters())

    size, llm = model.size, model.llm
    llm_all = n(llm)
    embed = _numel(llm.get_input_embeddings().weight)
    head = _numel(llm.get_output_embeddings().weight)
    res = size.resampler
    return ModelCounts(
        llm_body=llm_all - embed - head, llm_hidden=llm.config.hidden_size,
        llm_layers=llm.config.num_hidden_layers, vocab=llm.config.vocab_size,
        connector=n(model.resampler) + n(model.projection), vision=n(model.vision),
        vision_hidden=size.vision["hidden_size"], vision_layers=size.vision["num_hidden_layers"],
        patches=(size.vision["image_size"] // size.vision["patch_size"]) ** 2, resampler_dim=res["dim"],
        resampler_inner=res["heads"] * res["dim_head"], resampler_depth=res["depth"],
        num_latents=res["num_latents"])


@dataclasses.dataclass(frozen=True)
class BatchShape:
    """What of a batch the FLOPs depend on."""

    tokens: int            # real (non-PAD) tokens
    grid_tokens: int       # rows × width, padding included
    predicted: int         # positions whose next token is a TEXT_TARGET of the same document
    visible_pairs: int     # (query, key) pairs the attention mode allows
    images: int


def batch_shape(modality_ids: torch.Tensor, document_ids: torch.Tensor | None, mode: str,
                num_visual_tokens: int, num_images: int) -> BatchShape:
    """Measure a batch (on CPU, once, outside the timed step)."""
    from pipeline.model.aki import target_positions

    mods = modality_ids.cpu()
    docs = None if document_ids is None else document_ids.cpu()
    visible = sum(int(dense_mask(mods[i:i + 1], mode, None if docs is None else docs[i:i + 1],
                                 num_visual_tokens).sum()) for i in range(len(mods)))
    return BatchShape(tokens=int((mods != PAD).sum()), grid_tokens=mods.numel(),
                      predicted=int(target_positions(mods, docs).sum()), visible_pairs=visible, images=num_images)


def causal_pairs(modality_ids: torch.Tensor, document_ids: torch.Tensor | None) -> int:
    """Visible pairs of a causal mask over the batch's documents: n(n+1)/2 per document of n tokens."""
    if document_ids is None:
        n = (modality_ids != PAD).sum(1).double()
    else:
        rows = torch.arange(document_ids.shape[0])[:, None].expand_as(document_ids)
        keys = (rows * (document_ids.max() + 1) + document_ids)[document_ids > 0]
        n = torch.unique(keys, return_counts=True)[1].double()
    return int((n * (n + 1) / 2).sum())


def step_flops(c: ModelCounts, b: BatchShape, useful: bool = True) -> float:
    """FLOPs of one forward + backward (see the module docstring); ``useful=False`` counts padded tokens."""
    tokens = b.tokens if useful else b.grid_tokens
    llm = 6 * c.llm_body * tokens + 6 * c.llm_hidden * c.vocab * b.predicted
    llm_attention = 3 * 4 * c.llm_hidden * c.llm_layers * b.visible_pairs
    m, n = c.patches, c.num_latents
    connector = (6 * c.connector * n + 4 * 2 * c.resampler_dim * c.resampler_inner * c.resampler_depth * m
                 + 3 * 4 * c.resampler_inner * c.resampler_depth * n * (m + n))
    vision = 2 * c.vision * m + 4 * c.vision_hidden * c.vision_layers * m * m
    return float(llm + llm_attention + b.images * (connector + vision))
