"""The ``lmms_eval.models`` entry point: registers the ``aki`` model with lmms-eval.

lmms-eval imports this module for every run, whatever the model, and only logs a warning when the
import fails; it therefore imports nothing of the model. The model class itself is
:class:`pipeline.eval.lmms.AKI`, loaded by lmms-eval when ``--model aki`` is asked for.
"""
from __future__ import annotations

MODEL_ID = "aki"
MODEL_CLASS = "pipeline.eval.lmms.AKI"


def manifest():
    """lmms-eval's model manifest for ``--model aki`` (a "simple" model: context string + images)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS)
