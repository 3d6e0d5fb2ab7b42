"""Attention modes: masks and position ids against a brute-force reading of DESIGN.md's rules, and the
FlexAttention (BlockMask) path against the dense (SDPA) path in the model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.model import attention
from pipeline.tokens import IMAGE, PAD, TEXT_INPUT, TEXT_TARGET

MODES = ["causal", "mma", "mma_general", "cca"]


def brute_positions(mods: list[int], docs: list[int], mode: str, n: int) -> list[int]:
    """Position ids token by token: index within the document; in cca an image's slot on concentric ring r
    of the g×g grid sits at image_start + r and the text after the image continues at image_start + rings."""
    side = int(round(n ** 0.5))
    rings = (side + 1) // 2
    out, counter, slot, image_start = [], 0, 0, 0
    for t, (m, d) in enumerate(zip(mods, docs)):
        if m == PAD:
            out.append(0)
            continue
        if t == 0 or docs[t - 1] != d or mods[t - 1] == PAD:
            counter, slot = 0, 0
        if mode == "cca" and m == IMAGE:
            slot = slot + 1 if t > 0 and mods[t - 1] == IMAGE and docs[t - 1] == d else 0
            s = slot % n
            if s == 0:
                image_start = counter
                counter += rings
            r, c = divmod(s, side)
            out.append(image_start + min(r, c, side - 1 - r, side - 1 - c))
        else:
            out.append(counter)
            counter += 1
    return out


def brute_turns(mods: list[int], docs: list[int]) -> list[int]:
    """Turn of each token: how many answers of its document end before it."""
    out = []
    for t, (m, d) in enumerate(zip(mods, docs)):
        out.append(sum(1 for s in range(1, t + 1) if docs[s] == docs[s - 1] == d
                       and mods[s - 1] == TEXT_TARGET and mods[s] in (TEXT_INPUT, IMAGE)))
    return out


def brute_visible(mode: str, mods, docs, pos, turns, q: int, k: int) -> bool:
    """DESIGN.md's table for one (query, key) pair; a non-causal pair (k after q) must share a turn, or a
    later question (which sees the answer before it) would carry that answer back to earlier tokens."""
    mq, mk = mods[q], mods[k]
    if mq == PAD or mk == PAD or docs[q] != docs[k]:
        return False
    if k > q and turns[q] != turns[k]:
        return False
    inputs = (TEXT_INPUT, IMAGE)
    if mode == "causal":
        return k <= q
    if mode == "mma":
        return k <= q or (mq == IMAGE and mk == TEXT_INPUT)
    if mode == "mma_general":
        return k <= q or (mq in inputs and mk in inputs and mq != mk)
    if mode == "cca":
        return pos[k] <= pos[q]
    raise AssertionError(mode)


def layouts(make_layout):
    """(modality_ids, document_ids or None, N) covering padding sides, packing, 0-2 images, multi-turn."""
    rng = np.random.default_rng(0)
    for i in range(16):
        n = (4, 9, 16)[i % 3]
        packed = i % 4 != 0
        mods, docs = make_layout(rng, batch=3, num_visual_tokens=n, max_docs=3 if packed else 1,
                                 padding=("left", "right")[i % 2], multi_turn=i % 5 == 0)
        yield mods, (docs if packed else None), n


@pytest.mark.parametrize("mode", MODES)
def test_dense_mask_and_positions_follow_the_rule(mode, make_layout):
    for mods, docs, n in layouts(make_layout):
        dense = attention.dense_mask(mods, mode, docs, num_visual_tokens=n)
        positions = attention.position_ids(mods, mode, docs, num_visual_tokens=n)
        doc_ids = docs if docs is not None else (mods != PAD).long()
        for b in range(mods.shape[0]):
            m, d = mods[b].tolist(), doc_ids[b].tolist()
            pos, turns = brute_positions(m, d, mode, n), brute_turns(m, d)
            assert positions[b].tolist() == pos
            want = [[brute_visible(mode, m, d, pos, turns, q, k) for k in range(len(m))]
                    for q in range(len(m))]
            assert dense[b].tolist() == want


@pytest.mark.parametrize("mode", MODES)
def test_sdpa_mask_is_dense_mask_plus_pad_self_edges(mode, make_layout):
    mods, docs = make_layout(np.random.default_rng(1), batch=3, num_visual_tokens=9, padding="left")
    dense = attention.dense_mask(mods, mode, docs, num_visual_tokens=9)
    sdpa = attention.sdpa_mask(mods, mode, docs, num_visual_tokens=9)
    assert sdpa.shape == (3, 1) + dense.shape[1:] and sdpa.dtype == torch.bool
    pad = mods == PAD
    assert torch.equal(sdpa[:, 0] & ~torch.diag_embed(pad), dense)
    assert sdpa[:, 0].any(dim=-1).all(), "every query row must see at least one key"


@pytest.mark.parametrize("mode", MODES)
def test_block_mask_rule_equals_dense_mask(mode, make_layout):
    mods, docs = make_layout(np.random.default_rng(2), batch=2, num_visual_tokens=9)
    dense = attention.dense_mask(mods, mode, docs, num_visual_tokens=9)
    block = attention.block_mask(mods, mode, docs, num_visual_tokens=9, block_size=16)
    b, q, k = (torch.arange(s) for s in dense.shape)
    evaluated = block.mask_mod(b[:, None, None], torch.zeros(()), q[None, :, None], k[None, None, :])
    assert torch.equal(evaluated, dense)
    # Blocks the kernel skips hold no visible pair.
    blocks = block.to_dense()[:, 0].bool()
    covered = blocks.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, :dense.shape[1], :dense.shape[2]]
    assert not (dense & ~covered).any()


@pytest.mark.parametrize("mode", MODES)
def test_block_mask_dense_and_eager_paths_give_the_same_logits(mode, tiny_model_factory, make_layout):
    dense_model = tiny_model_factory(mode, "sdpa")
    n = dense_model.num_visual_tokens
    mods, docs = make_layout(np.random.default_rng(3), batch=2, num_visual_tokens=n)
    ids = torch.randint(0, 400, mods.shape)
    n_images = int((mods == IMAGE).sum()) // n
    pixels = torch.randn(n_images, 3, dense_model.image_size, dense_model.image_size)
    real = mods != PAD
    with torch.no_grad():   # FlexAttention has no backward on CPU
        want = dense_model(ids, mods, pixels, docs)
        for backend in ("flex_attention_eager", "eager"):
            got = tiny_model_factory(mode, backend)(ids, mods, pixels, docs)
            # other kernels, other summation order: measured at most 4.8e-7 apart (fp32, 2-core x86 CPU)
            torch.testing.assert_close(got.logits[real], want.logits[real], atol=3e-6, rtol=1e-6)
            torch.testing.assert_close(got.loss, want.loss, atol=3e-6, rtol=1e-6)


def test_unknown_mode_is_a_clear_error(tiny_size):
    from pipeline.model.aki import AKIModel

    mods = torch.tensor([[TEXT_INPUT, TEXT_TARGET]])
    with pytest.raises(ValueError, match="unknown attention mode 'mmx'.*mma"):
        attention.dense_mask(mods, "mmx")
    with pytest.raises(ValueError, match="unknown attention mode 'bidirectional'"):
        AKIModel(tiny_size, attention_mode="bidirectional")
    with pytest.raises(ValueError, match="unsupported attn_implementation 'flash_attention_2'.*eager"):
        AKIModel(tiny_size, attn_implementation="flash_attention_2")
