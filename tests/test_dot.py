"""Dual-order training: the T&I reordering and the per-step schedule."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import chat
from pipeline.data.collate import collate
from pipeline.data.dot import (TI_PT_IMAGE, DotSchedule, caption_end_tokens, prompt_suffix_tokens,
                               reorder_sample, to_text_first)
from pipeline.model.aki import target_positions
from pipeline.model.tokenizer import ASSISTANT_TAG, END_OF_CHUNK, END_TAG, IMAGE_TOKEN, USER_TAG
from pipeline.tokens import IMAGE, TEXT_INPUT, TEXT_TARGET

N = 4
EOS = "<|endoftext|>"


def encode(tokenizer, segments):
    enc = chat.encode(tokenizer, segments, N)
    return enc.input_ids, enc.modality_ids


def test_sft_image_moves_after_the_question_before_the_turn_end(tiny_tokenizer):
    ids, mods = encode(tiny_tokenizer, chat.chat_segments([("How many squares are there?", "two")], num_images=2))
    new_ids, new_mods = reorder_sample(ids, mods, prompt_suffix_tokens(tiny_tokenizer))
    text = tiny_tokenizer.decode(new_ids)
    images = IMAGE_TOKEN * (2 * N)
    assert f"{USER_TAG}\n\nHow many squares are there?{images}{END_TAG}\n{ASSISTANT_TAG}\ntwo{EOS}" in text
    assert text.startswith(tiny_tokenizer.decode(ids[:int(np.argmax(mods == IMAGE))]))  # system part untouched
    # the image run now sits after every prompt token of the question and before the answer
    img = np.flatnonzero(new_mods == IMAGE)
    assert (np.diff(img) == 1).all() and new_mods[img[-1] + 1] == TEXT_INPUT
    assert (new_mods[img[-1] + 1:] != IMAGE).all() and np.flatnonzero(new_mods == TEXT_TARGET).min() > img[-1]


def test_pt_image_moves_after_the_caption_before_its_end_or_last(tiny_tokenizer):
    ids, mods = encode(tiny_tokenizer, chat.pretrain_segments("a red circle"))
    tail = prompt_suffix_tokens(tiny_tokenizer)
    end = caption_end_tokens(tiny_tokenizer)          # <|endofchunk|> and EOS
    assert end == len(tiny_tokenizer.encode(f"{END_OF_CHUNK}{EOS}", add_special_tokens=False))
    new_ids, new_mods = reorder_sample(ids, mods, tail, TI_PT_IMAGE["before_end"](tiny_tokenizer, "released"))
    assert tiny_tokenizer.decode(new_ids) == f"<s>a red circle{IMAGE_TOKEN * N}{END_OF_CHUNK}{EOS}"
    assert new_mods.tolist() == [TEXT_INPUT] + [TEXT_TARGET] * (len(ids) - 1 - N - end) + [IMAGE] * N + [TEXT_TARGET] * end
    new_ids, new_mods = reorder_sample(ids, mods, tail, TI_PT_IMAGE["last"](tiny_tokenizer, "released"))
    assert tiny_tokenizer.decode(new_ids) == f"<s>a red circle{END_OF_CHUNK}{EOS}{IMAGE_TOKEN * N}"
    assert new_mods.tolist() == [TEXT_INPUT] + [TEXT_TARGET] * (len(ids) - 1 - N) + [IMAGE] * N


def test_reorder_is_a_permutation_that_keeps_each_token_with_its_modality(tiny_tokenizer):
    tail = prompt_suffix_tokens(tiny_tokenizer)
    for segments in (chat.pretrain_segments("green triangle"),
                     chat.chat_segments([("What color is the circle?", "red"), ("Is it left?", "yes")],
                                        layout="phi3_chat"),
                     chat.chat_segments([("Options:\nA. one", "A")], num_images=0)):
        ids, mods = encode(tiny_tokenizer, segments)
        new_ids, new_mods = reorder_sample(ids, mods, tail)
        assert len(new_ids) == len(ids) and new_ids.dtype == ids.dtype and new_mods.dtype == mods.dtype
        assert sorted(zip(new_ids.tolist(), new_mods.tolist())) == sorted(zip(ids.tolist(), mods.tolist()))
        # text tokens keep their relative order
        assert new_ids[new_mods != IMAGE].tolist() == ids[mods != IMAGE].tolist()
    text_only_ids, text_only_mods = encode(tiny_tokenizer, chat.chat_segments([("Options:\nA. one", "A")], num_images=0))
    assert np.array_equal(reorder_sample(text_only_ids, text_only_mods, tail)[0], text_only_ids)


def test_packed_batch_reorders_each_document_alone(tiny_tokenizer):
    tail = prompt_suffix_tokens(tiny_tokenizer)
    seg_sets = [chat.pretrain_segments("a red circle"), chat.chat_segments([("What color is it?", "blue")]),
                chat.chat_segments([("Options:\nA. one", "A")], num_images=0), chat.pretrain_segments("two squares")]
    samples = []
    for i, segs in enumerate(seg_sets):
        ids, mods = encode(tiny_tokenizer, segs)
        n_img = int((mods == IMAGE).sum()) // N
        samples.append({"input_ids": ids.astype(np.int64), "modality_ids": mods.astype(np.int64),
                        "pixel_values": torch.full((n_img, 3, 2, 2), float(i))})
    for mode in ("pack", "pad"):
        batch = collate(samples, mode, pad_id=0, pack_tokens=512)
        out = to_text_first(batch, tail)
        assert torch.equal(out["pixel_values"], batch["pixel_values"])
        # the same tokens still carry the loss
        assert int(target_positions(out["modality_ids"], out["document_ids"]).sum()) == batch["num_target_tokens"]
        docs = batch["document_ids"] if mode == "pack" else (batch["modality_ids"] != 0).long()
        if mode == "pack":
            assert torch.equal(out["document_ids"], batch["document_ids"])
        for row in range(batch["input_ids"].shape[0]):
            for d in docs[row].unique().tolist():
                sel = docs[row] == d
                if d == 0:  # padding stays put
                    assert torch.equal(out["input_ids"][row][sel], batch["input_ids"][row][sel])
                    continue
                want_ids, want_mods = reorder_sample(batch["input_ids"][row][sel].numpy(),
                                                     batch["modality_ids"][row][sel].numpy(), tail)
                assert out["input_ids"][row][sel].tolist() == want_ids.tolist()
                assert out["modality_ids"][row][sel].tolist() == want_mods.tolist()


def test_schedule_trains_text_first_then_image_first():
    dot = DotSchedule(["ti", "it"], total_steps=10)
    assert [dot.order_for_step(s) for s in range(10)] == ["ti"] * 5 + ["it"] * 5
    assert dot.order_for_step(10) == "it"  # past the end: the last order
    assert [DotSchedule(["it"], 4).order_for_step(s) for s in range(4)] == ["it"] * 4
    assert [DotSchedule(["ti"], 4).order_for_step(s) for s in range(4)] == ["ti"] * 4


@pytest.mark.parametrize("stage, order, ti_pt_image, connector_learns", [
    ("pt", "it", "before_end", True), ("pt", "ti", "before_end", True), ("pt", "ti", "last", False),
    ("sft", "it", "before_end", True), ("sft", "ti", "before_end", True)])
def test_each_order_predicts_the_same_tokens_and_trains_the_stated_modules(
        tiny_model_factory, tiny_size, tiny_tokenizer, stage, order, ti_pt_image, connector_learns):
    n = tiny_size.num_visual_tokens
    segments = chat.pretrain_segments("a red circle") if stage == "pt" else \
        chat.chat_segments([("What color is the circle?", "red")])
    enc = chat.encode(tiny_tokenizer, segments, n)
    batch = collate([{"input_ids": enc.input_ids.astype(np.int64), "modality_ids": enc.modality_ids.astype(np.int64),
                      "pixel_values": torch.rand(1, 3, tiny_size.image_size, tiny_size.image_size)}], "pad", pad_id=0)
    if order == "ti":
        batch = to_text_first(batch, prompt_suffix_tokens(tiny_tokenizer), TI_PT_IMAGE[ti_pt_image](tiny_tokenizer, "released"))
    predicted = target_positions(batch["modality_ids"])
    want = enc.input_ids[enc.modality_ids == TEXT_TARGET].tolist()     # the stored caption / answer tokens
    assert batch["input_ids"][predicted].tolist() == want
    model = tiny_model_factory("causal").train()
    inputs = {k: batch[k] for k in ("input_ids", "modality_ids", "pixel_values")}
    model(**inputs, return_logits=False).loss_sum.backward()

    def learns(module):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    assert learns(model.llm) and not learns(model.vision)
    assert learns(model.resampler) == learns(model.projection) == connector_learns


def test_dot_orders_are_phases_that_split_the_steps(tiny_tokenizer):
    from pipeline.config import load_config
    from pipeline.data.phases import plan_phases

    phases = plan_phases(load_config("tiny_pt", ["data.datasets=[{path: d}]", "data.orders=[ti, it]",
                                                 "train.total_steps=6"]))
    assert [(p.name, p.order, p.start_step, p.end_step) for p in phases] == [("data/ti", "ti", 0, 3),
                                                                             ("data/it", "it", 3, 6)]
    assert phases[0].data == phases[1].data


def test_schedule_refuses_bad_orders():
    with pytest.raises(ValueError, match="use 'it'"):
        DotSchedule(["ti", "xx"], 10)
    with pytest.raises(ValueError, match="cannot be split"):
        DotSchedule(["ti", "it"], 1)
