"""Collation: padding and packing lay samples out correctly and give the model the same loss."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from pipeline import chat
from pipeline.data.collate import MODEL_INPUTS, SKIP_KEY, Collator, collate, pack_rows
from pipeline.model import attention
from pipeline.model.sizes import get_model_size
from pipeline.tokens import IMAGE, PAD, TEXT_INPUT, TEXT_TARGET

TINY = get_model_size("tiny")
N, SIDE = TINY.num_visual_tokens, TINY.image_size


def make_sample(tokenizer, segments, num_images, seed):
    enc = chat.encode(tokenizer, segments, N)
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": enc.input_ids.astype(np.int64), "modality_ids": enc.modality_ids.astype(np.int64),
            "pixel_values": torch.rand(num_images, 3, SIDE, SIDE, generator=g), "source": f"s{seed}"}


@pytest.fixture(scope="module")
def samples(tiny_tokenizer):
    return [
        make_sample(tiny_tokenizer, chat.pretrain_segments("a red circle on the left"), 1, 0),
        make_sample(tiny_tokenizer, chat.chat_segments([("What color is the circle?", "red")]), 1, 1),
        make_sample(tiny_tokenizer, chat.chat_segments([("How many squares are there?", "two")], num_images=2), 2, 2),
        # text-only (e.g. ScienceQA without an image)
        make_sample(tiny_tokenizer, chat.chat_segments([("Options:\nA. one\nB. two", "B")], num_images=0), 0, 3),
        make_sample(tiny_tokenizer, chat.pretrain_segments("green triangle"), 1, 4),
    ]


def test_pad_layout(samples):
    batch = collate(samples, "pad", pad_id=7, pad_to_multiple_of=8)
    lengths = [len(s["input_ids"]) for s in samples]
    assert batch["input_ids"].shape == (len(samples), max(-(-max(lengths) // 8) * 8, 8))
    assert batch["document_ids"] is None and batch["input_ids"].dtype == torch.long
    for row, (s, n) in enumerate(zip(samples, lengths)):
        assert batch["input_ids"][row, :n].tolist() == s["input_ids"].tolist()
        assert batch["modality_ids"][row, :n].tolist() == s["modality_ids"].tolist()
        assert (batch["input_ids"][row, n:] == 7).all() and (batch["modality_ids"][row, n:] == PAD).all()
    assert torch.equal(batch["pixel_values"], torch.cat([s["pixel_values"] for s in samples]))
    assert batch["num_target_tokens"] == sum(int((s["modality_ids"] == TEXT_TARGET).sum()) for s in samples)


def test_pack_layout(samples):
    lengths = [len(s["input_ids"]) for s in samples]
    budget = max(lengths) + 20
    batch = collate(samples, "pack", pad_id=7, pack_tokens=budget)
    ids, mods, docs = batch["input_ids"], batch["modality_ids"], batch["document_ids"]
    assert ids.shape[0] < len(samples) and ids.shape[1] == budget      # every packed row: one static width
    found, images = [], []
    for row in range(ids.shape[0]):
        assert int((docs[row] > 0).sum()) <= budget
        n_docs = int(docs[row].max())
        real = docs[row] > 0
        assert (mods[row][~real] == PAD).all() and (ids[row][~real] == 7).all()
        assert docs[row][real].tolist() == sorted(docs[row][real].tolist())  # contiguous docs 1..k
        assert set(docs[row][real].tolist()) == set(range(1, n_docs + 1))
        for d in range(1, n_docs + 1):
            doc_ids = ids[row][docs[row] == d].numpy()
            match = [i for i, s in enumerate(samples) if np.array_equal(s["input_ids"], doc_ids)]
            assert match, "a packed document is not one of the samples"
            found.append(match[0])
            images.append(samples[match[0]]["pixel_values"])
    assert sorted(found) == list(range(len(samples)))  # every sample exactly once
    assert torch.equal(batch["pixel_values"], torch.cat(images))  # row-major image order


def test_packed_position_ids_restart_per_document(samples):
    batch = collate(samples, "pack", pad_id=0, pack_tokens=256)
    pos = attention.position_ids(batch["modality_ids"], "causal", batch["document_ids"])
    docs = batch["document_ids"]
    for row in range(docs.shape[0]):
        for d in docs[row].unique().tolist():
            if d:
                assert pos[row][docs[row] == d].tolist() == list(range(int((docs[row] == d).sum())))


@pytest.mark.parametrize("mode", sorted(attention.MODES))
def test_packing_and_padding_give_the_same_loss(samples, tiny_tokenizer, mode):
    from pipeline.model.aki import AKIModel

    torch.manual_seed(0)
    model = AKIModel("tiny", tiny_tokenizer, attention_mode=mode).eval()
    pad_id = tiny_tokenizer.pad_token_id
    with torch.no_grad():
        padded = collate(samples, "pad", pad_id, pad_to_multiple_of=8)
        packed = collate(samples, "pack", pad_id, pack_tokens=256)
        out_pad = model(**{k: padded[k] for k in MODEL_INPUTS})
        out_pack = model(**{k: packed[k] for k in MODEL_INPUTS})
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    assert int(out_pad.num_target_tokens) == int(out_pack.num_target_tokens) == padded["num_target_tokens"]
    torch.testing.assert_close(out_pack.loss_sum, out_pad.loss_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_pack.loss, out_pad.loss, rtol=1e-5, atol=1e-6)


def test_collator_drops_and_counts_bad_samples(samples):
    collator = Collator("pack", pad_id=0, max_length=40, pack_tokens=64, image_size=SIDE)
    short = [s for s in samples if len(s["input_ids"]) <= 40]
    batch = collator(samples + [{SKIP_KEY: "unreadable_image", "source": "x"}])
    assert batch["num_samples"] == len(samples) + 1
    too_long = Counter(s["source"] for s in samples if len(s["input_ids"]) > 40)
    assert batch["skipped"] == {**{source: {"over_max_length": n} for source, n in too_long.items()},
                                "x": {"unreadable_image": 1}}
    assert sorted(batch["sources"]) == sorted(s["source"] for s in short)


def test_all_skipped_batch_is_a_placeholder_the_model_runs(tiny_tokenizer):
    from pipeline.model.aki import AKIModel

    collator = Collator("pad", pad_id=tiny_tokenizer.pad_token_id, max_length=16, image_size=SIDE)
    batch = collator([{SKIP_KEY: "image_count_mismatch", "source": "x"}])
    assert batch["skipped"] == {"x": {"image_count_mismatch": 1}} and batch["num_target_tokens"] == 0
    assert batch["modality_ids"][0, 0] == TEXT_INPUT and batch["pixel_values"].shape == (0, 3, SIDE, SIDE)
    out = AKIModel("tiny", tiny_tokenizer)(**{k: batch[k] for k in MODEL_INPUTS})
    out.loss_sum.backward()  # every rank can still run forward and backward
    assert float(out.loss_sum.detach()) == 0.0


def test_pack_rows_respects_budget_and_refuses_oversized():
    lengths = [5, 9, 3, 7, 2, 8]
    rows = pack_rows(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows) and len(rows) == 4
    with pytest.raises(ValueError, match="does not fit a packed row of 10"):
        pack_rows([11], 10)


def test_image_slots_of_pixel_values_match(samples):
    batch = collate(samples, "pack", pad_id=0, pack_tokens=256)
    assert int((batch["modality_ids"] == IMAGE).sum()) == N * batch["pixel_values"].shape[0]
