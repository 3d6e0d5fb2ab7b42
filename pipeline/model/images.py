"""Image preprocessing for the SigLIP vision tower: JPEG bytes, files or PIL images → ``pixel_values``.

It is transformers' ``SiglipImageProcessor`` (bicubic resize to the size's square input, rescale to
[0, 1], normalise with mean = std = 0.5), configured from the model size, so training data, evaluation
and generation all see identical pixels. Images already at the input size — every training image, since
data prep stores them resized — skip the resize, which is then the identity, and are normalised in one
torch operation on the decoded uint8 array: the same pixels, several times faster per sample.
"""
from __future__ import annotations

import contextlib
import io
import os
from typing import Iterator, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from pipeline.compat import SiglipImageProcessor

ImageLike = Union[Image.Image, bytes, str, os.PathLike]


@contextlib.contextmanager
def strict_decoding() -> Iterator[None]:
    """Decode with truncated files refused, whatever a library imported in this process (lmms-eval does)
    set Pillow's global ``ImageFile.LOAD_TRUNCATED_IMAGES`` to; the global is restored afterwards."""
    lenient, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient


def load_image(image: ImageLike) -> Image.Image:
    """Open JPEG/PNG bytes or a file path as an RGB PIL image (PIL images pass through, converted).

    Raises ``ValueError`` naming the input when it is not a readable image (a truncated file included).
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    where = f"{len(image)} bytes" if isinstance(image, (bytes, bytearray)) else f"file {os.fspath(image)!r}"
    try:
        source = io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else os.fspath(image)
        with strict_decoding(), Image.open(source) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read an image from {where}: {err}; give JPEG/PNG data") from err


class ImageProcessor:
    """Turn images into float ``pixel_values`` ``[n, 3, image_size, image_size]`` for the vision tower."""

    def __init__(self, image_size: int):
        self.image_size = int(image_size)
        self.processor = SiglipImageProcessor(size={"height": self.image_size, "width": self.image_size},
                                              do_convert_rgb=True)

    def __call__(self, images: Sequence[ImageLike]) -> torch.Tensor:
        if isinstance(images, (Image.Image, bytes, bytearray, str, os.PathLike)):
            images = [images]
        if not images:
            return torch.zeros(0, 3, self.image_size, self.image_size)
        pil = [load_image(img) for img in images]
        side = (self.image_size, self.image_size)
        if all(img.size == side for img in pil):
            pixels = torch.from_numpy(np.stack([np.asarray(img) for img in pil])).permute(0, 3, 1, 2)
            return pixels.float().mul_(2.0 / 255.0).sub_(1.0)      # rescale 1/255, then (x - 0.5) / 0.5
        return self.processor(pil, return_tensors="pt")["pixel_values"].float()


__all__ = ["ImageProcessor", "load_image", "ImageLike"]
