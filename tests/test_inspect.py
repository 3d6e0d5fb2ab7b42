"""pipeline.inspect: token roles from the chat layout, mask pictures whose pixels are the dense mask, and
the image → question attention share read from the eager forward, checked against a manual softmax."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures_data import jpeg, write_image
from pipeline.chat import chat_segments, encode
from pipeline.inspect.__main__ import main as inspect_main
from pipeline.inspect.masks import (ADDED, HIDDEN, REMOVED, ROLE_COLORS, SAME, VISIBLE, draw_mask_picture)
from pipeline.inspect.roles import Role, token_roles
from pipeline.inspect.samples import Sample, packed_row
from pipeline.inspect.share import image_question_share
from pipeline.model import attention
from pipeline.model.tokenizer import USER_TAG, role_tag_ids
from pipeline.tokens import IMAGE, TEXT_TARGET


def chat_sample(tokenizer, turns, num_images, n, layout="released", name="s"):
    """An encoded chat sample and the role of every token, derived from its segments: everything before
    the first user turn is system, the user tag before the images is user, the prompt text after them
    (and every later user turn) is question."""
    segments = chat_segments(turns, num_images=num_images, system="Be brief.", layout=layout)
    enc = encode(tokenizer, segments, n)
    prefix_lengths = [len(encode(tokenizer, segments[:i], n).input_ids) for i in range(len(segments) + 1)]
    expected = [Role.SYSTEM] * prefix_lengths[0]      # BOS
    first_user = next(i for i, seg in enumerate(segments) if seg.control == USER_TAG)
    first_image = next((i for i, seg in enumerate(segments) if seg.modality == IMAGE), len(segments))
    for i, seg in enumerate(segments):
        length = prefix_lengths[i + 1] - prefix_lengths[i]
        if seg.modality == IMAGE:
            role = Role.IMAGE
        elif seg.modality == TEXT_TARGET:
            role = Role.ANSWER
        elif i < first_user:
            role = Role.SYSTEM
        else:
            role = Role.USER if i < first_image else Role.QUESTION
        expected += [role] * length
    assert len(expected) == len(enc.input_ids)
    sample = Sample(name, enc.input_ids.astype(np.int64), enc.modality_ids.astype(np.int64),
                    [jpeg("red", 32)] * num_images, n)
    return sample, np.array(expected)


def test_roles_follow_the_chat_layout(tiny_tokenizer):
    sample, expected = chat_sample(tiny_tokenizer, [("How many circles?", "two"), ("And red?", "one")], 2, 3,
                                   layout="phi3_chat")
    roles = token_roles(sample.input_ids, sample.modality_ids, role_tag_ids(tiny_tokenizer))
    assert roles.tolist() == expected.tolist()
    assert {Role.SYSTEM, Role.USER, Role.IMAGE, Role.QUESTION, Role.ANSWER} == set(roles.tolist())
    # Packed: the second document starts over with its own system band.
    other, other_expected = chat_sample(tiny_tokenizer, [("What color?", "red")], 1, 3)
    ids, mods, docs = packed_row([sample, other])
    assert token_roles(ids, mods, role_tag_ids(tiny_tokenizer), docs).tolist() == \
        expected.tolist() + other_expected.tolist()


def _pixels(path, box, rows, cols=None):
    """RGB (0..1) at the centre of every cell of a rows × cols grid filling a box (left, top, right, bottom)
    of a PNG (cols defaults to rows: a square panel)."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255
    left, top, right, bottom = box
    cols = rows if cols is None else cols
    ys = (top + (np.arange(rows) + 0.5) / rows * (bottom - top)).astype(int)
    xs = (left + (np.arange(cols) + 0.5) / cols * (right - left)).astype(int)
    return rgb[ys[:, None], xs[None, :]]


def _classify(pixels, palette):
    """Index of the nearest palette colour per pixel; every pixel must be one of them."""
    distance = np.linalg.norm(pixels[..., None, :] - np.stack(palette), axis=-1)
    assert distance.min(axis=-1).max() < 0.05, "a cell shows a colour outside the palette"
    return distance.argmin(axis=-1)


@pytest.mark.parametrize("mode", ["mma", "cca"])
def test_mask_picture_pixels_are_the_dense_mask(mode, tiny_tokenizer, tmp_path):
    """A packed row (two documents, one with two images) drawn cell by cell: every mask-panel pixel is
    dense_mask, every difference-panel pixel its comparison with causal, every strip pixel the role."""
    n = 9
    first, _ = chat_sample(tiny_tokenizer, [("How many?", "two")], 2, n)
    second, _ = chat_sample(tiny_tokenizer, [("Color?", "red")], 1, n)
    ids, mods, docs = packed_row([first, second])
    roles = token_roles(ids, mods, role_tag_ids(tiny_tokenizer), docs)
    picture = draw_mask_picture(str(tmp_path / "m.png"), mods, roles, mode, n, docs)
    length = len(mods)
    assert len(picture.cells) == length
    mods_t, docs_t = torch.as_tensor(mods)[None], torch.as_tensor(docs)[None]
    mask = attention.dense_mask(mods_t, mode, docs_t, n)[0].numpy()
    causal = attention.dense_mask(mods_t, "causal", docs_t, n)[0].numpy()

    shown = _classify(_pixels(picture.path, picture.boxes["mask"], length), [HIDDEN, VISIBLE])
    assert np.array_equal(shown == 1, mask)
    diff = _classify(_pixels(picture.path, picture.boxes["difference"], length), [HIDDEN, SAME, ADDED, REMOVED])
    want = np.select([mask & causal, mask & ~causal, ~mask & causal], [1, 2, 3], default=0)
    assert np.array_equal(diff, want)
    if mode == "mma":      # the unlocked paths: image queries reading the question after them
        image_rows, question_cols = roles == Role.IMAGE, roles == Role.QUESTION
        assert (diff[np.ix_(image_rows, question_cols)] == 2).any()
        assert (diff[~image_rows] != 2).all()
    if mode == "cca":      # 3x3 grid: the centre (slot 4) is the inner ring, hidden from the later slot 5
        start = int(np.flatnonzero(mods == IMAGE)[0])
        assert diff[start + 5, start + 4] == 3
    palette = [ROLE_COLORS[r] for r in Role]
    keys = _pixels(picture.path, picture.boxes["keys"], 1, length)[0]
    queries = _pixels(picture.path, picture.boxes["queries"], length, 1)[:, 0]
    assert np.array_equal(_classify(keys, palette), roles) and np.array_equal(_classify(queries, palette), roles)


def test_large_images_collapse_into_one_cell_shaded_by_their_visible_share(tiny_tokenizer, tmp_path):
    n = 4
    sample, _ = chat_sample(tiny_tokenizer, [("How many?", "two")], 2, n)
    roles = token_roles(sample.input_ids, sample.modality_ids, role_tag_ids(tiny_tokenizer))
    picture = draw_mask_picture(str(tmp_path / "c.png"), sample.modality_ids, roles, "mma", n,
                                collapse_images=True)
    cells = len(sample.modality_ids) - 2 * (n - 1)
    assert len(picture.cells) == cells
    first_image = next(c for c, idx in enumerate(picture.cells) if len(idx) == n)
    shown = _pixels(picture.path, picture.boxes["mask"], cells)
    # Within one image the slots see each other causally: 10 of its 16 pairs.
    share = 10 / 16
    np.testing.assert_allclose(shown[first_image, first_image], HIDDEN + share * (VISIBLE - HIDDEN), atol=0.02)
    # The second image sees all of the first one.
    np.testing.assert_allclose(shown[first_image + 1, first_image], VISIBLE, atol=0.02)


def test_masks_command_writes_a_picture_per_mode(tiny_tokenizer_path, tmp_path, capsys):
    image = write_image(str(tmp_path / "cat.jpg"))
    out = tmp_path / "masks"
    assert inspect_main(["masks", "--question", "How many cats?", "--image", image, "--image", image,
                         "--tokenizer", tiny_tokenizer_path, "--modes", "mma", "--out", str(out)]) == 0
    index = json.loads((out / "masks.json").read_text())
    assert index["pictures"] == {"mma": "mask_mma.png"} and index["skipped"] == {}
    assert index["images"] == 2 and index["num_visual_tokens"] == 144     # aki-4b
    with Image.open(out / "mask_mma.png") as img:
        assert img.format == "PNG"
    # By default every mode the layout allows; cca cannot lay out N=8 (not a square) and is listed as skipped.
    assert inspect_main(["masks", "--question", "Q?", "--image", image, "--tokenizer", tiny_tokenizer_path,
                         "--model-size", "small", "--out", str(tmp_path / "small")]) == 0
    index = json.loads((tmp_path / "small" / "masks.json").read_text())
    assert set(index["pictures"]) == {"causal", "mma", "mma_general"} and "square" in index["skipped"]["cca"]
    assert all((tmp_path / "small" / name).is_file() for name in index["pictures"].values())
    # Asked for explicitly, it is an error.
    assert inspect_main(["masks", "--question", "Q?", "--tokenizer", tiny_tokenizer_path, "--model-size", "small",
                         "--modes", "cca", "--out", str(out)]) == 2
    assert "square" in capsys.readouterr().err
    assert inspect_main(["masks", "--question", "Q?", "--image", str(tmp_path / "missing.jpg"),
                         "--tokenizer", tiny_tokenizer_path, "--out", str(out)]) == 2
    assert "missing.jpg" in capsys.readouterr().err


def _manual_share(model, sample, roles, mode):
    """Per layer, the share recomputed by hand: each layer's queries and keys from its own input, RoPE,
    scaled dot products, dense_mask, softmax; then the image rows' mass on question columns."""
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    inputs = []
    hooks = [layer.self_attn.register_forward_pre_hook(lambda m, a, kw: inputs.append((m, kw)), with_kwargs=True)
             for layer in model.llm.model.layers]
    pixels = model.image_processor(sample.images)
    mods = torch.as_tensor(sample.modality_ids)[None]
    with torch.no_grad():
        model(torch.as_tensor(sample.input_ids)[None], mods, pixels)
        for h in hooks:
            h.remove()
        visible = attention.dense_mask(mods, mode, None, model.num_visual_tokens)[:, None]
        shares = []
        for module, kw in inputs:
            hidden = kw["hidden_states"]
            heads, dim = model.llm.config.num_attention_heads, module.head_dim
            qkv = module.qkv_proj(hidden)
            q = qkv[..., :heads * dim].view(1, -1, heads, dim).transpose(1, 2)
            k = qkv[..., heads * dim:2 * heads * dim].view(1, -1, heads, dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, *kw["position_embeddings"])
            scores = (q @ k.transpose(-1, -2)) * dim ** -0.5
            probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)[0]
            image_rows = torch.as_tensor(roles == Role.IMAGE)
            question_cols = torch.as_tensor(roles == Role.QUESTION)
            shares.append(probs[:, image_rows][..., question_cols].sum(-1).mean(0))
    return torch.stack(shares)


@pytest.mark.parametrize("mode", ["causal", "mma"])
def test_attention_share_is_the_eager_forwards_softmax(mode, tiny_model_factory, tiny_tokenizer):
    model = tiny_model_factory(mode, "eager")
    sample, roles = chat_sample(tiny_tokenizer, [("How many circles are there?", "two")], 1,
                                model.num_visual_tokens)
    share = image_question_share(model, sample, roles)
    layers = model.llm.config.num_hidden_layers
    assert share.shape == (layers, model.num_visual_tokens)
    torch.testing.assert_close(share, _manual_share(model, sample, roles, mode), atol=1e-5, rtol=1e-4)
    if mode == "causal":
        assert torch.equal(share, torch.zeros_like(share))
    else:
        assert (share.mean(dim=1) > 0.01).all()   # every layer reads the question


def test_attention_share_needs_the_eager_backend(tiny_model_factory, tiny_tokenizer):
    model = tiny_model_factory("mma", "sdpa")
    sample, roles = chat_sample(tiny_tokenizer, [("How many?", "two")], 1, model.num_visual_tokens)
    with pytest.raises(ValueError, match="eager"):
        image_question_share(model, sample, roles)
