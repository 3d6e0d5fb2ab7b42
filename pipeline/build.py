"""A run's parts built from its recipe: the tokenizer, the model and the DeepSpeed engine.

:func:`build_model` builds AKI under ``deepspeed.zero.Init`` (ZeRO-3: each parameter partitioned as it is
created), loads pretrained parts and ``train.init_from``, and adds LoRA adapters (``model.lora``);
:func:`build_engine` wraps it with the recipe's AdamW and LR schedule in a DeepSpeed engine. Used by the
trainer (:mod:`pipeline.train`) and the train-step benchmark (``bench.train_step``).
"""
from __future__ import annotations

from typing import Any

import torch

from pipeline.config import Config, ConfigError
from pipeline.optim import build_optimizer


def load_run_tokenizer(config: Config):
    """The tokenizer: ``model.tokenizer``, else the one saved in ``train.init_from``, else the LLM weights'."""
    from pipeline.model.sizes import get_model_size
    from pipeline.model.tokenizer import load_tokenizer

    source = config.model.tokenizer or config.train.init_from or config.model.llm_weights \
        or get_model_size(config.model.size).llm_weights
    if source is None:
        raise ConfigError("no tokenizer: set `model.tokenizer` (a tokenizer folder), `train.init_from` or "
                          "`model.llm_weights`")
    return load_tokenizer(source)


def build_model(config: Config, ds_config: dict[str, Any], tokenizer, load_init_weights: bool):
    """AKIModel built under ``deepspeed.zero.Init`` (ZeRO-3): parameters are partitioned as they are made.

    Pretrained parts load through ``from_pretrained`` (straight into the shards); random-init parts are
    initialised module by module; ``train.init_from`` loads a previous stage's export over everything.
    """
    from pipeline.model.aki import AKIModel
    from pipeline.model.loading import read_config
    from pipeline.model.sizes import ModelSize, get_model_size
    from pipeline.zero3 import build_partitioned, load_export_weights

    m, init_from = config.model, config.train.init_from
    size = get_model_size(m.size)
    vision_weights = llm_weights = None
    if init_from is not None:
        stored = read_config(init_from)
        if stored["size"] != m.size:
            raise ConfigError(f"`train.init_from` {init_from} holds a {stored['size']!r} model but `model.size` "
                              f"is {m.size!r}; set model.size={stored['size']}")
        size = ModelSize(name=stored["size"], vision=stored["vision"], resampler=stored["resampler"],
                         llm=stored["llm"], num_base_ids=stored["num_base_ids"])
    else:
        vision_weights, llm_weights = m.vision_weights or size.vision_weights, m.llm_weights or size.llm_weights

    def random_parts(model: AKIModel) -> list[torch.nn.Module]:
        if init_from is not None:
            return []                       # every weight comes from the export (or the resumed checkpoint)
        return ([] if vision_weights else [model.vision]) + [model.resampler, model.projection,
                                                              model.added_embedding, model.output] + \
            ([] if llm_weights else [model.llm])

    torch.manual_seed(config.train.seed)
    model = build_partitioned(
        lambda: AKIModel(size, tokenizer, attention_mode=m.attention_mode, attn_implementation=m.attn_implementation,
                         text_layout=m.text_layout,
                         vision_weights=vision_weights, llm_weights=llm_weights),
        ds_config, random_parts)
    if init_from is not None and (load_init_weights or m.lora is not None):   # LoRA checkpoints hold no base
        load_export_weights(model, init_from)
    if m.lora is not None:
        from pipeline.config import training_dtype
        from pipeline.lora import apply_lora

        apply_lora(model, m.lora, config.train.seed, training_dtype(config))
    if m.activation_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def build_engine(model: torch.nn.Module, config: Config, ds_config: dict[str, Any]):
    """AdamW + schedule (:func:`build_optimizer`) and the DeepSpeed engine; returns (engine, scheduler)."""
    import deepspeed

    optimizer, scheduler = build_optimizer(model, config, ds_config)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config)
    return engine, scheduler


__all__ = ["load_run_tokenizer", "build_model", "build_engine"]
