"""DeepSpeed JSONs (``ds_configs/``) filled from a recipe.

The JSONs leave batch sizes, clipping and precision as ``"auto"``; :func:`fill_deepspeed_config` fills
them from the recipe. The optimizer (AdamW) and the LR schedule are not in the JSONs: the trainer builds
them in PyTorch from ``optim`` (``torch.optim.AdamW`` and ``transformers.get_scheduler(optim.scheduler,
..., scheduler_specific_kwargs=optim.scheduler_kwargs())``) and hands them to ``deepspeed.initialize``, so
every learning-rate fact lives in the recipe.
"""
from __future__ import annotations

import json
from typing import Any

from pipeline.config import REPO_ROOT, Config, resolve_path
from pipeline.validation import grad_accum_steps
from pipeline.recipes import ConfigError


def _deepspeed_auto_values(config: Config, world_size: int) -> dict[str, Any]:
    """The value of every ``"auto"`` a DeepSpeed JSON may hold, by dotted key."""
    from pipeline.model.sizes import get_model_size

    t, o = config.train, config.optim
    hidden = int(get_model_size(config.model.size).llm["hidden_size"])
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps(config, world_size),
        "gradient_clipping": o.grad_clip,
        "bf16.enabled": t.precision == "bf16",
        "fp16.enabled": False,
        "steps_per_print": t.log_every,
        # Bucket sizes from the LLM width, as transformers' DeepSpeed integration sets them.
        "zero_optimization.reduce_bucket_size": hidden * hidden,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden,
    }


# Keys the recipe owns: a literal value in the JSON that disagrees is an error, not a silent override.
_MUST_MATCH = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
               "gradient_clipping", "bf16.enabled")


def fill_deepspeed_config(config: Config, world_size: int) -> dict[str, Any]:
    """Read ``train.deepspeed`` and replace every ``"auto"`` with the recipe's value.

    An ``"auto"`` this function does not know, or an ``optimizer`` / ``scheduler`` section (those come
    from the recipe's ``optim``), is a ConfigError naming the key.
    """
    path = resolve_path(config.train.deepspeed)
    try:
        with open(path) as f:
            ds = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config `train.deepspeed`: {path} does not exist; "
                          f"shipped: {', '.join(sorted(p.name for p in (REPO_ROOT / 'ds_configs').glob('*.json')))}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(f"DeepSpeed config {path} has a `{section}` section; remove it: the trainer "
                              "builds AdamW and the LR schedule from the recipe's `optim` section")
    values = _deepspeed_auto_values(config, world_size)

    def fill(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            dotted = prefix + key
            if isinstance(value, dict):
                fill(value, dotted + ".")
            elif dotted in _MUST_MATCH and value != "auto" and value != values[dotted]:
                raise ConfigError(f"DeepSpeed config {path} sets `{dotted}` to {value!r} but the recipe gives "
                                  f"{values[dotted]!r}; write \"auto\" there so the recipe decides")
            elif value == "auto":
                if dotted not in values:
                    raise ConfigError(f"DeepSpeed config {path}: `{dotted}` is \"auto\" but the recipe does not "
                                      f"define it; give a value (auto is known for: {', '.join(values)})")
                node[key] = values[dotted]

    fill(ds, "")
    return ds


def offloads_optimizer(ds_config: dict[str, Any]) -> bool:
    """True when the DeepSpeed config keeps optimizer states on the CPU (``zero3_offload.json``).

    DeepSpeed then wants ``deepspeed.ops.adam.DeepSpeedCPUAdam(params, adamw_mode=True, ...)`` as the
    client optimizer instead of ``torch.optim.AdamW`` (same AdamW update, run on the CPU).
    """
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)
