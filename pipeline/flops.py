"""Model FLOPs of one AKI training step, the numerator of MFU (used by the trainer's logs and by
``bench.train_step``).

MFU = step_flops / (step_seconds × peak FLOP/s), peak from ``pipeline.metrics.PEAK_FLOPS`` by exact GPU name
(989e12 dense bf16 on H100 SXM / H200). ``step_flops`` counts
the work the model must do, not what a kernel happens to spend (padding and recomputation are not counted):

* LLM body (trainable, forward + backward = 3 × forward): ``6 · N_body · T`` where ``N_body`` = LLM
  parameters without the input embedding and the LM head, ``T`` = tokens in the batch (all rows' real
  tokens for "useful" MFU, the padded ``R × L`` grid for "total");
* LM head: ``6 · d · V · P`` where ``P`` = positions whose next token is a TEXT_TARGET (the model computes
  logits only there);
* LLM attention scores and weighted sum: ``3 · 4 · d · layers · A`` where ``A`` = visible (query, key)
  pairs of the attention mode's mask, counted exactly by :func:`visible_pairs` without an L² mask (the
  trainer every step, the benchmarks once): the pairs with the key at or before the query, plus the
  non-causal pairs the mode allows (``mma``: image slots reading the prompt text after them);
* connector (trainable): ``6 · N_connector · N`` per image for latents + projection, plus
  ``6 · 2 · dim · inner · depth · M`` for the keys/values of the ``M`` patch features (forward, weight
  gradient and input gradient: the input is ``norm_media`` of the frozen features, and that LayerNorm is
  trained, so the gradient flows through the K/V projection) and
  ``3 · 4 · inner · depth · N · (M + N)`` for its attention;
* vision tower (frozen, forward only): ``2 · N_vision · M + 4 · hidden · layers · M²`` per image.
"""
from __future__ import annotations

import dataclasses

import torch

from pipeline.model.attention import _turns, get_mode, position_ids
from pipeline.tokens import IMAGE, PAD, TEXT_INPUT, TEXT_TARGET


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
    """Measure a batch (on CPU, outside the timed step)."""
    from pipeline.model.aki import target_positions

    mods = modality_ids.cpu()
    docs = None if document_ids is None else document_ids.cpu()
    return BatchShape(tokens=int((mods != PAD).sum()), grid_tokens=mods.numel(),
                      predicted=int(target_positions(mods, docs).sum()),
                      visible_pairs=visible_pairs(mods, docs, mode, num_visual_tokens), images=num_images)


def _count_at_or_before(keys: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor) -> int:
    """Σ over i of #{keys in [starts[i], ends[i]]} (``keys`` sorted), by binary search."""
    return int((torch.searchsorted(keys, ends, right=True) - torch.searchsorted(keys, starts)).sum())


def visible_pairs(modality_ids: torch.Tensor, document_ids: torch.Tensor | None, mode: str,
                  num_visual_tokens: int | None = None) -> int:
    """(query, key) pairs the mode's mask allows — the sum of ``attention.dense_mask`` — in O(L log L).

    Causal pairs: per query, the keys of its document whose position is at or before its own (``cca``
    positions included). Non-causal pairs (key after the query, same document and turn) are allowed by a
    mode's rule from the two modalities alone (true of every mode in ``attention.MODES``); they are
    counted per (query modality, key modality) combination the rule accepts.
    """
    spec = get_mode(mode)
    mods = modality_ids.cpu().long()
    real = mods != PAD
    docs = real.long() if document_ids is None else document_ids.cpu().long()
    pos = position_ids(mods, mode, docs, num_visual_tokens)[real]
    span = int(pos.max()) + 2 if len(pos) else 1
    rows = torch.arange(mods.shape[0])[:, None].expand_as(mods)
    doc = (rows * (int(docs.max()) + 1) + docs)[real]            # one id per (row, document)
    total = _count_at_or_before((doc * span + pos).sort().values, doc * span, doc * span + pos)
    group = doc * (int(_turns(mods).max()) + 1) + _turns(mods)[real]   # one id per (document, turn)
    m = mods[real]
    ahead, behind = torch.tensor(1), torch.tensor(0)
    for mq in (IMAGE, TEXT_INPUT, TEXT_TARGET):
        for mk in (IMAGE, TEXT_INPUT, TEXT_TARGET):
            if not bool(spec.rule(torch.tensor(mq), torch.tensor(mk), behind, ahead)):
                continue
            q, k = m == mq, m == mk
            keys = (group[k] * span + pos[k]).sort().values
            total += _count_at_or_before(keys, group[q] * span + pos[q] + 1, group[q] * span + span - 1)
    return total


def step_flops(c: ModelCounts, b: BatchShape, useful: bool = True) -> float:
    """FLOPs of one forward + backward (see the module docstring); ``useful=False`` counts padded tokens."""
    tokens = b.tokens if useful else b.grid_tokens
    llm = 6 * c.llm_body * tokens + 6 * c.llm_hidden * c.vocab * b.predicted
    llm_attention = 3 * 4 * c.llm_hidden * c.llm_layers * b.visible_pairs
    m, n = c.patches, c.num_latents
    connector = (6 * c.connector * n + 6 * 2 * c.resampler_dim * c.resampler_inner * c.resampler_depth * m
                 + 3 * 4 * c.resampler_inner * c.resampler_depth * n * (m + n))
    vision = 2 * c.vision * m + 4 * c.vision_hidden * c.vision_layers * m * m
    return float(llm + llm_attention + b.images * (connector + vision))
