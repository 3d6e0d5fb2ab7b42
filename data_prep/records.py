"""What parsers yield: a :class:`Sample` to encode and write, or a :class:`Skip` with its reason.

The skip reasons are listed here once; every manifest counts dropped records under these names.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence, Union

from pipeline.chat import Content

CORRUPT_IMAGE = "corrupt_image"        # image bytes PIL cannot decode (corrupt or truncated file)
MISSING_IMAGE = "missing_image"        # the record names an image file that does not exist
EMPTY_TEXT = "empty_text"              # caption / question / answer empty after stripping
NON_UTF8_TEXT = "non_utf8_text"        # text bytes that are not valid UTF-8
MALFORMED_RECORD = "malformed_record"  # missing keys, wrong types, unparsable JSON, bad answer index
OVER_LENGTH = "over_length"            # the prompt alone exceeds the text-token budget
TRUNCATED_TAR = "truncated_tar"        # a tar archive that ends in the middle of a member
CONVERSION_ERROR = "conversion_error"  # any other error while turning one sample into a row
WRITE_ERROR = "write_error"            # the MDS writer refused one row

SKIP_REASONS = (CORRUPT_IMAGE, MISSING_IMAGE, EMPTY_TEXT, NON_UTF8_TEXT, MALFORMED_RECORD, OVER_LENGTH,
                TRUNCATED_TAR, CONVERSION_ERROR, WRITE_ERROR)

# An image is either a file path (SFT sources) or the file's bytes (webdataset members).
ImageRef = Union[str, bytes]


@dataclasses.dataclass(frozen=True)
class Sample:
    """One training sample before tokenization: its images and its text content (a ``Caption`` or a
    ``Chat``; the writer lays it out in the dataset's text layout, ``pipeline.chat``)."""

    id: str
    images: Sequence[ImageRef]
    content: Content
    flags: Sequence[str] = ()      # facts counted in the manifest (e.g. ``clamped_box``)


@dataclasses.dataclass(frozen=True)
class Skip:
    """A record dropped for ``reason`` (one of :data:`SKIP_REASONS`)."""

    reason: str
    id: str = ""
    detail: str = ""

    def __post_init__(self) -> None:
        if self.reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {self.reason!r}; use one of {SKIP_REASONS}")


Parsed = Union[Sample, Skip]
