"""Fixtures in the released AKI-4B's formats (reference/OFFICIAL_AKI.md), at tiny sizes.

* :func:`build_phi35_like_tokenizer` — a small BPE tokenizer laid out like Phi-3.5's: ids 0..31999 the
  base vocabulary (most of it unused filler), Phi-3's special tokens at their real ids 32000..32010, pad =
  EOS; loading it with ``load_tokenizer`` adds ``<pad>`` 32011, ``<image>`` 32012, ``<|endofchunk|>`` 32013.
* :func:`write_official_checkpoint` — a released-layout folder (``config.json`` with the official
  constructor kwargs, ``model.safetensors`` with the official keys, tokenizer) with random weights, built
  from the key table of OFFICIAL_AKI.md, plus the SigLIP and Phi-3 folders its config names.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

# Phi-3.5-mini's special tokens and their ids.
PHI3_SPECIALS = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
                 "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]
FIRST_SPECIAL = 32000
ASSISTANT_ID = 32001
TABLE_ROWS = 32064          # Phi-3.5's padded embedding table
# A tiny architecture with the released structure: SigLIP-like tower, resampler with heads of 64.
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)
LLM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
           rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=512, vocab_size=TABLE_ROWS,
           bos_token_id=1, eos_token_id=32000, pad_token_id=32000, tie_word_embeddings=False)
NUM_LATENTS, HEADS, DIM_HEAD, FF_MULT, DEPTH = 4, 2, 64, 2, 1


def build_phi35_like_tokenizer(texts: list[str], path: str | Path) -> str:
    """Save a tokenizer with Phi-3.5's id layout at ``path`` (see the module docstring)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for i in range(len(vocab), FIRST_SPECIAL):
        vocab[f"<unused_{i}>"] = i
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in PHI3_SPECIALS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>",
                                   unk_token="<unk>", pad_token="<|endoftext|>")
    assert fast.convert_tokens_to_ids("<|user|>") == FIRST_SPECIAL + len(PHI3_SPECIALS) - 1
    fast.save_pretrained(str(path))
    return str(path)


def official_state_dict(vision_state: dict, llm_state: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of the released key table: the SigLIP tower (head included) and Phi-3 as given, the
    resampler, added rows and output bias random."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * 0.1

    dim, inner, hidden = VISION["hidden_size"], HEADS * DIM_HEAD, LLM["hidden_size"]
    state = {"vision_encoder." + k.removeprefix("vision_model."): v for k, v in vision_state.items()}
    state["vision_tokenizer.latents"] = rand(NUM_LATENTS, dim)
    for i in range(DEPTH):
        p = f"vision_tokenizer.layers.{i}."
        for norm in ("0.norm_media", "0.norm_latents", "1.0"):
            state[f"{p}{norm}.weight"], state[f"{p}{norm}.bias"] = 1 + rand(dim), rand(dim)
        state[p + "0.to_q.weight"], state[p + "0.to_kv.weight"] = rand(inner, dim), rand(2 * inner, dim)
        state[p + "0.to_out.weight"] = rand(dim, inner)
        state[p + "1.1.weight"], state[p + "1.3.weight"] = rand(FF_MULT * dim, dim), rand(dim, FF_MULT * dim)
    state["vision_tokenizer.norm.weight"], state["vision_tokenizer.norm.bias"] = 1 + rand(dim), rand(dim)
    state["vision_tokenizer.projection.weight"], state["vision_tokenizer.projection.bias"] = \
        rand(hidden, dim), rand(hidden)
    state.update({"lang_model." + k: v for k, v in llm_state.items()})
    state["lang_model.lm_head.bias"] = rand(TABLE_ROWS)
    state["lang_model.model.embed_tokens.additional_embedding.weight"] = rand(2, hidden)
    state["lang_model.lm_head.additional_fc.weight"], state["lang_model.lm_head.additional_fc.bias"] = \
        rand(2, hidden), rand(2)
    return {k: v.contiguous() for k, v in state.items()}


def write_official_checkpoint(root: str | Path, tokenizer_path: str, seed: int = 0) -> dict[str, Path]:
    """``root/siglip``, ``root/phi3`` (the parts' folders) and ``root/aki`` (the released layout)."""
    from safetensors.torch import save_file
    from transformers import Phi3Config, Phi3ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from pipeline.model.tokenizer import load_tokenizer

    root = Path(root)
    torch.manual_seed(seed)
    vision = SiglipVisionModel(SiglipVisionConfig(**VISION, vision_use_head=True))
    llm = Phi3ForCausalLM(Phi3Config(**LLM))
    vision.save_pretrained(root / "siglip")
    llm.save_pretrained(root / "phi3")
    aki = root / "aki"
    aki.mkdir(parents=True)
    save_file(official_state_dict(vision.state_dict(), llm.state_dict(), seed), aki / "model.safetensors",
              metadata={"format": "pt"})
    tokenizer = load_tokenizer(tokenizer_path)
    tokenizer.save_pretrained(str(aki))
    config = {"vision_encoder_path": str(root / "siglip"), "lang_model_path": str(root / "phi3"),
              "pad_token_id": tokenizer.pad_token_id, "initial_tokenizer_len": len(tokenizer) - 2,
              "num_vision_tokens": NUM_LATENTS, "decoder_layers_attr_name": "model.layers",
              "base_img_size": VISION["image_size"], "gradient_checkpointing": False, "tokenizer": None}
    (aki / "config.json").write_text(json.dumps(config, indent=2))
    return {"siglip": root / "siglip", "phi3": root / "phi3", "aki": aki}
