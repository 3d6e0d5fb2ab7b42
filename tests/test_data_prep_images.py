"""Data prep's image step: the shrink-then-bicubic fast path stays close to a full-size bicubic resize."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from bench.synthetic import raw_image
from data_prep.images import JPEG_QUALITY, to_encoder_jpeg

SIDE = 384


def exact_path(data: bytes) -> tuple[np.ndarray, bytes]:
    """Full-size decode and bicubic resize, the pixels before JPEG, and their JPEG (what data prep did before)."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    if img.size != (SIDE, SIDE):
        img = img.resize((SIDE, SIDE), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=JPEG_QUALITY)
    return np.asarray(img, np.int16), out.getvalue()


def pixels(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), np.int16)


def test_fast_resize_is_exact_below_twice_the_target_and_close_above():
    rng = np.random.default_rng(0)
    errors, jpeg_noise = [], []
    # 1280×720 … 800×600: box reduce on one or both sides; 1920×1080, 2400×1600: JPEG draft decode as well.
    for width, height in ((1280, 720), (960, 720), (720, 960), (1024, 683), (800, 600), (1920, 1080), (2400, 1600),
                          (720, 720), (640, 480), (512, 384)):
        data = raw_image(rng, width, height)
        before, before_jpeg = exact_path(data)
        fast = to_encoder_jpeg(data, SIDE)
        assert Image.open(io.BytesIO(fast)).size == (SIDE, SIDE)
        if max(width, height) < 2 * SIDE:
            assert fast == before_jpeg, f"{width}×{height} has nothing to shrink: the output must not change"
            continue
        diff = np.abs(pixels(fast) - pixels(before_jpeg))
        errors.append(diff)
        jpeg_noise.append(np.abs(pixels(before_jpeg) - before).mean())
        assert diff.mean() <= 1.5 and np.percentile(diff, 99.9) <= 12, f"{width}×{height}: {diff.mean():.2f} mean"
    # On average clearly under what the JPEG re-encoding alone changes in the same pictures.
    mean_error = float(np.mean([d.mean() for d in errors]))
    assert mean_error <= 1.0 and mean_error <= 0.75 * float(np.mean(jpeg_noise))


def test_a_truncated_jpeg_is_corrupt_even_when_pillow_was_told_to_pad_it():
    """lmms-eval sets Pillow's LOAD_TRUNCATED_IMAGES on import; data prep must still count a cut file."""
    from data_prep.images import ImageError

    out = io.BytesIO()
    Image.effect_noise((96, 96), 60).convert("RGB").save(out, format="JPEG")
    cut = out.getvalue()[: len(out.getvalue()) // 3]
    before, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, True
    try:
        with pytest.raises(ImageError, match="truncated"):
            to_encoder_jpeg(cut, 32)
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True      # the caller's setting is left as it was
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before
