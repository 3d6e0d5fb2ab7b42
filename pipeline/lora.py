"""LoRA and QLoRA fine-tuning of AKI through PEFT: the recipe section, the wrapped model, merged exports.

``model.lora:`` in a recipe (:class:`LoraConfig`) turns a run into a LoRA run:

* the base model comes from ``train.init_from`` (an AKI export, e.g. a converted released AKI-4B) and
  stays frozen; :func:`apply_lora` injects PEFT LoRA layers (``peft.inject_adapter_in_model``) into the
  LLM's attention and MLP linear layers only (:func:`target_pattern`: a full-match regex under
  ``llm.model.layers``), so the SigLIP tower is never wrapped; the connector (Perceiver Resampler +
  projection) trains in full when ``train_connector`` is true, as AKI's SFT trains it;
* with ``quantize: nf4`` (QLoRA) the targeted base layers are first replaced by bitsandbytes 4-bit layers
  (:func:`quantize_llm`); :func:`quantization_problem` says up front why a machine or engine cannot;
* checkpoints hold the trainable state only (DeepSpeed's ``exclude_frozen_parameters``); on resume the
  frozen base is read again from ``train.init_from``, which no checkpoint rewrites;
* :func:`export_lora_checkpoint` writes the merged model (``merge_and_unload``) as an ordinary AKI export,
  and the adapter alone in PEFT's format in its ``adapter/`` folder (``adapter_config.json`` +
  ``adapter_model.safetensors``, the connector as ``modules_to_save``), which
  ``peft.PeftModel.from_pretrained(AKIModel.from_pretrained(base), folder)`` loads onto the base.

Recipe checks are in :mod:`pipeline.validation` (``_validate_lora``, ``_validate_lora_launch``).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Phi-3's linear layers in each decoder block: the attention's and the MLP's (the default targets).
LLM_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# Linear layers elsewhere in AKI, and why they take no LoRA.
NOT_TARGETS = {
    **{name: "a layer of the SigLIP vision tower (frozen, never wrapped)"
       for name in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "patch_embedding", "vision")},
    **{name: "a layer of the connector (trained in full: model.lora.train_connector)"
       for name in ("to_q", "to_kv", "to_out", "projection", "resampler")},
    **{name: "a part of the frozen vocabulary (input table, LM head, added rows)"
       for name in ("lm_head", "embed_tokens", "head", "output", "added_embedding")},
}
CONNECTOR = ("resampler", "projection")
QUANTIZATIONS = ("nf4", "fp4")
ADAPTER_DIR = "adapter"


@dataclasses.dataclass
class LoraConfig:
    """LoRA fine-tuning (``model.lora:``): low-rank adapters on the LLM, the rest of the base frozen."""

    rank: int = 64
    """Rank r of each adapter (lora_A: r x in, lora_B: out x r)."""
    alpha: float = 128.0
    """Scale numerator: the adapter's update is (alpha / rank) · B·A."""
    dropout: float = 0.05
    """Dropout on the adapter's input during training."""
    target_modules: list[str] = dataclasses.field(default_factory=lambda: list(LLM_TARGETS))
    """Names of the LLM linear layers that get adapters, in every decoder block (one of LLM_TARGETS each)."""
    train_connector: bool = True
    """Train the connector (Perceiver Resampler + projection) in full, as AKI's SFT does; false: frozen."""
    quantize: str | None = None
    """QLoRA: hold the targeted base layers in 4 bits through bitsandbytes ("nf4" or "fp4"); None: no."""


def target_pattern(lora: LoraConfig) -> str:
    """The full-match regex of the wrapped module names: only inside the LLM's decoder blocks."""
    return r"llm\.model\.layers\.\d+\.(self_attn|mlp)\.(" + "|".join(lora.target_modules) + ")"


def peft_config(lora: LoraConfig, modules_to_save: list[str] | None = None):
    """The ``peft.LoraConfig`` of a recipe's ``model.lora``."""
    import peft

    return peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                           target_modules=target_pattern(lora), modules_to_save=modules_to_save, bias="none")


def trainable_modules(lora: LoraConfig) -> list[str]:
    """Top-level AKI modules trained in full alongside the adapters."""
    return list(CONNECTOR) if lora.train_connector else []


# --------------------------------------------------------------------------- QLoRA (bitsandbytes 4-bit)


def quantization_problem(lora: LoraConfig, zero_stage: int) -> str | None:
    """Why QLoRA cannot run here (None: it can): bitsandbytes missing, its 4-bit layers failing on this
    machine (one tiny forward and backward is tried), or ZeRO-3 (which would partition the packed 4-bit
    weights)."""
    if lora.quantize is None:
        return None
    if zero_stage == 3:
        return ("QLoRA (model.lora.quantize) keeps the base in bitsandbytes 4-bit layers, which ZeRO-3 cannot "
                "partition; use train.deepspeed=ds_configs/zero2_single_gpu.json (the 4-bit base fits one GPU)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        return f"QLoRA (model.lora.quantize) needs bitsandbytes ({err}); install it with pip install '.[qlora]'"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        layer = _quantized(nn.Linear(64, 64, bias=False), lora.quantize, torch.float32).to(device)
        x = torch.ones(2, 64, device=device, requires_grad=True)
        layer(x).sum().backward()
    except Exception as err:   # any failure of the library's kernels on this machine
        return (f"QLoRA (model.lora.quantize={lora.quantize}): bitsandbytes' 4-bit layers do not run on this "
                f"machine ({device}: {type(err).__name__}: {err}); train without model.lora.quantize, or on a "
                "GPU bitsandbytes supports")
    return None


def _quantized(linear: nn.Linear, quant_type: str, compute_dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` holding ``linear``'s weights (packed when it reaches its device)."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, quant_type=quant_type, device="meta")
    layer.weight = bnb.nn.Params4bit(linear.weight.data.to(compute_dtype), requires_grad=False,
                                     quant_type=quant_type)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return layer


def quantize_llm(model: nn.Module, lora: LoraConfig, compute_dtype: torch.dtype = torch.float32) -> int:
    """Replace each targeted base layer with its 4-bit version computing in ``compute_dtype`` (the training
    precision), on the layer's device; returns how many."""
    import re

    pattern, replaced = re.compile(target_pattern(lora)), 0
    for name, module in list(model.named_modules()):
        if pattern.fullmatch(name) and isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            device = module.weight.device
            setattr(model.get_submodule(parent), child,
                    _quantized(module, lora.quantize, compute_dtype).to(device))
            replaced += 1
    return replaced


# --------------------------------------------------------------------------- the training model


def apply_lora(model: nn.Module, lora: LoraConfig, seed: int = 0,
               compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Freeze ``model`` (an AKIModel, possibly ZeRO-3 partitioned), quantize the targets for QLoRA, inject
    the adapters (seeded: every rank draws the same initial lora_A) and unfreeze the connector when it
    trains. Adapter parameters created after ``zero.Init`` are partitioned by ``deepspeed.initialize``.
    ``compute_dtype``: the training precision, in which QLoRA's 4-bit layers compute."""
    import peft

    _check_targets(model, lora)
    model.requires_grad_(False)
    if lora.quantize is not None:
        quantize_llm(model, lora, compute_dtype)
    torch.manual_seed(seed)
    peft.inject_adapter_in_model(peft_config(lora), model)
    for name in trainable_modules(lora):
        getattr(model, name).requires_grad_(True)
    return model


def _check_targets(model: nn.Module, lora: LoraConfig) -> None:
    import re

    found = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if re.fullmatch(target_pattern(lora), name)}
    missing = sorted(set(lora.target_modules) - found)
    if missing:
        raise ValueError(f"model.lora.target_modules {missing} match no layer of this model's LLM; it has "
                         f"{sorted(found)}")


def is_adapter_parameter(name: str) -> bool:
    return ".lora_" in name


def trainable_parameter_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def load_trainable(src: dict[str, torch.Tensor], dst: nn.Module) -> None:
    """DeepSpeed ``custom_load_fn`` of a checkpoint saved with ``exclude_frozen_parameters``: loads what the
    checkpoint holds and refuses one that lacks a trainable parameter or holds an unknown key (the frozen
    base is in the model already, read from ``train.init_from``)."""
    result = dst.load_state_dict(src, strict=False)
    trainable = set(trainable_parameter_names(dst))
    lacking = sorted(trainable & set(result.missing_keys))
    if lacking or result.unexpected_keys:
        raise RuntimeError(f"LoRA checkpoint does not match the model: lacks trainable {lacking[:5]} "
                           f"({len(lacking)}), unknown {sorted(result.unexpected_keys)[:5]} "
                           f"({len(result.unexpected_keys)}); resume with the recipe (model.lora) it was saved with")


# --------------------------------------------------------------------------- export


def export_lora_checkpoint(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike,
                           recipe: dict[str, Any]) -> Path:
    """Write ``out_dir``: the merged model as an AKI export, and ``out_dir/adapter`` in PEFT's format.

    The base is read from the recipe's ``train.init_from`` (fp32, on the CPU), the trained state from the
    checkpoint's fp32 partitions (adapters, and the connector when it trained). Call on one rank.
    """
    import peft
    import yaml
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pipeline.export import RECIPE_NAME
    from pipeline.model.loading import load_model
    from pipeline.recipes import build_dataclass

    lora = build_dataclass(LoraConfig, recipe["model"]["lora"], "model.lora.")
    init_from = recipe["train"]["init_from"]
    path = Path(checkpoint_dir)
    trained = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name,
                                                       exclude_frozen_parameters=True)
    base = load_model(init_from)
    model = peft.get_peft_model(base, peft_config(lora, trainable_modules(lora) or None))
    model.peft_config["default"].base_model_name_or_path = os.fspath(init_from)
    # PEFT's saved-adapter keys: no adapter name; modules_to_save (the connector) under their own names
    result = peft.set_peft_model_state_dict(
        model, {"base_model.model." + k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."):
                v.contiguous() for k, v in trained.items()})
    lacking = [k for k in result.missing_keys if ".lora_" in k or ".modules_to_save." in k]
    if result.unexpected_keys or lacking:
        raise ValueError(f"checkpoint {path} does not match model.lora of its recipe: it holds unknown "
                         f"{sorted(result.unexpected_keys)[:5]} and lacks {lacking[:5]}")
    out = Path(out_dir)
    model.save_pretrained(str(out / ADAPTER_DIR), save_embedding_layers=False)
    merged = model.merge_and_unload()
    merged.save_pretrained(out)
    (out / RECIPE_NAME).write_text(yaml.safe_dump(recipe, sort_keys=False))
    return out


__all__ = ["LLM_TARGETS", "NOT_TARGETS", "QUANTIZATIONS", "ADAPTER_DIR", "LoraConfig", "target_pattern",
           "peft_config", "trainable_modules", "quantization_problem", "quantize_llm", "apply_lora",
           "load_trainable", "export_lora_checkpoint", "is_adapter_parameter"]
