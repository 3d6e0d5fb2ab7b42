"""The few transformers names that differ between the two supported major versions, resolved once.

Training is pinned to transformers 4.57 (mosaicml-streaming requires <5); inference, generation and the
benchmarks also run on the transformers 5.x that GPU machines ship (``requirements-tf5.txt``, tested by
``make test``). Everything version-dependent lives here, so the rest of the code imports one name:

* ``no_init_weights``: moved from ``transformers.modeling_utils`` to ``transformers.initialization``;
* ``SiglipImageProcessor``: the PIL/numpy SigLIP processor (5.x calls it ``SiglipImageProcessorPil``;
  its ``SiglipImageProcessor`` needs torchvision, which the inference environment need not have);
* ``vision_tower``: transformers 5 flattened ``SiglipVisionModel`` (its weights no longer sit under
  ``vision_model.``); the tower is wrapped there so AKI's weight names, hence export folders, stay the same
  on both versions (an export trained on 4.57 loads on 5.x);
* ``CACHE_KWARG``: the decoder's KV-cache keyword, ``past_key_values`` until transformers 5.24 renamed it
  ``cache`` (the old name warns there, and goes in 5.40).
"""
from __future__ import annotations

import inspect

from torch import nn
from transformers import Phi3Model

try:  # transformers >= 5
    from transformers.initialization import no_init_weights
except ImportError:  # transformers 4.x
    from transformers.modeling_utils import no_init_weights

try:  # transformers >= 5
    from transformers import SiglipImageProcessorPil as SiglipImageProcessor
except ImportError:  # transformers 4.x: the default processor is the PIL/numpy one
    from transformers import SiglipImageProcessor


class _VisionModelPrefix(nn.Module):
    """A flattened ``SiglipVisionModel`` under the attribute ``vision_model``, as transformers 4 nests it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.vision_model = model

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)             # the wrapped model itself
        except AttributeError:
            return getattr(self.vision_model, name)      # config, dtype, save_pretrained, …

    def forward(self, **kwargs):
        return self.vision_model(**kwargs)


def vision_tower(model: nn.Module) -> nn.Module:
    """``model`` (a ``SiglipVisionModel``) with its weights named ``vision_model.*`` on every version."""
    return model if hasattr(model, "vision_model") else _VisionModelPrefix(model)


CACHE_KWARG = "cache" if "cache" in inspect.signature(Phi3Model.forward).parameters else "past_key_values"

__all__ = ["CACHE_KWARG", "vision_tower", "no_init_weights", "SiglipImageProcessor"]
