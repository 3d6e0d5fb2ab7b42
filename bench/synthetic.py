"""Synthetic raw data for the CPU benchmarks: photo-like JPEGs up to 720p and captions, as img2dataset tars.

The images are drawn with PIL (gradients, filled shapes, grain) at the sizes web images come in after
img2dataset (≤ 1280×720, landscape, portrait and square), saved at JPEG quality 90, so decoding and
resizing cost what they cost on real pictures (≈ 100–200 kB per 720p file). Seeded: every run sees the
same bytes.
"""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
from PIL import Image, ImageDraw

# (width, height) of the raw images, cycled: ≤ 720p in both orientations.
RAW_SIZES = ((1280, 720), (960, 720), (720, 720), (720, 960), (1024, 683), (640, 480), (800, 600), (512, 384))
WORDS = ("a photo of the red blue green small large wooden metal old new cat dog car street building tree "
         "person people table window sky water road sign book with on in near under next to two three "
         "standing sitting bright dark colorful white black yellow text shows label front back left right").split()


def raw_image(rng: np.random.Generator, width: int, height: int) -> bytes:
    """One photo-like JPEG of ``width``×``height``."""
    gradient = Image.linear_gradient("L")
    img = Image.merge("RGB", (gradient.resize((width, height)), gradient.rotate(90).resize((width, height)),
                              Image.radial_gradient("L").resize((width, height))))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(2, max(3, width // 3))), int(rng.integers(2, max(3, height // 3)))
        draw.ellipse([x, y, x + w, y + h], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    img = Image.blend(img, Image.effect_noise((width, height), 24).convert("RGB"), 0.15)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    return out.getvalue()


def caption(rng: np.random.Generator) -> str:
    """A caption of 10–60 words."""
    return " ".join(rng.choice(WORDS, size=int(rng.integers(10, 61)))) + "."


def raw_samples(n: int, seed: int = 0) -> list[tuple[bytes, str]]:
    """``n`` (JPEG, caption) pairs."""
    rng = np.random.default_rng(seed)
    return [(raw_image(rng, *RAW_SIZES[i % len(RAW_SIZES)]), caption(rng)) for i in range(n)]


def write_img2dataset_tars(folder: str, samples: list[tuple[bytes, str]], per_tar: int) -> list[str]:
    """Write ``samples`` as img2dataset output (``00000.tar``: ``000000000.jpg/.txt/.json``)."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for t, start in enumerate(range(0, len(samples), per_tar)):
        path = os.path.join(folder, f"{t:05d}.tar")
        with tarfile.open(path, "w") as tar:
            for i, (jpeg, text) in enumerate(samples[start:start + per_tar], start=start):
                key = f"{i:09d}"
                meta = json.dumps({"key": key, "status": "success", "caption": text}).encode()
                for ext, data in (("jpg", jpeg), ("txt", text.encode()), ("json", meta)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths
