"""The AKI model: sizes registry, tokenizer set-up, attention modes, and the model itself.

``from pipeline.model import AKIModel`` works, but the heavy parts are imported lazily so that light
users (data preparation needs only ``pipeline.model.tokenizer``) do not pay for them.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "AKIModel": "pipeline.model.aki",
    "AKIOutput": "pipeline.model.aki",
    "ImageProcessor": "pipeline.model.images",
    "load_image": "pipeline.model.images",
    "ModelSize": "pipeline.model.sizes",
    "MODEL_SIZES": "pipeline.model.sizes",
    "get_model_size": "pipeline.model.sizes",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipeline.model' has no attribute {name!r}")


__all__ = sorted(_LAZY)
