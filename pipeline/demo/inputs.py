"""What the demo page accepts: limits on the images and the question, and the check of one request.

:func:`check_question` turns the page's inputs (uploaded image files and the typed question) into a
:class:`Question`, and :func:`check_sampling` the sampling settings into :class:`Sampling`; both raise
:class:`InputError` with a message for the page that names the input, the problem and the fix. Every image
is decoded here once, by the same reader generation uses (:func:`pipeline.model.images.load_image`), so a
corrupt file is refused before any model sees it.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from PIL import Image

from pipeline.model.images import load_image


class InputError(ValueError):
    """An upload or question the page refuses; the message is shown on the page as it is."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """The most the page accepts per question (``python -m pipeline.demo --help`` sets each)."""

    max_images: int = 4                 # images per question
    max_image_mb: float = 10.0          # size of one image file, in MiB
    max_image_pixels: int = 4096 * 4096  # width × height of one image
    max_question_chars: int = 1000      # characters of the question
    max_new_tokens: int = 512           # the largest answer length the page offers


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How an answer is decoded: greedy at temperature 0 (the default, as ``pipeline.generate``)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Question:
    """A checked question: its text and its image files, in upload order."""

    text: str
    images: tuple[str, ...]


def _check_image(path: str, limits: Limits) -> None:
    name = os.path.basename(path)
    size_mb = os.path.getsize(path) / 2**20
    if size_mb > limits.max_image_mb:
        raise InputError(f"image {name!r} is {size_mb:.1f} MiB; this page takes images up to "
                         f"{limits.max_image_mb:g} MiB (restart it with --max-image-mb to raise the limit)")
    try:
        with Image.open(path) as img:   # reads the header only: the size before any decoding
            width, height = img.size
    except Image.DecompressionBombError:
        width = height = None
    except (OSError, SyntaxError, ValueError) as err:
        raise InputError(f"image {name!r} cannot be read ({err}); upload a JPEG or PNG file") from None
    if width is None or width * height > limits.max_image_pixels:
        shape = "far too many pixels" if width is None else f"{width}×{height} = {width * height / 1e6:.1f} M pixels"
        raise InputError(f"image {name!r} has {shape}; this page takes at most {limits.max_image_pixels / 1e6:.1f} M "
                         "pixels (scale it down, or restart the page with --max-image-pixels)")
    try:
        load_image(path)
    except ValueError as err:
        raise InputError(f"image {name!r} cannot be read: it is damaged or not an image ({err.__cause__ or err}); "
                         "upload a JPEG or PNG file") from None


def check_question(text: str | None, image_paths: Sequence[str] | None, limits: Limits) -> Question:
    """The page's inputs as a :class:`Question`; :class:`InputError` when they break a limit or an image
    cannot be read."""
    text = (text or "").strip()
    images = tuple(os.fspath(p) for p in image_paths or ())
    if not text:
        raise InputError("type a question first")
    if len(text) > limits.max_question_chars:
        raise InputError(f"the question is {len(text)} characters long; this page takes at most "
                         f"{limits.max_question_chars} (shorten it, or restart the page with --max-question-chars)")
    if len(images) > limits.max_images:
        raise InputError(f"{len(images)} images uploaded; this page takes at most {limits.max_images} per question "
                         "(remove some, or restart the page with --max-images)")
    for path in images:
        _check_image(path, limits)
    return Question(text, images)


def check_sampling(max_new_tokens: float, temperature: float, top_p: float, seed: float | None,
                   limits: Limits) -> Sampling:
    """The page's sampling settings as :class:`Sampling`; :class:`InputError` when one is out of range."""
    if not 1 <= max_new_tokens <= limits.max_new_tokens:
        raise InputError(f"max new tokens is {max_new_tokens:g}; this page generates 1 to {limits.max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise InputError(f"temperature {temperature:g}, top p {top_p:g}: need temperature >= 0 (0 = greedy) and "
                         "0 < top p <= 1")
    return Sampling(int(max_new_tokens), float(temperature), float(top_p), int(seed or 0))


__all__ = ["InputError", "Limits", "Question", "Sampling", "check_question", "check_sampling"]
