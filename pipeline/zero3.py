"""Building and loading models under ZeRO-3 parameter partitioning.

Under ``deepspeed.zero.Init`` every parameter is cut into per-rank shards the moment its module is
constructed, so no rank ever holds the whole model. Three things then need care, handled here:

* transformers must know ZeRO-3 is on, so that ``from_pretrained`` loads each pretrained tensor straight
  into the shards and ``resize_token_embeddings`` gathers before resizing (:func:`register_zero_config`);
* weight initialisation of random-init parts cannot run on shards (SigLIP's LeCun-normal init needs the
  full shape): construction runs with transformers' ``no_init_weights`` and :func:`init_partitioned`
  then initialises module by module with that module's parameters gathered — torch's default init,
  then the owning transformers model's ``_init_weights``, the order a normal construction applies;
* loading an export folder (the previous stage's weights) gathers one module at a time too
  (:func:`load_export_weights`).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn


class ZeroConfigRef:
    """What transformers' DeepSpeed integration reads from its registered config: ``config`` and
    ``is_zero3()``. (``transformers.HfDeepSpeedConfig`` does the same but needs ``accelerate``, which
    this project does not install.)"""

    def __init__(self, config: dict[str, Any]):
        self.config = config

    def is_zero3(self) -> bool:
        return self.config.get("zero_optimization", {}).get("stage", 0) == 3


def register_zero_config(ds_config: dict[str, Any]) -> ZeroConfigRef:
    """Register ``ds_config`` through transformers' public ``set_hf_deepspeed_config``. transformers keeps
    only a weak reference: hold on to the returned object for as long as models are built or loaded."""
    from transformers.integrations.deepspeed import set_hf_deepspeed_config

    ref = ZeroConfigRef(ds_config)
    set_hf_deepspeed_config(ref)
    return ref


def build_partitioned(factory: Callable[[], nn.Module], ds_config: dict[str, Any],
                      random_init: Callable[[nn.Module], list[nn.Module]] | None) -> nn.Module:
    """``factory()`` under ``zero.Init`` (when the config is ZeRO-3), then initialise ``random_init(model)``'s
    modules with :func:`init_partitioned` (None: every weight is loaded afterwards, nothing to initialise)."""
    import deepspeed

    from pipeline.compat import no_init_weights

    if not ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        return factory()
    with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = factory()
    for module in (random_init(model) if random_init is not None else []):
        init_partitioned(module)
    return model


def _post_order(module: nn.Module, owner: Any = None) -> Iterator[tuple[nn.Module, Any]]:
    """Modules children-first, each with its nearest enclosing transformers ``PreTrainedModel``."""
    from transformers import PreTrainedModel

    owner = module if isinstance(module, PreTrainedModel) else owner
    for child in module.children():
        yield from _post_order(child, owner)
    yield module, owner


def init_partitioned(root: nn.Module) -> None:
    """Initialise ``root``'s weights as a normal construction would, one module at a time (its own and its
    direct children's parameters gathered; rank 0 writes, DeepSpeed broadcasts and re-partitions)."""
    import deepspeed
    import torch.distributed as dist

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    for module, owner in _post_order(root):
        params = list(module.parameters(recurse=False))
        for child in module.children():
            params += list(child.parameters(recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0), torch.no_grad():
            if rank0:
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
                if owner is not None:
                    owner._init_weights(module)


def _export_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    single = folder / "model.safetensors"
    if not single.is_file():
        raise ValueError(f"{folder} holds no model.safetensors (nor an index): not an AKI export folder")
    return [single]


def load_export_weights(model: nn.Module, folder: str | Path) -> None:
    """Copy an export folder's weights into ``model`` (partitioned or not); strict on keys and shapes."""
    import deepspeed
    import torch.distributed as dist
    from safetensors import safe_open

    folder = Path(folder)
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
                   for f in _export_files(folder)]
        where = {key: h for h in handles for key in h.keys()}
        wanted = set(model.state_dict().keys())
        missing, unexpected = sorted(wanted - where.keys()), sorted(where.keys() - wanted)
        if missing or unexpected:
            raise ValueError(f"export {folder} does not match the model: missing {missing[:5]} ({len(missing)}), "
                             f"unexpected {unexpected[:5]} ({len(unexpected)}); was it exported from another size?")
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        for prefix, module in model.named_modules():
            prefix = prefix + "." if prefix else ""
            params = dict(module.named_parameters(recurse=False))
            if params:
                with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
                    if rank0:
                        for name, p in params.items():
                            _copy(p, where[prefix + name].get_tensor(prefix + name), prefix + name)
            for name, b in module.named_buffers(recurse=False):
                if prefix + name in where:   # persistent buffers are not partitioned: every rank copies
                    _copy(b, where[prefix + name].get_tensor(prefix + name), prefix + name)


def _copy(target: torch.Tensor, value: torch.Tensor, key: str) -> None:
    if tuple(target.shape) != tuple(value.shape):
        raise ValueError(f"export weight {key!r} has shape {tuple(value.shape)}, the model expects "
                         f"{tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(value.to(target.dtype))


__all__ = ["ZeroConfigRef", "register_zero_config", "build_partitioned", "init_partitioned",
           "load_export_weights"]
