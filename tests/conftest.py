"""Shared pytest fixtures: a tiny tokenizer saved to disk and loaded through the real loading path."""
from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from pipeline.chat import SYSTEM_MESSAGE  # noqa: E402

TINY_CORPUS = [
    SYSTEM_MESSAGE,
    "Answer the question using a single word or phrase. What color is the circle? red",
    "Answer with the option's letter from the given choices directly. How many squares are there?",
    "Options:\nA. one\nB. two\nC. three\nD. four",
    "Provide a short description for this region. <bbox>[0.125, 0.250][0.500, 0.750]</bbox>",
    "a red circle on the left and a blue square on the right. yes no left right above below",
    "green triangle yellow purple orange white black gray count how many is there are the of",
    "0123456789 [ ] , . ? ! : ; ( ) - the image shows",
] * 4


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory) -> str:
    """Folder of a tiny Phi-3-style tokenizer (load it with pipeline.model.tokenizer.load_tokenizer)."""
    from pipeline.model.tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer(TINY_CORPUS, tmp_path_factory.mktemp("tokenizer") / "tiny_tokenizer")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_path):
    from pipeline.model.tokenizer import load_tokenizer

    return load_tokenizer(tiny_tokenizer_path)
