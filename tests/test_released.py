"""The released AKI-4B, token for token: ids, text layout, mask, architecture and checkpoint conversion.

Everything is checked against OFFICIAL_AKI.md's description, on a tokenizer with Phi-3.5's id layout and a
tiny checkpoint in the released layout (tests/official_fixtures.py), never against this project's own
output alone.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline import chat
from pipeline.convert import ConvertError, from_official, main as convert_main, official_key, to_official
from pipeline.model.attention import dense_mask
from pipeline.model.tokenizer import load_tokenizer, tokenizer_fingerprint
from pipeline.tokens import IMAGE, TEXT_INPUT, TEXT_TARGET

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import TINY_CORPUS  # noqa: E402
from official_fixtures import (ASSISTANT_ID, DEPTH, DIM_HEAD, HEADS, LLM, NUM_LATENTS, VISION,  # noqa: E402
                               build_phi35_like_tokenizer, write_official_checkpoint)

N = NUM_LATENTS
SYSTEM = chat.SYSTEM_MESSAGE


@pytest.fixture(scope="module")
def phi_tok_path(tmp_path_factory):
    return build_phi35_like_tokenizer(TINY_CORPUS, tmp_path_factory.mktemp("phi35") / "tok")


@pytest.fixture(scope="module")
def phi_tok(phi_tok_path):
    return load_tokenizer(phi_tok_path)


@pytest.fixture(scope="module")
def official(tmp_path_factory, phi_tok_path):
    return write_official_checkpoint(tmp_path_factory.mktemp("official"), phi_tok_path)


@pytest.fixture(scope="module")
def converted(official, tmp_path_factory):
    return from_official(official["aki"], tmp_path_factory.mktemp("conv") / "export")


# ---- token ids and text layout -------------------------------------------------------------------------

def test_tokenizer_setup_gives_the_released_ids(phi_tok, phi_tok_path):
    assert (phi_tok.pad_token_id, phi_tok.convert_tokens_to_ids("<image>"),
            phi_tok.convert_tokens_to_ids("<|endofchunk|>")) == (32011, 32012, 32013)
    assert (phi_tok.bos_token_id, phi_tok.eos_token_id, phi_tok.convert_tokens_to_ids("<|assistant|>")) == \
        (1, 32000, ASSISTANT_ID)
    again = load_tokenizer(phi_tok_path)
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(phi_tok) and len(again) == 32014


def expand(ids: list[int], image_id: int) -> list[int]:
    return [t for i in ids for t in ([i] * N if i == image_id else [i])]


def test_sft_sample_is_the_official_text_token_for_token(phi_tok):
    """BOS + the official SFT string tokenized whole + EOS; the target starts right after <|assistant|>."""
    question, answer = "What color is the circle?", "red"
    official_text = (f"<|system|>\n{SYSTEM}<|end|>\n<|user|>\n<image>\n{question}<|end|>\n<|assistant|>\n{answer}")
    want = [1] + expand(phi_tok.encode(official_text, add_special_tokens=False), 32012) + [32000]
    enc = chat.encode(phi_tok, chat.chat_segments([(question, answer)]), N)
    assert enc.input_ids.tolist() == want
    start = want.index(ASSISTANT_ID) + 1
    assert (enc.modality_ids[start:] == TEXT_TARGET).all() and (enc.modality_ids[:start] != TEXT_TARGET).all()
    assert phi_tok.decode(enc.input_ids[start:]) == f"\n{answer}<|endoftext|>"
    assert (np.flatnonzero(enc.modality_ids == IMAGE) == np.flatnonzero(enc.input_ids == 32012)).all()


def test_pretraining_sample_and_prompt_layouts(phi_tok):
    enc = chat.encode(phi_tok, chat.pretrain_segments("a red circle"), N)
    want = [1] + expand(phi_tok.encode("<image>a red circle<|endofchunk|>", add_special_tokens=False), 32012) + [32000]
    assert enc.input_ids.tolist() == want
    assert enc.modality_ids.tolist() == [TEXT_INPUT] + [IMAGE] * N + [TEXT_TARGET] * (len(want) - 1 - N)
    # a generation prompt ends with <|assistant|> (input) and the answer's leading newline (target)
    prompt = chat.encode(phi_tok, chat.chat_segments([("Is it red?", None)]), N)
    assert prompt.input_ids[-2] == ASSISTANT_ID and phi_tok.decode(prompt.input_ids[-1:]) == "\n"
    assert prompt.modality_ids[-2:].tolist() == [TEXT_INPUT, TEXT_TARGET]
    # truncation keeps the final EOS
    long = chat.encode(phi_tok, chat.pretrain_segments("red " * 200), N, max_text_tokens=20)
    assert long.truncated and long.input_ids[-1] == 32000 and (long.modality_ids != IMAGE).sum() == 20


def test_mma_mask_is_the_official_mask(phi_tok):
    """Image tokens also see every token after the image up to and including <|assistant|> (the official
    code finds it by id 32001), never the newline after it nor the answer."""
    enc = chat.encode(phi_tok, chat.chat_segments([("How many squares are there?", "two")]), N)
    ids = enc.input_ids.tolist()
    L = len(ids)
    official = torch.ones(L, L).tril().bool()
    start = ids.index(32012)
    end = start + N
    official[start:end, end:ids.index(ASSISTANT_ID, end) + 1] = True
    ours = dense_mask(torch.as_tensor(enc.modality_ids, dtype=torch.long)[None], "mma")[0]
    assert torch.equal(ours, official)


def test_phi3_chat_layout_stays_available(phi_tok):
    enc = chat.encode(phi_tok, chat.chat_segments([("Q1?", "a"), ("Q2?", "b")], layout="phi3_chat"), N)
    assert phi_tok.decode(enc.input_ids[enc.modality_ids == TEXT_TARGET]) == "a<|end|>b<|end|>"
    with pytest.raises(ValueError, match="one turn per sample"):
        chat.chat_segments([("Q1?", "a"), ("Q2?", "b")])


# ---- the aki-4b architecture ---------------------------------------------------------------------------

def test_aki4b_has_exactly_the_released_shapes():
    from pipeline.model.aki import AKIModel

    with torch.device("meta"):
        model = AKIModel("aki-4b")
    shapes = {official_key(k): tuple(v.shape) for k, v in model.state_dict().items()}
    table = {"vision_tokenizer.latents": (144, 1152), "vision_tokenizer.norm.weight": (1152,),
             "vision_tokenizer.norm.bias": (1152,), "vision_tokenizer.projection.weight": (3072, 1152), "vision_tokenizer.projection.bias": (3072,),
             "lang_model.model.embed_tokens.weight": (32064, 3072),
             "lang_model.model.embed_tokens.additional_embedding.weight": (2, 3072),
             "lang_model.lm_head.weight": (32064, 3072), "lang_model.lm_head.bias": (32064,),
             "lang_model.lm_head.additional_fc.weight": (2, 3072), "lang_model.lm_head.additional_fc.bias": (2,),
             "vision_encoder.post_layernorm.weight": (1152,),
             "vision_encoder.embeddings.position_embedding.weight": (729, 1152),
             "lang_model.model.norm.weight": (3072,)}
    for i in range(6):
        p = f"vision_tokenizer.layers.{i}."
        table.update({p + f"{norm}.{wb}": (1152,) for norm in ("0.norm_media", "0.norm_latents", "1.0")
                      for wb in ("weight", "bias")})
        table.update({p + "0.to_q.weight": (512, 1152), p + "0.to_kv.weight": (1024, 1152),
                      p + "0.to_out.weight": (1152, 512), p + "1.1.weight": (4608, 1152),
                      p + "1.3.weight": (1152, 4608)})
    for key, shape in table.items():
        assert shapes.pop(key) == shape, key
    # nothing else in the resampler, no biases where the release has none, 27 + 32 layers
    assert not [k for k in shapes if k.startswith("vision_tokenizer.")]
    assert {int(k.split(".")[3]) for k in shapes if k.startswith("vision_encoder.encoder.layers.")} == set(range(27))
    assert {int(k.split(".")[3]) for k in shapes if k.startswith("lang_model.model.layers.")} == set(range(32))
    assert not [k for k in shapes if k.startswith("vision_encoder.head.")]      # unused SigLIP head not built
    assert shapes["lang_model.model.layers.0.self_attn.qkv_proj.weight"] == (3 * 3072, 3072)
    assert model.vocab_size == 32014 and model.num_visual_tokens == 144
    rope = model.llm.config.rope_scaling
    assert rope["type"] == "longrope" and len(rope["long_factor"]) == len(rope["short_factor"]) == 48
    assert (model.llm.config.max_position_embeddings, model.llm.config.original_max_position_embeddings) == \
        (131072, 4096)


# ---- conversion ----------------------------------------------------------------------------------------

def reference_logits(state: dict, ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """A plain forward of the released architecture from OFFICIAL_AKI.md, fp32 (independent of pipeline.model)."""
    from transformers import Phi3Config, Phi3ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    vision = SiglipVisionModel(SiglipVisionConfig(**VISION, vision_use_head=True)).eval()
    vision.load_state_dict({"vision_model." + k.removeprefix("vision_encoder."): v for k, v in state.items()
                            if k.startswith("vision_encoder.")})
    x = vision(pixel_values=pixels).last_hidden_state
    s = {k.removeprefix("vision_tokenizer."): v for k, v in state.items() if k.startswith("vision_tokenizer.")}
    lat = s["latents"].expand(x.shape[0], -1, -1)
    dim = lat.shape[-1]
    for i in range(DEPTH):
        p = f"layers.{i}."
        xm = F.layer_norm(x, (dim,), s[p + "0.norm_media.weight"], s[p + "0.norm_media.bias"])
        lm = F.layer_norm(lat, (dim,), s[p + "0.norm_latents.weight"], s[p + "0.norm_latents.bias"])
        q = lm @ s[p + "0.to_q.weight"].T
        k, v = (torch.cat([xm, lm], 1) @ s[p + "0.to_kv.weight"].T).chunk(2, -1)
        q, k, v = (t.unflatten(-1, (HEADS, DIM_HEAD)).transpose(1, 2) for t in (q, k, v))
        attn = torch.softmax(q @ k.transpose(-1, -2) * DIM_HEAD ** -0.5, dim=-1) @ v
        lat = attn.transpose(1, 2).flatten(2) @ s[p + "0.to_out.weight"].T + lat
        h = F.layer_norm(lat, (dim,), s[p + "1.0.weight"], s[p + "1.0.bias"])
        lat = F.gelu(h @ s[p + "1.1.weight"].T) @ s[p + "1.3.weight"].T + lat
    visual = F.linear(F.layer_norm(lat, (dim,), s["norm.weight"], s["norm.bias"]), s["projection.weight"],
                      s["projection.bias"])
    table, added = state["lang_model.model.embed_tokens.weight"], state[
        "lang_model.model.embed_tokens.additional_embedding.weight"]
    embeds = torch.where((ids >= 32012)[..., None], added[(ids - 32012).clamp(min=0)], table[ids.clamp(max=32011)])
    embeds[ids == 32012] = visual.reshape(-1, visual.shape[-1])
    L = ids.shape[1]
    allowed = torch.ones(L, L).tril().bool()
    row = ids[0].tolist()
    start = row.index(32012)
    allowed[start:start + N, start + N:row.index(ASSISTANT_ID) + 1] = True
    mask = torch.zeros(1, 1, L, L).masked_fill(~allowed, float("-inf"))
    llm = Phi3ForCausalLM(Phi3Config(**LLM, attn_implementation="eager")).eval()
    llm.load_state_dict({k.removeprefix("lang_model."): v for k, v in state.items()
                         if k.startswith("lang_model.") and "additional" not in k and k != "lang_model.lm_head.bias"})
    hidden = llm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=torch.arange(L)[None]).last_hidden_state
    base = F.linear(hidden, state["lang_model.lm_head.weight"], state["lang_model.lm_head.bias"])[..., :32012]
    extra = F.linear(hidden, state["lang_model.lm_head.additional_fc.weight"],
                     state["lang_model.lm_head.additional_fc.bias"])
    return torch.cat([base, extra], dim=-1)


def test_converted_model_equals_the_released_architecture(official, converted, phi_tok):
    from safetensors.torch import load_file

    from pipeline.model.aki import AKIModel

    model = AKIModel.from_pretrained(converted)
    assert (model.size.name, model.text_layout, model.attention_mode, model.vocab_size) == \
        ("tiny", "released", "mma", 32014)
    enc = chat.encode(phi_tok, chat.chat_segments([("What color is the circle?", "red")]), N)
    ids = torch.as_tensor(enc.input_ids, dtype=torch.long)[None]
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ours = model(ids, torch.as_tensor(enc.modality_ids, dtype=torch.long)[None], pixels).logits
        want = reference_logits(load_file(official["aki"] / "model.safetensors"), ids, pixels)
    assert ours.shape == want.shape == (1, len(enc.input_ids), 32014)
    assert torch.allclose(ours, want, atol=1e-5, rtol=0), (ours - want).abs().max()


def test_round_trip_is_bit_exact(official, converted, tmp_path):
    from safetensors.torch import load_file

    back = to_official(converted, tmp_path / "back", vision_encoder_path=str(official["siglip"]),
                       lang_model_path=str(official["phi3"]))
    before, after = load_file(official["aki"] / "model.safetensors"), load_file(back / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    # our export uses every official tensor except SigLIP's unused pooling head
    ours = load_file(Path(converted) / "model.safetensors")
    assert len(ours) == len([k for k in before if not k.startswith("vision_encoder.head.")])
    config = json.loads((back / "config.json").read_text())
    assert config == {**json.loads((official["aki"] / "config.json").read_text())}
    assert load_tokenizer(back).convert_tokens_to_ids("<|endofchunk|>") == 32013


def test_sharded_official_checkpoint_converts(official, tmp_path):
    """Other tools write the released layout sharded (an index + shards); the reader accepts it."""
    from safetensors.torch import load_file, save_file
    import shutil

    src = tmp_path / "sharded"
    shutil.copytree(official["aki"], src)
    state = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, src / name, metadata={"format": "pt"})
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: n for n, part in halves.items() for k in part}}))
    out = from_official(src, tmp_path / "export")
    (src / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors.*missing"):
        from_official(src, tmp_path / "export2")
    assert not (tmp_path / "export2").exists() and (out / "aki_config.json").is_file()


def test_bad_inputs_give_one_clear_error_and_write_nothing(official, converted, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    import shutil

    assert convert_main(["from-official", str(converted), str(tmp_path / "o1")]) == 2
    assert "not a released AKI checkpoint: config.json is missing" in capsys.readouterr().err
    bad = tmp_path / "bad"
    shutil.copytree(official["aki"], bad)
    state = load_file(bad / "model.safetensors")
    state["vision_tokenizer.projection.weight"] = torch.zeros(5, VISION["hidden_size"])
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConvertError, match="projection.weight.*shape"):
        from_official(bad, tmp_path / "o2")
    with pytest.raises(ValueError, match="not an AKI export folder"):
        to_official(official["aki"], tmp_path / "o3", "x", "y")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "f").write_text("x")
    with pytest.raises(ConvertError, match="already exists and is not empty"):
        from_official(official["aki"], tmp_path / "taken")
    assert not any(p.name.startswith((".o2", "o2", "o1", "o3")) for p in tmp_path.iterdir())


# ---- fine-tuning through the real trainer (ZeRO-3, 2 ranks) -----------------------------------------------

@pytest.mark.slow
def test_converted_model_fine_tunes_under_zero3_and_converts_back(official, converted, phi_tok, tmp_path):
    from safetensors.torch import load_file

    from dist_utils import show, torchrun, write_dataset

    data = write_dataset(tmp_path / "sft", phi_tok, "sft", 16, num_visual_tokens=N)
    run = tmp_path / "run"
    proc = torchrun(["pipeline.train", "--config", "tiny_sft", "--set", f"train.init_from={converted}",
                     "--set", f"data.datasets=[{{path: {data}}}]", "--set", "train.total_steps=3",
                     "--output-dir", str(run)], nproc=2)
    assert proc.returncode == 0, show(proc)
    back = to_official(run / "export", tmp_path / "back", vision_encoder_path=str(official["siglip"]),
                       lang_model_path=str(official["phi3"]))
    before, after = load_file(official["aki"] / "model.safetensors"), load_file(back / "model.safetensors")
    assert before.keys() == after.keys() and all(before[k].shape == after[k].shape for k in before)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("vision_encoder."))  # frozen
    for trained in ("vision_tokenizer.latents", "lang_model.lm_head.bias",
                    "lang_model.model.embed_tokens.additional_embedding.weight", "lang_model.model.norm.weight"):
        assert not torch.equal(before[trained], after[trained]), trained


@pytest.mark.slow
def test_tokenizer_larger_than_the_size_trains_under_zero3(phi_tok, phi_tok_path, tmp_path):
    """The `tiny` size (512 rows) with a 32014-token tokenizer under ZeRO-3: the table is built large enough
    before partitioning instead of being resized afterwards."""
    from dist_utils import show, torchrun, write_dataset

    data = write_dataset(tmp_path / "pt", phi_tok, "pt", 16, num_visual_tokens=N)
    proc = torchrun(["pipeline.train", "--config", "tiny_pt", "--set", f"model.tokenizer={phi_tok_path}",
                     "--set", f"data.datasets=[{{path: {data}}}]", "--set", "train.total_steps=3",
                     "--output-dir", str(tmp_path / "run")], nproc=2)
    assert proc.returncode == 0, show(proc)
    from pipeline.model.aki import AKIModel
    model = AKIModel.from_pretrained(tmp_path / "run" / "export")
    assert model.vocab_size == 32014 and model.llm.get_input_embeddings().weight.shape[0] == 32064
