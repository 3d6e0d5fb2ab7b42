"""Image normalisation: decode with PIL, convert to RGB, resize to the encoder's square input, JPEG.

The resize is bicubic, as SigLIP's processor does it, but a large image is first shrunk cheaply, never
below the target size: a JPEG at least twice the target on both sides is decoded at 1/2, 1/4 or 1/8 scale
(Pillow's ``draft``: the DCT does the shrinking and decoding is faster too), then each side at least twice
the target is box-averaged by an integer factor (Pillow's ``reducing_gap``), and bicubic resamples what is
left. A shrunk image's pixels differ from a full-size bicubic resize by about 0.9 of 255 on average (99.9 %
within 12), about two thirds of what the JPEG q95 re-encoding itself changes in the same photos (about 1.4);
a test bounds both. Images under twice the target on both sides are resized exactly as before.

The output is deterministic (fixed quality, no optimiser passes, no EXIF), so the same input gives
byte-identical shards. No augmentation happens here: flips and crops would corrupt the labels of
grounding, spatial-relation and OCR samples, so data prep never applies them.
"""
from __future__ import annotations

import io
import math
import os

from PIL import Image

from data_prep.records import CORRUPT_IMAGE, MISSING_IMAGE
from pipeline.model.images import strict_decoding

JPEG_QUALITY = 95
# Shrink cheaply (draft decode, box reduce) down to no less than this many times the target size; bicubic does
# the rest. 1.0 is the fastest Pillow allows; the module docstring gives the error (bounded by a test).
RESAMPLE_GAP = 1.0


class ImageError(ValueError):
    """An image that cannot be used; ``reason`` is a :mod:`data_prep.records` skip reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def read_image_file(path: str) -> bytes:
    """The bytes of an image file; a missing file raises :class:`ImageError` (``missing_image``)."""
    if not os.path.isfile(path):
        raise ImageError(MISSING_IMAGE, f"image file {path} does not exist")
    with open(path, "rb") as f:
        return f.read()


def to_encoder_jpeg(data: bytes, image_size: int) -> bytes:
    """Decode ``data``, convert to RGB, resize to ``image_size``² (bicubic) and re-encode as JPEG.

    Undecodable or truncated files raise :class:`ImageError` (``corrupt_image``).
    """
    try:   # a truncated file is corrupt even where a library told Pillow to pad such images silently
        with strict_decoding():
            img = Image.open(io.BytesIO(data))
            img.draft("RGB", (math.ceil(image_size * RESAMPLE_GAP),) * 2)   # JPEG only; both sides stay ≥ this
            img.load()
            rgb = img if img.mode == "RGB" else img.convert("RGB")
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBomb…)
        raise ImageError(CORRUPT_IMAGE, f"cannot decode image: {err}") from None
    if rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC, reducing_gap=RESAMPLE_GAP)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()
