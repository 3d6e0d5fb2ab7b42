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
    # B: ids below B read the LLM's own embedding/output rows, B and B + 1 (<image>, <|endofchunk|>) the
    # model's added rows (pipeline.model.vocab). None: taken from the tokenizer the model is built with.
    num_base_ids: int | None = None

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


# Phi-3.5-mini-instruct's "longrope" position scaling (its config.json): 4096 trained positions
# stretched to 131072, one factor per rotary frequency (head dim 96 → 48 factors).
PHI35_ROPE_SCALING = {
    "type": "longrope",
    "short_factor": [
        1.0, 1.0199999809265137, 1.0299999713897705, 1.0299999713897705, 1.0499999523162842,
        1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0699999332427979,
        1.0999999046325684, 1.1099998950958252, 1.1599998474121094, 1.1599998474121094, 1.1699998378753662,
        1.2899998426437378, 1.339999794960022, 1.679999828338623, 1.7899998426437378, 1.8199998140335083,
        1.8499997854232788, 1.8799997568130493, 1.9099997282028198, 1.9399996995925903, 1.9899996519088745,
        2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346,
        2.0199997425079346, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914,
        2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914,
        2.0799996852874756, 2.0899996757507324, 2.189999580383301, 2.2199995517730713, 2.5899994373321533,
        2.729999542236328, 2.749999523162842, 2.8399994373321533],
    "long_factor": [
        1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601, 1.5899999141693115,
        1.600000023841858, 1.6200000047683716, 2.620000123977661, 3.2300000190734863, 3.2300000190734863,
        4.789999961853027, 7.400000095367432, 7.700000286102295, 9.09000015258789, 12.199999809265137,
        17.670000076293945, 24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523,
        32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992, 50.340003967285156,
        50.45000457763672, 57.55000305175781, 57.93000411987305, 58.21000289916992, 60.1400032043457,
        62.61000442504883, 62.62000274658203, 62.71000289916992, 63.1400032043457, 63.1400032043457,
        63.77000427246094, 63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688,
        64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938, 64.4800033569336,
        64.51000213623047, 64.52999877929688, 64.83999633789062],
}

# The released AKI-4B (reference/OFFICIAL_AKI.md): SigLIP so400m/14-384, an 8 × 64 Perceiver Resampler,
# Phi-3.5-mini-instruct with its own config (no download needed to build it), ids 32012/32013 added.
register(ModelSize(
    name="aki-4b",
    vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                image_size=384, patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh"),
    resampler=dict(dim=1152, depth=6, heads=8, dim_head=64, ff_mult=4, num_latents=144),
    llm=dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=32, hidden_act="silu", rms_norm_eps=1e-5,
             rope_theta=10000.0, rope_scaling=PHI35_ROPE_SCALING, max_position_embeddings=131072,
             original_max_position_embeddings=4096, sliding_window=262144, initializer_range=0.02,
             attention_dropout=0.0, embd_pdrop=0.0, resid_pdrop=0.0, bos_token_id=1, eos_token_id=32000,
             pad_token_id=32000, tie_word_embeddings=False),
    vision_weights="google/siglip-so400m-patch14-384",
    llm_weights="microsoft/Phi-3.5-mini-instruct",
    num_base_ids=32012,
))

# Random-init sizes take their special token ids from the tokenizer AKIModel is given (Phi3Config's
# defaults, 32000, lie outside their small vocabularies).
_NO_SPECIAL_IDS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)

# Unit tests: a few thousand parameters per part, fast on one CPU core.
register(ModelSize(
    name="tiny",
    vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                image_size=32, patch_size=8),
    resampler=dict(dim=32, depth=1, heads=2, dim_head=64, ff_mult=2, num_latents=4),   # heads of 64 as released
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
