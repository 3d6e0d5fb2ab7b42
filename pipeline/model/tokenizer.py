"""Tokenizer set-up: the special tokens AKI adds, a fingerprint for the data manifest, and a tiny
tokenizer builder for CPU runs.

A real run loads Phi-3.5-mini's tokenizer with ``AutoTokenizer.from_pretrained(path)``; tests and the
quickstart build a small byte-level BPE tokenizer with the ``tokenizers`` library, save it as a
``PreTrainedTokenizerFast`` folder and load it through the very same ``from_pretrained`` path.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable

from transformers import AddedToken, AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

IMAGE_TOKEN = "<image>"
END_OF_CHUNK = "<|endofchunk|>"
PAD_TOKEN = "<pad>"
ADDED_TOKENS = (IMAGE_TOKEN, END_OF_CHUNK)   # the two ids AKI adds after the base vocabulary, in order
# Phi-3 chat roles; they exist in the Phi-3.5 tokenizer and in the tiny one built below.
SYSTEM_TAG, USER_TAG, ASSISTANT_TAG, END_TAG = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
PHI3_SPECIAL_TOKENS = ["<unk>", "<s>", "<|endoftext|>", SYSTEM_TAG, USER_TAG, ASSISTANT_TAG, END_TAG]


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load a tokenizer folder (or hub id) and add AKI's special tokens."""
    return prepare_tokenizer(AutoTokenizer.from_pretrained(str(path)))


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Add AKI's tokens as the released model did: ``<pad>`` (when the tokenizer has no pad token of its
    own, or pads with EOS, as Phi-3.5 does), then ``<image>``, then ``<|endofchunk|>``. Idempotent.

    On Phi-3.5's tokenizer (ids 0..32010) this gives ``<pad>`` 32011, ``<image>`` 32012 and
    ``<|endofchunk|>`` 32013. The model reads ids below the ``<image>`` id from the LLM's own embedding
    table and the two added ids from its own rows (:func:`added_token_layout`).
    """
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    missing = [AddedToken(t, special=True, normalized=False) for t in ADDED_TOKENS
               if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return tokenizer


def added_token_layout(tokenizer: PreTrainedTokenizerBase) -> int:
    """The number of base ids B: ids below B are the LLM's vocabulary, ``<image>`` is B and
    ``<|endofchunk|>`` is B + 1 (the last two ids). Raises a clear error for any other layout."""
    image_id, chunk_id = image_token_id(tokenizer), _require_token(tokenizer, END_OF_CHUNK)
    if chunk_id != image_id + 1 or len(tokenizer) != image_id + 2:
        raise ValueError(f"tokenizer has {IMAGE_TOKEN!r} at id {image_id}, {END_OF_CHUNK!r} at {chunk_id} and "
                         f"{len(tokenizer)} tokens; AKI needs them as the last two ids, added in this order "
                         "(prepare the tokenizer with pipeline.model.tokenizer.load_tokenizer before adding "
                         "other tokens)")
    return image_id


def image_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Id of the image placeholder; each image slot in ``input_ids`` holds it."""
    return _require_token(tokenizer, IMAGE_TOKEN)


def control_token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """Id of a control token of the text layout (a role tag, ``<|endofchunk|>``, ``<image>``), with a clear
    error when the tokenizer lacks it."""
    return _require_token(tokenizer, token)


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str, special: frozenset[int] | None = None) -> list[int]:
    """Ids of ``text`` as ordinary text: a special-token string inside it (``<|endoftext|>``, ``<image>``,
    ``<|assistant|>``, ``<s>`` …) is tokenized like any other characters, never as a control token.

    transformers' ``split_special_tokens=True``; the result is checked against the control ids (``special``,
    default :func:`special_token_ids`), so a tokenizer that ignores the flag is an error rather than a
    record with injected roles.
    """
    if not text:
        return []
    ids = tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    control = special_token_ids(tokenizer) if special is None else special
    if any(i in control for i in ids):
        raise ValueError(f"tokenizer {type(tokenizer).__name__} turned text into control tokens despite "
                         f"split_special_tokens=True ({text[:60]!r}); use a transformers tokenizer that supports it")
    return ids


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Ids of the tokenizer's special (control) tokens: BOS, EOS, pad, role tags, ``<image>`` … (not ``<unk>``,
    which ordinary text may produce)."""
    ids = set(tokenizer.all_special_ids) | {i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
    return frozenset(ids - {tokenizer.unk_token_id})


def role_tag_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Ids of the chat role tags, keyed by tag: ``<|system|>``, ``<|user|>``, ``<|assistant|>``, ``<|end|>``."""
    return {tag: _require_token(tokenizer, tag) for tag in (SYSTEM_TAG, USER_TAG, ASSISTANT_TAG, END_TAG)}


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids that end a generated answer: ``<|end|>``, ``<|endofchunk|>`` and EOS."""
    ids = {_require_token(tokenizer, END_TAG), _require_token(tokenizer, END_OF_CHUNK)}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of the vocabulary (tokens, ids and added tokens).

    Stored in every dataset manifest; training refuses data tokenized with another vocabulary.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    blob = json.dumps({"vocab": vocab, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id},
                      ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _require_token(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no {token!r} token; load it with "
                         "pipeline.model.tokenizer.load_tokenizer (which adds AKI's tokens)")
    return tid


def build_tiny_tokenizer(texts: Iterable[str], path: str | os.PathLike, vocab_size: int = 500) -> str:
    """Train a small byte-level BPE tokenizer with Phi-3's special tokens and save it at ``path``.

    Load the result with :func:`load_tokenizer` — the same path a real Phi-3.5 folder takes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=PHI3_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>",
                                   unk_token="<unk>",
                                   additional_special_tokens=[SYSTEM_TAG, USER_TAG, ASSISTANT_TAG, END_TAG])
    os.makedirs(path, exist_ok=True)
    fast.save_pretrained(str(path))
    return str(path)
