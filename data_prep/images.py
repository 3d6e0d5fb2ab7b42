"""Image normalisation: decode with PIL, convert to RGB, resize to the encoder's square input, JPEG.

The output is deterministic (fixed quality, no optimiser passes, no EXIF), so the same input gives
byte-identical shards. No augmentation happens here: flips and crops would corrupt the labels of
grounding, spatial-relation and OCR samples, so data prep never applies them.
"""
from __future__ import annotations

import io
import os

from PIL import Image

from data_prep.records import CORRUPT_IMAGE, MISSING_IMAGE

JPEG_QUALITY = 95


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
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            rgb = img.convert("RGB")
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBomb…)
        raise ImageError(CORRUPT_IMAGE, f"cannot decode image: {err}") from None
    if rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()
