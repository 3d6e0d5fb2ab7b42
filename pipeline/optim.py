"""The optimizer and learning-rate schedule of a run, built in PyTorch from the recipe's ``optim`` section.

AdamW over the trainable parameters (DeepSpeed's CPU Adam when the DeepSpeed JSON offloads the optimizer,
PyTorch's fused AdamW on GPUs) and the recipe's ``transformers`` schedule; both are handed to
``deepspeed.initialize`` (the DeepSpeed JSONs hold neither), so every learning-rate fact lives in the recipe.
"""
from __future__ import annotations

from typing import Any

import torch

from pipeline.config import Config
from pipeline.ds_config import offloads_optimizer


def build_optimizer(model: torch.nn.Module, config: Config, ds_config: dict[str, Any]):
    """AdamW over the trainable parameters (1-D ones, biases and norms, decayed only with
    ``optim.weight_decay_all``) and the recipe's schedule (:func:`build_lr_schedule`)."""
    o = config.optim
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if o.weight_decay_all or len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    # no empty group: DeepSpeed drops those from the optimizer, and the schedule built on it would then hold
    # one learning rate too many (``optim.weight_decay_all`` empties the second group)
    groups = [g for g in ({"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0})
              if g["params"]]
    if offloads_optimizer(ds_config):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, lr=o.lr, betas=o.betas, eps=o.eps, adamw_mode=True)
    else:   # fused: one kernel for the whole update on the GPU (DeepSpeed steps it on its fp32 partitions)
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps,
                                      fused=True if torch.cuda.is_available() else None)
    return optimizer, build_lr_schedule(optimizer, config)


def build_lr_schedule(optimizer: torch.optim.Optimizer, config: Config) -> torch.optim.lr_scheduler.LambdaLR:
    """The recipe's ``transformers`` schedule over the whole stage, or restarted for each input order
    (``optim.schedule_span: order``: warmup and decay over each order's equal share of the steps)."""
    from transformers import get_scheduler

    o, total = config.optim, config.train.total_steps
    span = total if o.schedule_span == "stage" else total // len(config.data.orders)
    scheduler = get_scheduler(o.scheduler, optimizer, num_warmup_steps=o.warmup_steps, num_training_steps=span,
                              scheduler_specific_kwargs=o.scheduler_kwargs())
    if span == total:
        return scheduler
    factor = scheduler.lr_lambdas[0]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step % span))
