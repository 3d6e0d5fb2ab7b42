"""Where the inspected samples come from: an MDS dataset folder by index, or a question and image(s)
through a text layout of :mod:`pipeline.chat`, exactly as data preparation and generation lay them out.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase

from pipeline.chat import encode, get_layout
from pipeline.data.format import check_manifest, read_manifest, split_images
from pipeline.data.registration import one_registration_at_a_time
from pipeline.model.tokenizer import tokenizer_fingerprint


@dataclasses.dataclass
class Sample:
    """One sample laid out by the token contract, with the encoded bytes of its images (in slot order)."""

    name: str
    input_ids: np.ndarray      # int64 [L]
    modality_ids: np.ndarray   # int64 [L]
    images: list[bytes]
    num_visual_tokens: int


def dataset_samples(folder: str, indices: Sequence[int], tokenizer: PreTrainedTokenizerBase,
                    num_visual_tokens: int | None = None, text_layout: str | None = None) -> list[Sample]:
    """Samples ``indices`` of the MDS dataset ``folder`` (written by ``data_prep/``).

    The folder's manifest must match ``tokenizer`` and, when given, a model's ``num_visual_tokens`` (N)
    and ``text_layout``.
    """
    import tempfile

    from streaming import StreamingDataset

    manifest = read_manifest(folder)
    n = manifest.num_visual_tokens if num_visual_tokens is None else num_visual_tokens
    check_manifest(manifest, folder, n, tokenizer_fingerprint(tokenizer), text_layout or manifest.text_layout)
    samples = []
    # The folder is the stream's remote: only the shards holding the samples are copied (and decompressed)
    # into a private cache, so the dataset folder stays untouched and may be in use elsewhere.
    with tempfile.TemporaryDirectory(prefix="inspect_") as cache:
        with one_registration_at_a_time():
            dataset = StreamingDataset(remote=os.path.abspath(folder), local=cache, shuffle=False, batch_size=1)
        for index in indices:
            if not 0 <= index < len(dataset):
                raise ValueError(f"sample index {index} is out of range: dataset {folder} holds {len(dataset)} "
                                 f"samples (indices 0..{len(dataset) - 1})")
            raw = dataset[index]
            name = f"{os.path.basename(os.path.normpath(folder))}[{index}]"
            samples.append(Sample(name, np.asarray(raw["input_ids"]).astype(np.int64),
                                  np.asarray(raw["modality_ids"]).astype(np.int64),
                                  split_images(raw["images"], raw["image_lengths"]), n))
    return samples


def question_sample(tokenizer: PreTrainedTokenizerBase, question: str, image_paths: Sequence[str],
                    num_visual_tokens: int, text_layout: str, answer: str | None = None) -> Sample:
    """A one-turn chat sample in ``text_layout``: the images at the start of the user turn, then
    ``question``; with ``answer`` the answer follows as TEXT_TARGET, without it the prompt ends where the
    answer starts (as in generation)."""
    images = []
    for path in image_paths:
        if not os.path.isfile(path):
            raise ValueError(f"image {path!r} not found; give the path of an image file")
        with open(path, "rb") as f:
            images.append(f.read())
    segments = get_layout(text_layout).chat_segments([(question, answer)], num_images=len(images))
    encoded = encode(tokenizer, segments, num_visual_tokens)
    return Sample(f"question {question!r}", encoded.input_ids.astype(np.int64),
                  encoded.modality_ids.astype(np.int64), images, num_visual_tokens)


def packed_row(samples: Sequence[Sample]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(input_ids, modality_ids, document_ids)`` of one row holding ``samples`` in order, numbered
    1, 2, … as the collator packs them (``document_ids`` is None for a single sample)."""
    if not samples:
        raise ValueError("no sample to lay out")
    input_ids = np.concatenate([s.input_ids for s in samples])
    modality_ids = np.concatenate([s.modality_ids for s in samples])
    if len(samples) == 1:
        return input_ids, modality_ids, None
    document_ids = np.repeat(np.arange(1, len(samples) + 1), [len(s.input_ids) for s in samples])
    return input_ids, modality_ids, document_ids


__all__ = ["Sample", "dataset_samples", "packed_row", "question_sample"]
