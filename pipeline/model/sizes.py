"""Registry of model sizes: one entry per size, nothing sniffed from strings.

Each entry holds the three parts' dimensions (SigLIP vision tower, Perceiver Resampler, Phi-3 LLM).
``aki-4b`` carries the real architecture (SigLIP so400m-patch14-384 + Phi-3.5-mini); the small sizes are
random-init models that train on a CPU. Adding a size is adding one entry to ``MODEL_SIZES``.
"""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """Dimensions of one AKI variant."""

    name: str
    vision: dict[str, Any]      # kwargs of transformers.SiglipVisionConfig
    resampler: dict[str, Any]   # kwargs of pipeline.model.resampler.ResamplerConfig
    llm: dict[str, Any]         # kwargs of transformers.Phi3Config
    # Default local paths or hub ids of pretrained weights (None: random init).
    vision_weights: str | None = None
    llm_weights: str | None = None

    @property
    def image_size(self) -> int:
        """Side of the square image the vision tower reads (pixels)."""
        return int(self.vision["image_size"])

    @property
    def num_visual_tokens(self) -> int:
        """N: the number of image-slot tokens per image in the LLM sequence."""
        return int(self.resampler["num_latents"])


MODEL_SIZES: dict[str, ModelSize] = {}


def register(size: ModelSize) -> ModelSize:
    """Add ``size`` to the registry (names are unique)."""
    if size.name in MODEL_SIZES:
        raise ValueError(f"model size {size.name!r} is registered twice")
    MODEL_SIZES[size.name] = size
    return size


def get_model_size(name: str) -> ModelSize:
    """Look up a size by name, with a clear error listing the known ones."""
    try:
        return MODEL_SIZES[name]
    except KeyError:
        raise ValueError(
            f"unknown model size {name!r}; known sizes: {', '.join(sorted(MODEL_SIZES))}"
        ) from None


register(ModelSize(
    name="aki-4b",
    vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                image_size=384, patch_size=14),
    resampler=dict(dim=1152, depth=6, heads=16, dim_head=96, ff_mult=4, num_latents=144),
    llm=dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5, rope_theta=10000.0,
             max_position_embeddings=4096, bos_token_id=1, eos_token_id=32000, pad_token_id=32000,
             tie_word_embeddings=False),
    vision_weights="google/siglip-so400m-patch14-384",
    llm_weights="microsoft/Phi-3.5-mini-instruct",
))

# Random-init sizes take their special token ids from the tokenizer AKIModel is given (Phi3Config's
# defaults, 32000, lie outside their small vocabularies).
_NO_SPECIAL_IDS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)

# Unit tests: a few thousand parameters per part, fast on one CPU core.
register(ModelSize(
    name="tiny",
    vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                image_size=32, patch_size=8),
    resampler=dict(dim=32, depth=1, heads=2, dim_head=16, ff_mult=2, num_latents=4),
    llm=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0,
             max_position_embeddings=512, tie_word_embeddings=False, **_NO_SPECIAL_IDS),
))

# Quickstart: small enough to pretrain + finetune on a CPU in minutes, large enough to learn the
# synthetic world.
register(ModelSize(
    name="small",
    vision=dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                image_size=64, patch_size=8),
    resampler=dict(dim=96, depth=1, heads=4, dim_head=24, ff_mult=2, num_latents=8),
    llm=dict(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0,
             max_position_embeddings=1024, tie_word_embeddings=False, **_NO_SPECIAL_IDS),
))
