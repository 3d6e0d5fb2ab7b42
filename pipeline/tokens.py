"""The token contract: per-token modality ids shared by data prep, model, training and evaluation.

Every stored sample carries one modality id per token (see DESIGN.md, "The token contract"):

* ``TEXT_INPUT`` — text the model is given (system message, user turn, role tags);
* ``IMAGE``      — one of the N visual-token slots of an image;
* ``TEXT_TARGET``— text the model must produce; the loss is computed on these tokens only;
* ``PAD``        — never stored; the collator uses it for padding.

This module is the only place these numbers are written down.
"""
from __future__ import annotations

PAD = 0
TEXT_INPUT = 1
IMAGE = 2
TEXT_TARGET = 3

MODALITY_NAMES = {PAD: "PAD", TEXT_INPUT: "TEXT_INPUT", IMAGE: "IMAGE", TEXT_TARGET: "TEXT_TARGET"}

__all__ = ["PAD", "TEXT_INPUT", "IMAGE", "TEXT_TARGET", "MODALITY_NAMES"]
