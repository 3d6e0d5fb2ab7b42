"""AKIModel: SigLIP vision tower (frozen) → Perceiver Resampler → projection → Phi-3 LLM.

One batch is laid out by the token contract (``pipeline.tokens``): ``input_ids`` and ``modality_ids``
``[B, L]``, and ``pixel_values`` holding the batch's images in the order their IMAGE slot runs appear
(row-major). Each image becomes N visual tokens that replace the embeddings at its N IMAGE slots.
The LLM runs with the attention mode's mask and position ids (``pipeline.model.attention``), handed to
transformers' Phi-3 in the form its ``attn_implementation`` expects (``pipeline.model.backends``).
The loss is the mean cross-entropy over TEXT_TARGET tokens, each predicted from the previous token of
its own document; logits are computed only at those positions unless ``return_logits`` asks for all.

Sizes come from the registry in ``pipeline.model.sizes``; real SigLIP / Phi-3.5 weights load through
``from_pretrained`` when their paths (or hub ids) are given. Export and reload: ``save_pretrained`` /
``from_pretrained`` (see ``pipeline.model.loading``).
"""
from __future__ import annotations

import dataclasses
import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerBase, SiglipVisionConfig,
                          SiglipVisionModel)

from pipeline.chat import DEFAULT_LAYOUT, get_layout
from pipeline.compat import vision_tower
from pipeline.model import attention
from pipeline.model.backends import get_backend
from pipeline.model.images import ImageProcessor, load_image
from pipeline.model.resampler import PerceiverResampler, ResamplerConfig
from pipeline.model.sizes import ModelSize, get_model_size
from pipeline.model.tokenizer import added_token_layout, image_token_id, prepare_tokenizer
from pipeline.model.vocab import NUM_ADDED, AddedEmbedding, AddedOutput
from pipeline.tokens import IMAGE, MODALITY_NAMES, PAD, TEXT_TARGET

# A random-init LLM's table grows in multiples of this when a tokenizer has more base ids than the size.
VOCAB_MULTIPLE = 64


@dataclasses.dataclass
class AKIOutput:
    """``loss`` = ``loss_sum / num_target_tokens`` (0 when there is no target token)."""

    loss: torch.Tensor
    loss_sum: torch.Tensor            # summed cross-entropy over the predicted TEXT_TARGET tokens
    num_target_tokens: torch.Tensor   # how many tokens ``loss_sum`` sums over (long scalar)
    logits: torch.Tensor | None       # [B, L, vocab] when ``return_logits``; logits[t] predicts token t+1


def _build_vision(size: ModelSize, weights: str | None, dtype: torch.dtype | None) -> SiglipVisionModel:
    if weights is None:
        return SiglipVisionModel(SiglipVisionConfig(**{**size.vision, "vision_use_head": False}))
    model = SiglipVisionModel.from_pretrained(weights, vision_use_head=False, dtype=dtype)
    for key in ("hidden_size", "image_size", "patch_size"):
        if getattr(model.config, key) != size.vision[key]:
            raise ValueError(f"vision weights {weights!r} have {key}={getattr(model.config, key)}, "
                             f"but size {size.name!r} expects {size.vision[key]}; pick the matching size")
    return model


def _build_llm(size: ModelSize, weights: str | None, attn_implementation: str,
               dtype: torch.dtype | None, num_base_ids: int) -> Phi3ForCausalLM:
    """The Phi-3 LLM; a random-init one gets a table of at least ``num_base_ids`` rows (built at that size,
    so nothing is resized later, which partitioned ZeRO-3 parameters could not survive)."""
    if weights is None:
        rows = max(size.llm["vocab_size"], -(-num_base_ids // VOCAB_MULTIPLE) * VOCAB_MULTIPLE)
        return Phi3ForCausalLM(Phi3Config(**{**size.llm, "vocab_size": rows,
                                             "attn_implementation": attn_implementation}))
    model = Phi3ForCausalLM.from_pretrained(weights, attn_implementation=attn_implementation, dtype=dtype)
    if model.config.hidden_size != size.llm["hidden_size"]:
        raise ValueError(f"LLM weights {weights!r} have hidden_size={model.config.hidden_size}, but size "
                         f"{size.name!r} expects {size.llm['hidden_size']}; pick the matching size")
    if model.config.vocab_size < num_base_ids:
        raise ValueError(f"LLM weights {weights!r} have {model.config.vocab_size} embedding rows but the tokenizer "
                         f"has {num_base_ids} base ids; use the tokenizer that came with these weights")
    return model


def _image_runs(modality_ids: torch.Tensor, document_ids: torch.Tensor | None, n: int) -> int:
    """Check every IMAGE run holds whole images of ``n`` slots; return the number of images."""
    is_img = modality_ids == IMAGE
    start = is_img.clone()
    start[:, 1:] &= ~is_img[:, :-1]
    if document_ids is not None:
        start[:, 1:] |= is_img[:, 1:] & (document_ids[:, 1:] != document_ids[:, :-1])
    flat_start, flat_img = start.flatten(), is_img.flatten()
    if not flat_img.any():
        return 0
    run_of_token = flat_start.long().cumsum(0) - 1
    lengths = torch.bincount(run_of_token[flat_img])
    bad = (lengths % n != 0).nonzero()
    if len(bad):
        first = int(bad[0])
        where = int(flat_start.nonzero()[first])
        row, col = divmod(where, modality_ids.shape[1])
        raise ValueError(f"IMAGE run of {int(lengths[first])} slots at row {row}, position {col}: every image "
                         f"needs exactly num_visual_tokens={n} slots (encode samples with this model's N)")
    return int(lengths.sum()) // n


class AKIModel(nn.Module):
    """The AKI multimodal LLM. See the module docstring for the batch layout.

    ``vision_weights`` / ``llm_weights``: local folders or hub ids of pretrained SigLIP / Phi-3 weights
    (``size.vision_weights`` / ``size.llm_weights`` name the real ones); None builds random-init parts.
    ``tokenizer``: when given, AKI's special tokens are added and its ids set the vocabulary: ids below
    its ``<image>`` id B come from the LLM's table, B and B + 1 from the added rows
    (:mod:`pipeline.model.vocab`). ``num_base_ids`` sets B without a tokenizer (default: the size's, else
    the LLM table's rows - 2). ``text_layout``: the ``pipeline.chat`` layout the model is trained on and
    prompted with (recorded in exports). ``dtype``: the weights' dtype (pretrained parts are read in it directly);
    None keeps float32.
    """

    def __init__(self, size: ModelSize | str, tokenizer: PreTrainedTokenizerBase | None = None,
                 attention_mode: str = "mma", attn_implementation: str = "sdpa",
                 vision_weights: str | os.PathLike | None = None,
                 llm_weights: str | os.PathLike | None = None, dtype: torch.dtype | None = None,
                 num_base_ids: int | None = None, text_layout: str = DEFAULT_LAYOUT):
        super().__init__()
        self.text_layout = get_layout(text_layout).name
        self.size = get_model_size(size) if isinstance(size, str) else size
        if tokenizer is not None:
            tokenizer = prepare_tokenizer(tokenizer)
            from_tokenizer = added_token_layout(tokenizer)
            if num_base_ids is not None and num_base_ids != from_tokenizer:
                raise ValueError(f"num_base_ids={num_base_ids} but the tokenizer's <image> id is {from_tokenizer}")
            num_base_ids = from_tokenizer
        if num_base_ids is None:
            num_base_ids = self.size.num_base_ids or self.size.llm["vocab_size"] - NUM_ADDED
        attention.get_mode(attention_mode)
        self.backend = get_backend(attn_implementation)
        self.attention_mode = attention_mode
        resampler_config = ResamplerConfig(**self.size.resampler)
        if resampler_config.dim != self.size.vision["hidden_size"]:
            raise ValueError(f"size {self.size.name!r}: resampler dim {resampler_config.dim} must equal the "
                             f"vision hidden_size {self.size.vision['hidden_size']}")
        side = math.isqrt(resampler_config.num_latents)
        if attention.MODES[attention_mode].concentric_positions and side * side != resampler_config.num_latents:
            raise ValueError(f"attention mode {attention_mode!r} needs a square number of visual tokens, but "
                             f"size {self.size.name!r} has {resampler_config.num_latents}")
        self.vision = vision_tower(_build_vision(self.size, None if vision_weights is None
                                                 else os.fspath(vision_weights), dtype))
        self.vision.requires_grad_(False)
        self.vision.eval()
        self.resampler = PerceiverResampler(resampler_config)
        self.llm = _build_llm(self.size, None if llm_weights is None else os.fspath(llm_weights),
                              attn_implementation, dtype, num_base_ids)
        hidden = self.llm.config.hidden_size
        self.added_embedding = AddedEmbedding(hidden, num_base_ids)
        self.output = AddedOutput(hidden, self.llm.config.vocab_size, num_base_ids)
        self.projection = nn.Linear(resampler_config.dim, hidden)
        self.image_processor = ImageProcessor(self.size.image_size)
        self.tokenizer: PreTrainedTokenizerBase | None = None
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)
        if dtype is not None:
            self.to(dtype)

    # ---- properties -------------------------------------------------------------------------------
    @property
    def num_visual_tokens(self) -> int:
        return self.size.num_visual_tokens

    @property
    def image_size(self) -> int:
        return self.size.image_size

    @property
    def attn_implementation(self) -> str:
        return self.backend.name

    @property
    def num_base_ids(self) -> int:
        """B: ids below it read the LLM's table; B and B + 1 are ``<image>`` and ``<|endofchunk|>``."""
        return self.added_embedding.num_base_ids

    @property
    def vocab_size(self) -> int:
        """The number of logits (and of valid token ids): B + 2 (32014 for AKI-4B)."""
        return self.num_base_ids + NUM_ADDED

    def set_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Attach ``tokenizer`` (AKI tokens added); its ids must match the model's vocabulary."""
        tokenizer = prepare_tokenizer(tokenizer)
        if added_token_layout(tokenizer) != self.num_base_ids:
            raise ValueError(f"tokenizer has its <image> token at id {image_token_id(tokenizer)} but this model reads "
                             f"ids {self.num_base_ids}/{self.num_base_ids + 1} as <image>/<|endofchunk|>; use the "
                             "tokenizer the model was built or exported with")
        self.tokenizer = tokenizer
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(self.llm.config, key, getattr(tokenizer, key))

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of token ids (LLM table below B, the added rows for B and B + 1)."""
        return self.added_embedding(input_ids, self.llm.get_input_embeddings())

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., B + 2]`` of LLM hidden states (output bias and added rows included)."""
        return self.output(hidden, self.llm.lm_head)

    def train(self, mode: bool = True) -> "AKIModel":
        """Train mode for the resampler, projection and LLM; the frozen vision tower stays in eval."""
        super().train(mode)
        self.vision.eval()
        return self

    def gradient_checkpointing_enable(self) -> None:
        """Recompute the LLM's layer activations in backward (non-reentrant checkpointing)."""
        self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # ---- inputs -------------------------------------------------------------------------------------
    def check_inputs(self, input_ids: torch.Tensor, modality_ids: torch.Tensor,
                     pixel_values: torch.Tensor | None, document_ids: torch.Tensor | None = None) -> int:
        """Validate a batch against the token contract; return its number of images."""
        if input_ids.dim() != 2 or input_ids.shape != modality_ids.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and modality_ids {tuple(modality_ids.shape)} "
                             "must both be [batch, length] of the same shape (one modality id per token)")
        if document_ids is not None and document_ids.shape != input_ids.shape:
            raise ValueError(f"document_ids {tuple(document_ids.shape)} must have the shape of input_ids "
                             f"{tuple(input_ids.shape)}")
        known = torch.tensor(sorted(MODALITY_NAMES), device=modality_ids.device)
        if not torch.isin(modality_ids, known).all():
            raise ValueError(f"modality_ids hold values outside {MODALITY_NAMES} (pipeline.tokens)")
        n_images = _image_runs(modality_ids, document_ids, self.num_visual_tokens)
        got = 0 if pixel_values is None else pixel_values.shape[0]
        if got != n_images:
            raise ValueError(f"pixel_values has {got} images but the batch has {n_images} image slot runs of "
                             f"{self.num_visual_tokens} IMAGE tokens; give one image per run, in order")
        side = self.image_size
        if n_images and (pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, side, side)):
            raise ValueError(f"pixel_values must be [n_images, 3, {side}, {side}] for size {self.size.name!r}, "
                             f"got {tuple(pixel_values.shape)}; preprocess with model.image_processor")
        return n_images

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[n, 3, H, W]`` → visual tokens ``[n, N, llm_hidden]`` (the vision tower runs without grad)."""
        with torch.no_grad():
            media = self.vision(pixel_values=pixel_values.to(self.vision.dtype)).last_hidden_state
        return self.projection(self.resampler(media.to(self.resampler.latents.dtype)))

    def embed(self, input_ids: torch.Tensor, modality_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              document_ids: torch.Tensor | None = None, validate: bool = True) -> torch.Tensor:
        """LLM input embeddings with each image's visual tokens at its IMAGE slots.

        ``validate=False`` skips :meth:`check_inputs` (its checks read values back from the device): for
        callers that validated the batch already, e.g. the trainer on the CPU before the transfer.
        """
        if validate:
            n_images = self.check_inputs(input_ids, modality_ids, pixel_values, document_ids)
        else:
            n_images = 0 if pixel_values is None else pixel_values.shape[0]
        embeds = self.embed_tokens(input_ids)
        if n_images == 0:
            # Text-only batch: run the connector on a blank image anyway, so every rank uses the same
            # parameters each step (ZeRO-3 gathers parameters collectively and would hang otherwise).
            blank = torch.zeros(1, 3, self.image_size, self.image_size, device=embeds.device)
            return embeds + 0.0 * self.encode_images(blank).sum().to(embeds.dtype)
        visual = self.encode_images(pixel_values).to(embeds.dtype)
        return embeds.masked_scatter((modality_ids == IMAGE)[..., None], visual)

    # ---- forward ------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, modality_ids: torch.Tensor,
                pixel_values: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
                return_logits: bool = True, validate: bool = True) -> AKIOutput:
        input_ids, modality_ids = input_ids.long(), modality_ids.long()
        embeds = self.embed(input_ids, modality_ids, pixel_values, document_ids, validate)
        n = self.num_visual_tokens
        hidden = self.llm.model(
            inputs_embeds=embeds,
            attention_mask=self.backend.layout_mask(modality_ids, self.attention_mode, document_ids, n),
            position_ids=attention.position_ids(modality_ids, self.attention_mode, document_ids, n),
            use_cache=False,
        ).last_hidden_state
        predicted = target_positions(modality_ids, document_ids)
        # logits only where a target is predicted: hidden[t - 1] predicts input_ids[t]
        target_logits = self.logits(hidden[:, :-1][predicted[:, 1:]]).float()
        loss_sum = F.cross_entropy(target_logits, input_ids[predicted], reduction="sum")
        count = predicted.sum()
        return AKIOutput(loss=loss_sum / count.clamp(min=1), loss_sum=loss_sum, num_target_tokens=count,
                         logits=self.logits(hidden) if return_logits else None)

    # ---- export -------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write an export folder (safetensors weights, ``aki_config.json``, tokenizer).

        ``state_dict`` replaces the module's own weights, e.g. weights consolidated from ZeRO-3 shards.
        """
        from pipeline.model.loading import save_model
        save_model(self, folder, state_dict)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, attn_implementation: str | None = None,
                        attention_mode: str | None = None, dtype: torch.dtype | None = None) -> "AKIModel":
        """Rebuild a model from an export folder (strict: every weight must match)."""
        from pipeline.model.loading import load_model
        return load_model(folder, attn_implementation=attn_implementation, attention_mode=attention_mode,
                          dtype=dtype)


def target_positions(modality_ids: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Bool ``[B, L]``: TEXT_TARGET tokens predicted by the previous token of the same document."""
    predicted = torch.zeros_like(modality_ids, dtype=torch.bool)
    same_doc = modality_ids[:, :-1] != PAD
    if document_ids is not None:
        same_doc &= document_ids[:, 1:] == document_ids[:, :-1]
    predicted[:, 1:] = (modality_ids[:, 1:] == TEXT_TARGET) & same_doc
    return predicted


__all__ = ["AKIModel", "AKIOutput", "ImageProcessor", "load_image", "target_positions"]
