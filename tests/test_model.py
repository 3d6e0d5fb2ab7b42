"""AKIModel: wiring, loss, no answer leak under MMA, equality with plain Phi-3, export/reload, bad input."""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.model.aki import AKIModel
from pipeline.tokens import IMAGE, PAD, TEXT_INPUT, TEXT_TARGET


def batch_for(model, mods, seed=0):
    """Random ids and images for a layout (IMAGE slots hold the image token, as encoded data does)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 400, mods.shape, generator=gen)
    ids[mods == IMAGE] = model.tokenizer.convert_tokens_to_ids("<image>")
    n_images = int((mods == IMAGE).sum()) // model.num_visual_tokens
    pixels = torch.rand(n_images, 3, model.image_size, model.image_size, generator=gen) * 2 - 1
    return ids, pixels


@pytest.mark.parametrize("mode", ["mma", "mma_general"])
@pytest.mark.parametrize("multi_turn", [False, True])
def test_answer_tokens_never_leak_backwards(mode, multi_turn, tiny_model_factory, make_layout):
    """Changing a TEXT_TARGET token changes no logit before it (so none at the prompt's TEXT_INPUT/IMAGE
    positions) and none in other documents; it does change logits after it (the causal path)."""
    model = tiny_model_factory(mode)
    rng = np.random.default_rng(4 + multi_turn)
    mods, docs = make_layout(rng, batch=2, num_visual_tokens=model.num_visual_tokens, multi_turn=multi_turn)
    ids, pixels = batch_for(model, mods)
    with torch.no_grad():
        base = model(ids, mods, pixels, docs).logits
    targets = (mods == TEXT_TARGET).nonzero().tolist()
    for b, j in [targets[i] for i in rng.choice(len(targets), size=6, replace=False)]:
        changed = ids.clone()
        changed[b, j] = (ids[b, j] + 7) % 400
        with torch.no_grad():
            out = model(changed, mods, pixels, docs).logits
        differs = (out != base).any(dim=-1)
        same_doc = docs[b] == docs[b, j]
        assert not differs[b, :j].any(), f"target token at {j} changed a logit before it"
        assert not differs[b][~same_doc].any() and not differs[1 - b].any()
        assert differs[b, j], "the changed token's own position must change"
        if not multi_turn:
            prompt = (mods[b] == TEXT_INPUT) | (mods[b] == IMAGE)
            assert not differs[b][prompt].any()


@pytest.mark.parametrize("mode", ["causal", "mma", "mma_general", "cca"])
def test_packed_documents_equal_documents_alone(mode, tiny_model_factory, make_layout):
    model = tiny_model_factory(mode)
    mods, docs = make_layout(np.random.default_rng(6), batch=1, num_visual_tokens=model.num_visual_tokens,
                             max_docs=3)
    ids, pixels = batch_for(model, mods)
    with torch.no_grad():
        packed = model(ids, mods, pixels, docs).logits[0]
        image_index = 0
        for d in docs[0].unique().tolist():
            sel = docs[0] == d
            n_img = int((mods[0][sel] == IMAGE).sum()) // model.num_visual_tokens
            alone = model(ids[:, sel], mods[:, sel], pixels[image_index:image_index + n_img]).logits[0]
            image_index += n_img
            # shorter rows, other summation order: measured at most 2.1e-7 apart (fp32, 2-core x86 CPU)
            torch.testing.assert_close(packed[sel], alone, atol=3e-6, rtol=1e-6)


def test_causal_mode_equals_plain_phi3(tiny_model_factory):
    model = tiny_model_factory("causal")
    mods = torch.tensor([[TEXT_INPUT] * 3 + [IMAGE] * model.num_visual_tokens + [TEXT_INPUT] * 4 +
                         [TEXT_TARGET] * 5])
    ids, pixels = batch_for(model, mods)
    with torch.no_grad():
        ours = model(ids, mods, pixels).logits
        embeds = model.embed(ids, mods, pixels)
        # Phi3Model's own causal mask and positions, then the same output layer
        plain = model.logits(model.llm.model(inputs_embeds=embeds).last_hidden_state)
    assert torch.equal(ours, plain)


def test_loss_is_mean_cross_entropy_over_predicted_targets(tiny_model_factory, make_layout):
    model = tiny_model_factory("mma")
    mods, docs = make_layout(np.random.default_rng(7), batch=3, num_visual_tokens=model.num_visual_tokens)
    # A document that starts with TEXT_TARGET right after another one: its first token has no predictor.
    mods[0, :4] = torch.tensor([TEXT_INPUT, TEXT_TARGET, TEXT_TARGET, TEXT_TARGET])
    docs[0, :4] = torch.tensor([1, 1, 2, 2])
    ids, pixels = batch_for(model, mods)
    out = model(ids, mods, pixels, docs)
    terms = [F.cross_entropy(out.logits[b, t - 1], ids[b, t], reduction="sum")
             for b, t in (mods == TEXT_TARGET).nonzero().tolist()
             if docs[b, t] == docs[b, t - 1]]
    assert int(out.num_target_tokens) == len(terms) == int((mods == TEXT_TARGET).sum()) - 1
    torch.testing.assert_close(out.loss_sum, torch.stack(terms).sum())
    torch.testing.assert_close(out.loss, out.loss_sum / len(terms))
    no_logits = model(ids, mods, pixels, docs, return_logits=False)
    assert no_logits.logits is None
    torch.testing.assert_close(no_logits.loss_sum, out.loss_sum)


def test_visual_tokens_fill_image_slots_in_order(tiny_model_factory):
    model = tiny_model_factory()
    n = model.num_visual_tokens
    mods = torch.tensor([[TEXT_INPUT] + [IMAGE] * 2 * n + [TEXT_TARGET] * 2,
                         [TEXT_INPUT] * 2 + [IMAGE] * n + [TEXT_INPUT, TEXT_TARGET] + [PAD] * (n - 1)])
    ids, pixels = batch_for(model, mods)
    with torch.no_grad():
        embeds = model.embed(ids, mods, pixels)
        visual = model.encode_images(pixels)
        text = model.embed_tokens(ids)
    assert torch.equal(embeds[mods == IMAGE].view(3, n, -1), visual)
    assert torch.equal(embeds[mods != IMAGE], text[mods != IMAGE])


def test_training_updates_connector_and_llm_never_vision(tiny_model_factory):
    model = tiny_model_factory().train()
    assert not model.vision.training and model.llm.training
    mods = torch.tensor([[TEXT_INPUT] + [IMAGE] * model.num_visual_tokens + [TEXT_TARGET] * 3])
    ids, pixels = batch_for(model, mods)
    model(ids, mods, pixels).loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.vision.parameters())
    trained = [model.resampler, model.projection, model.llm]
    assert all(p.grad is not None for part in trained for p in part.parameters() if p.requires_grad)
    assert model.resampler.latents.grad.abs().sum() > 0


def test_text_only_batch_still_runs_the_connector(tiny_model_factory):
    """Every rank must touch the same parameters each step (ZeRO-3), even without images."""
    model = tiny_model_factory().train()
    mods = torch.tensor([[TEXT_INPUT] * 3 + [TEXT_TARGET] * 3])
    ids, _ = batch_for(model, mods)
    out = model(ids, mods, None)
    out.loss.backward()
    assert all(p.grad is not None for p in model.resampler.parameters())
    assert model.projection.weight.grad is not None and not model.projection.weight.grad.any()


def test_bad_input_is_a_clear_error(tiny_model_factory):
    model = tiny_model_factory()
    n = model.num_visual_tokens
    mods = torch.tensor([[TEXT_INPUT] + [IMAGE] * n + [TEXT_TARGET] * 2])
    ids, pixels = batch_for(model, mods)
    with pytest.raises(ValueError, match="same shape"):
        model(ids[:, :-1], mods, pixels)
    with pytest.raises(ValueError, match="pixel_values has 2 images but the batch has 1 image"):
        model(ids, mods, torch.cat([pixels, pixels]))
    with pytest.raises(ValueError, match="pixel_values has 0 images but the batch has 1"):
        model(ids, mods, None)
    short = torch.tensor([[TEXT_INPUT] + [IMAGE] * (n - 2) + [TEXT_TARGET] * 2])
    with pytest.raises(ValueError, match=f"IMAGE run of {n - 2} slots.*num_visual_tokens={n}"):
        model(ids[:, :short.shape[1]], short, pixels)
    with pytest.raises(ValueError, match=r"pixel_values must be \[n_images, 3, 32, 32\]"):
        model(ids, mods, torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="modality_ids hold values outside"):
        model(ids, torch.full_like(mods, 7), None)


def test_export_reloads_with_identical_logits(tiny_model_factory, tiny_tokenizer, tmp_path):
    from pipeline.model.tokenizer import tokenizer_fingerprint

    model = tiny_model_factory("mma_general")
    model.save_pretrained(tmp_path / "export")
    assert (tmp_path / "export" / "model.safetensors").is_file()
    loaded = AKIModel.from_pretrained(tmp_path / "export")
    assert loaded.attention_mode == "mma_general" and loaded.num_visual_tokens == model.num_visual_tokens
    assert tokenizer_fingerprint(loaded.tokenizer) == tokenizer_fingerprint(tiny_tokenizer)
    mods = torch.tensor([[TEXT_INPUT] * 2 + [IMAGE] * model.num_visual_tokens + [TEXT_TARGET] * 3])
    ids, pixels = batch_for(model, mods)
    with torch.no_grad():
        assert torch.equal(loaded(ids, mods, pixels).logits, model(ids, mods, pixels).logits)

    # Weights handed over explicitly (as consolidated from ZeRO-3 shards) are the ones written.
    state = {k: v * 2 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "doubled", state_dict=state)
    doubled = AKIModel.from_pretrained(tmp_path / "doubled")
    assert all(torch.equal(doubled.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match="missing .*projection.bias"):
        model.save_pretrained(tmp_path / "bad", state_dict={k: v for k, v in state.items()
                                                             if k != "projection.bias"})


def test_reload_is_strict(tiny_model_factory, tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model_factory()
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["projection.extra"] = torch.zeros(1)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="projection.extra"):
        AKIModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not an AKI export folder"):
        AKIModel.from_pretrained(tmp_path / "nowhere")


def test_parts_load_from_pretrained_folders(tiny_model_factory, tiny_size, tmp_path):
    """The path real SigLIP / Phi-3.5 weights take: each part's own from_pretrained."""
    model = tiny_model_factory()
    model.vision.save_pretrained(tmp_path / "vision")
    model.llm.save_pretrained(tmp_path / "llm")
    rebuilt = AKIModel(tiny_size, tokenizer=model.tokenizer, vision_weights=tmp_path / "vision",
                       llm_weights=tmp_path / "llm")
    for part in ("vision", "llm"):
        want = getattr(model, part).state_dict()
        assert all(torch.equal(v, want[k]) for k, v in getattr(rebuilt, part).state_dict().items())
    wrong = dataclasses.replace(tiny_size, llm={**tiny_size.llm, "hidden_size": 32})
    with pytest.raises(ValueError, match="hidden_size=64, but size 'tiny' expects 32"):
        AKIModel(wrong, llm_weights=tmp_path / "llm")


def test_tokenizer_larger_than_the_size_builds_a_larger_table(tiny_size, tiny_tokenizer):
    """A random-init LLM is built with rows for every base id (no resize later, which ZeRO-3 cannot do);
    the logits cover exactly the tokenizer's ids, ``<image>`` and ``<|endofchunk|>`` last."""
    small_vocab = dataclasses.replace(tiny_size, llm={**tiny_size.llm, "vocab_size": 256})
    model = AKIModel(small_vocab, tokenizer=tiny_tokenizer)
    rows = model.llm.get_input_embeddings().weight.shape[0]
    image_id = tiny_tokenizer.convert_tokens_to_ids("<image>")
    assert rows >= image_id and rows % 64 == 0 and model.llm.lm_head.weight.shape[0] == rows
    assert model.num_base_ids == image_id and model.vocab_size == len(tiny_tokenizer) == image_id + 2
    assert model.llm.config.pad_token_id == tiny_tokenizer.pad_token_id
    mods = torch.tensor([[TEXT_INPUT] * 2 + [IMAGE] * model.num_visual_tokens + [TEXT_TARGET] * 3])
    ids, pixels = batch_for(model, mods)
    with torch.no_grad():
        assert model(ids, mods, pixels).logits.shape[-1] == len(tiny_tokenizer)


def test_image_processor_reads_jpeg_bytes(tiny_model_factory):
    model = tiny_model_factory()
    buf = io.BytesIO()
    Image.new("RGB", (50, 40), (255, 0, 128)).save(buf, format="JPEG", quality=100)
    pixels = model.image_processor([buf.getvalue(), Image.new("L", (8, 8), 0)])
    assert pixels.shape == (2, 3, model.image_size, model.image_size) and pixels.dtype == torch.float32
    red, green, blue = pixels[0].mean(dim=(1, 2)).tolist()
    assert red > 0.95 and green < -0.95 and abs(blue) < 0.05   # (x / 255 - 0.5) / 0.5
    assert torch.equal(pixels[1], torch.full_like(pixels[1], -1.0))
    with pytest.raises(ValueError, match="cannot read an image from 9 bytes"):
        model.image_processor([b"not a jpg"])


def test_images_at_input_size_skip_the_resize_with_the_same_pixels(tiny_model_factory):
    from pipeline.compat import SiglipImageProcessor

    model = tiny_model_factory()
    side = model.image_size
    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(3):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
    reference = SiglipImageProcessor(size={"height": side, "width": side})(
        [Image.open(io.BytesIO(j)) for j in jpegs], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(model.image_processor(jpegs), reference, rtol=0, atol=1e-6)


def test_vision_weight_names_are_the_same_on_every_transformers_version(tiny_model_factory):
    # transformers 5 flattened SiglipVisionModel; exports trained on 4.57 load on 5.x only if the names match
    keys = [k for k in tiny_model_factory().state_dict() if k.startswith("vision.")]
    assert keys and all(k.startswith("vision.vision_model.") for k in keys)
