"""Export folders: an AKIModel saved as safetensors weights + ``aki_config.json`` + its tokenizer.

``aki_config.json`` records everything needed to rebuild the model without the size registry: the size
name, attention mode, attention backend, N (visual tokens per image), the image side, the vocabulary
(B, the number of base ids: ``<image>`` = B, ``<|endofchunk|>`` = B + 1), the text layout it is prompted
with, and the three parts' configurations (SigLIP vision, Perceiver Resampler, Phi-3). Weights are written with
``huggingface_hub.save_torch_state_dict`` (sharded beyond 5 GB) and read back strictly with
``huggingface_hub.load_torch_model`` — safetensors only, no pickles.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from huggingface_hub import load_torch_model, save_torch_state_dict

from pipeline.model.aki import AKIModel
from pipeline.model.sizes import ModelSize
from pipeline.model.tokenizer import load_tokenizer

CONFIG_NAME = "aki_config.json"
FORMAT_VERSION = 2     # 2: the released AKI-4B's vocabulary (added rows, output bias) and text layouts


def model_config(model: AKIModel) -> dict:
    """The JSON-serialisable description of ``model`` written to ``aki_config.json``."""
    return {
        "format_version": FORMAT_VERSION,
        "size": model.size.name,
        "attention_mode": model.attention_mode,
        "attn_implementation": model.attn_implementation,
        "num_visual_tokens": model.num_visual_tokens,
        "image_size": model.image_size,
        "num_base_ids": model.num_base_ids,
        "text_layout": model.text_layout,
        "vision": model.vision.config.to_diff_dict(),
        "resampler": dataclasses.asdict(model.resampler.config),
        "llm": model.llm.config.to_diff_dict(),
    }


def _check_state_dict(model: AKIModel, state_dict: dict[str, torch.Tensor]) -> None:
    own = model.state_dict(keep_vars=True)   # the parameters themselves: ZeRO-3 ones carry ``ds_shape``
    missing, unexpected = sorted(own.keys() - state_dict.keys()), sorted(state_dict.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"state_dict does not match the model: missing {missing[:5]} ({len(missing)}), "
                         f"unexpected {unexpected[:5]} ({len(unexpected)}); pass the AKIModel's own keys "
                         "(strip wrapper prefixes such as 'module.')")
    for key, tensor in own.items():
        # ZeRO-3 partitioned parameters keep their full shape in ``ds_shape``.
        want = tuple(getattr(tensor, "ds_shape", tensor.shape))
        if tuple(state_dict[key].shape) != want:
            raise ValueError(f"state_dict[{key!r}] has shape {tuple(state_dict[key].shape)}, the model "
                             f"expects {want}")


def save_model(model: AKIModel, folder: str | os.PathLike,
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model`` (or ``state_dict`` for its weights) as an export folder; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if state_dict is None:
        state_dict = model.state_dict()
    else:
        _check_state_dict(model, state_dict)
    save_torch_state_dict({k: v.detach().cpu() for k, v in state_dict.items()}, folder,
                          metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(model_config(model), indent=2, sort_keys=True) + "\n")
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(folder))
    return folder


def read_config(folder: str | os.PathLike) -> dict:
    """Read ``aki_config.json`` of an export folder, with a clear error when it is not one."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{os.fspath(folder)!r} is not an AKI export folder: {CONFIG_NAME} is missing "
                         "(write one with AKIModel.save_pretrained)")
    config = json.loads(path.read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {config.get('format_version')!r}; this code reads "
                         f"version {FORMAT_VERSION} (version 1 exports predate the released AKI-4B's token ids: "
                         "re-train or re-export them with this version)")
    return config


def build_from_config(config: dict, attn_implementation: str | None = None, attention_mode: str | None = None,
                      dtype: torch.dtype | None = None) -> AKIModel:
    """An :class:`AKIModel` (random weights) of the architecture ``aki_config.json`` describes.

    ``attn_implementation`` / ``attention_mode`` override the stored ones (e.g. ``sdpa`` for CPU
    inference of a model trained with FlexAttention); ``dtype`` casts the weights.
    """
    size = ModelSize(name=config["size"], vision=config["vision"], resampler=config["resampler"],
                     llm=config["llm"], num_base_ids=config["num_base_ids"])
    return AKIModel(size, attention_mode=attention_mode or config["attention_mode"],
                    attn_implementation=attn_implementation or config["attn_implementation"], dtype=dtype,
                    num_base_ids=config["num_base_ids"], text_layout=config["text_layout"])


def load_model(folder: str | os.PathLike, attn_implementation: str | None = None,
               attention_mode: str | None = None, dtype: torch.dtype | None = None) -> AKIModel:
    """Rebuild an :class:`AKIModel` from an export folder, in eval mode (overrides as
    :func:`build_from_config`)."""
    config = read_config(folder)
    model = build_from_config(config, attn_implementation, attention_mode, dtype)
    try:
        load_torch_model(model, folder, strict=True, safe=True)
    except RuntimeError as err:
        raise ValueError(f"weights in {os.fspath(folder)!r} do not match {CONFIG_NAME}: {err}") from err
    if (Path(folder) / "tokenizer_config.json").is_file():
        model.set_tokenizer(load_tokenizer(folder))
    return model.eval()


__all__ = ["CONFIG_NAME", "model_config", "save_model", "read_config", "build_from_config", "load_model"]
