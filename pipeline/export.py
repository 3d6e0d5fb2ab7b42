"""Export a training checkpoint as an HF-style folder (safetensors + model config + tokenizer).

Export: DeepSpeed's ``zero_to_fp32`` utilities gather the fp32 master weights (trained connector and
LLM) and the frozen vision tower from the ZeRO-3 shards of one checkpoint; ``AKIModel.save_pretrained``
writes them as safetensors next to ``aki_config.json`` and the tokenizer, so
``AKIModel.from_pretrained(folder)`` reads the result back. The recipe of the run is stored beside it
(``train_recipe.yaml``).

A LoRA run's checkpoints hold the adapters and the connector only: their export is the merged model (an
ordinary export) plus the adapter in PEFT's format in ``adapter/`` (:mod:`pipeline.lora`).

Command line (on demand, for any complete checkpoint)::

    python -m pipeline.export runs/aki4b_pt/checkpoints/step_00002000 exports/aki4b_pt

Loading an export into a ZeRO-3 model (``train.init_from``) is :func:`pipeline.zero3.load_export_weights`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from pipeline.checkpoint import SKELETON, TRAINER_STATE, is_complete, read_json

RECIPE_NAME = "train_recipe.yaml"


def consolidated_state_dict(checkpoint_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """fp32 weights of a ZeRO checkpoint (``{output_dir}/checkpoints/step_N``), keyed like the model."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    path = Path(checkpoint_dir)
    state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    # ZeRO-1/2 give views into one flat buffer, which safetensors refuses to save: copy those out.
    return {k: v.contiguous() if v.untyped_storage().nbytes() == v.numel() * v.element_size() else v.clone()
            for k, v in state.items()}


def export_model(model: torch.nn.Module, checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike,
                 recipe: dict | None = None) -> Path:
    """Write the export folder of ``checkpoint_dir`` using ``model`` (possibly ZeRO-3 partitioned) as the
    skeleton for config and tokenizer. Call on one rank."""
    from pipeline.weights_check import check_finite_state_dict

    out = Path(out_dir)
    state = consolidated_state_dict(checkpoint_dir)
    check_finite_state_dict(state, f"export of {checkpoint_dir}")
    model.save_pretrained(out, state_dict=state)
    if recipe is not None:
        import yaml

        (out / RECIPE_NAME).write_text(yaml.safe_dump(recipe, sort_keys=False))
    return out


def export_checkpoint(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, recipe: dict) -> Path:
    """Export a checkpoint of a run of ``recipe``: consolidated weights, or for a LoRA run (``model.lora``)
    the merged model plus its PEFT adapter (:func:`pipeline.lora.export_lora_checkpoint`). Call on one rank."""
    if recipe["model"].get("lora") is not None:
        from pipeline.lora import export_lora_checkpoint

        return export_lora_checkpoint(checkpoint_dir, out_dir, recipe)
    return export_model(build_skeleton(Path(checkpoint_dir) / SKELETON), checkpoint_dir, out_dir, recipe)


def save_skeleton(model: torch.nn.Module, folder: str | os.PathLike) -> None:
    """Write what rebuilds ``model`` without weights (``aki_config.json`` + tokenizer) into ``folder``."""
    from pipeline.model.loading import CONFIG_NAME, model_config

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(model_config(model), indent=2, sort_keys=True) + "\n")
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(folder))


def build_skeleton(folder: str | os.PathLike) -> torch.nn.Module:
    """An AKIModel on the meta device (no memory) from :func:`save_skeleton`'s folder or an export folder."""
    from pipeline.model.loading import build_from_config, read_config
    from pipeline.model.tokenizer import load_tokenizer

    with torch.device("meta"):
        model = build_from_config(read_config(folder))
    if (Path(folder) / "tokenizer_config.json").is_file():
        model.set_tokenizer(load_tokenizer(folder))
    return model


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.export CKPT_DIR OUT_DIR``: export one complete checkpoint."""
    parser = argparse.ArgumentParser(description="Export a training checkpoint as an AKI export folder.")
    parser.add_argument("checkpoint", help="a complete checkpoint folder: {output_dir}/checkpoints/step_N")
    parser.add_argument("out_dir", help="export folder to write (safetensors + aki_config.json + tokenizer)")
    args = parser.parse_args(argv)
    ckpt = Path(args.checkpoint)
    if not is_complete(ckpt):
        print(f"error: {ckpt} is not a complete checkpoint (missing or invalid COMPLETE marker); pick one of "
              f"{ckpt.parent}/step_* that has it", file=sys.stderr)
        return 2
    from pipeline.weights_check import BrokenWeights

    try:
        out = export_checkpoint(ckpt, args.out_dir, read_json(ckpt / TRAINER_STATE)["config"])
    except BrokenWeights as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"exported {ckpt} to {out}")
    return 0


if __name__ == "__main__":
    from pipeline.process import run_command

    run_command(main)
