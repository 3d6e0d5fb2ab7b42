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


# ---- model fixtures ----------------------------------------------------------------------------------

def random_layout(rng, batch: int, num_visual_tokens: int, max_docs: int = 3, padding: str = "right",
                  multi_turn: bool = False, max_images: int = 2):
    """A random packed batch layout: ``(modality_ids, document_ids)``, both long ``[batch, L]``.

    Each document is ``BOS`` + an input part (1-2 text runs and 0-``max_images`` images of N slots, in random
    order, images possibly adjacent) + an answer; ``multi_turn`` adds 1-2 more (question, answer) turns.
    Documents are numbered 1, 2, … per row; padding (left or right) has modality PAD and document 0.
    """
    import numpy as np
    import torch

    from pipeline.tokens import IMAGE, PAD, TEXT_INPUT, TEXT_TARGET

    def document():
        parts = [[TEXT_INPUT] * int(rng.integers(1, 4)) for _ in range(int(rng.integers(1, 3)))]
        parts += [[IMAGE] * num_visual_tokens for _ in range(int(rng.integers(0, max_images + 1)))]
        order = rng.permutation(len(parts))
        mods = [TEXT_INPUT] + [m for i in order for m in parts[i]] + [TEXT_TARGET] * int(rng.integers(1, 5))
        for _ in range(int(rng.integers(1, 3)) if multi_turn else 0):
            mods += [TEXT_INPUT] * int(rng.integers(1, 4)) + [TEXT_TARGET] * int(rng.integers(1, 4))
        return mods

    rows = []
    for _ in range(batch):
        mods, docs = [], []
        for d in range(int(rng.integers(1, max_docs + 1))):
            doc = document()
            mods += doc
            docs += [d + 1] * len(doc)
        rows.append((mods, docs))
    width = max(len(m) for m, _ in rows)
    modality_ids = torch.full((batch, width), PAD, dtype=torch.long)
    document_ids = torch.zeros((batch, width), dtype=torch.long)
    for r, (mods, docs) in enumerate(rows):
        sl = slice(0, len(mods)) if padding == "right" else slice(width - len(mods), width)
        modality_ids[r, sl] = torch.tensor(mods)
        document_ids[r, sl] = torch.tensor(docs)
    assert np.all((modality_ids == PAD).numpy() == (document_ids == 0).numpy())
    return modality_ids, document_ids


@pytest.fixture(scope="session")
def make_layout():
    """The :func:`random_layout` generator."""
    return random_layout


@pytest.fixture(scope="session")
def tiny_size():
    """The ``tiny`` size with 9 visual tokens (a 3×3 latent grid, so ``cca`` has two rings)."""
    import dataclasses

    from pipeline.model.sizes import get_model_size

    tiny = get_model_size("tiny")
    return dataclasses.replace(tiny, resampler={**tiny.resampler, "num_latents": 9})


@pytest.fixture(scope="session")
def tiny_model_factory(tiny_size, tiny_tokenizer):
    """``build(mode="mma", attn_implementation="sdpa")`` → a tiny AKIModel with the tiny tokenizer, in
    eval mode; every call returns a fresh model with the same random weights."""
    import torch

    from pipeline.model.aki import AKIModel

    torch.manual_seed(0)
    weights = AKIModel(tiny_size, tokenizer=tiny_tokenizer).state_dict()

    def build(mode: str = "mma", attn_implementation: str = "sdpa") -> AKIModel:
        model = AKIModel(tiny_size, tokenizer=tiny_tokenizer, attention_mode=mode,
                         attn_implementation=attn_implementation)
        model.load_state_dict(weights)
        return model.eval()

    return build


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, tiny_tokenizer) -> str:
    """An export folder of a tiny MMA model with the tiny tokenizer (shared by the evaluation tests)."""
    import torch

    from pipeline.model.aki import AKIModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("export") / "tiny_mma"
    model = AKIModel("tiny", tokenizer=tiny_tokenizer, attention_mode="mma")
    with torch.no_grad():   # a wide random init: answers differ from prompt to prompt
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    return str(folder)


# ---- object storage ----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server on 127.0.0.1 (moto) with bucket ``aki-ci`` and credentials it checks."""
    from s3_server import start_s3_server

    server = start_s3_server()
    yield server
    server.stop()


@pytest.fixture()
def s3_env(s3_server, monkeypatch):
    """This process pointed at :func:`s3_server` through the standard variables; returns the server."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server


# ---- order ----------------------------------------------------------------------------------------------

# `make test` runs two pytest-xdist workers, one module at a time each (--dist loadfile, in this order:
# --no-loadscope-reorder); the longest modules go first so that the workers finish together instead of one
# running the quickstart alone at the end. The training tests are several modules (tests/test_train*.py, one
# reference run shared between them) so that the two workers can share them.
LONGEST_FIRST = ("test_quickstart.py", "test_train_remote.py", "test_train.py", "test_train_sft.py",
                 "test_train_eval.py", "test_lora.py", "test_outage.py", "test_slurm.py", "test_released.py")


def pytest_collection_modifyitems(items) -> None:
    """Run the longest modules first (a stable sort: the others keep their order)."""
    def rank(item) -> int:
        name = os.path.basename(str(item.path))
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
    items.sort(key=rank)
