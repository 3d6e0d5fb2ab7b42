"""Stand-alone reproduction (DeepSpeed only, CPU) of three gaps of ZeRO-3's universal-checkpoint loading.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/upstream/ds_universal_stage3_optimizer.py save DIR
    python -m deepspeed.checkpoint.ds_to_universal --input_folder DIR/step2 --output_folder DIR/step2/universal
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 1 tests/upstream/ds_universal_stage3_optimizer.py load DIR

A two-layer model with one frozen layer and two AdamW groups (decay 0.01 / no decay) trains two steps on 2
ranks under ZeRO-3 and saves; the checkpoint is converted to the universal format and loaded on 1 rank with
``checkpoint.load_universal``. Seen on DeepSpeed 0.19.8 (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``
in runtime/zero/stage3.py, and ``load_checkpoint`` skipping module state for universal checkpoints):

1. the frozen layer is not restored (it keeps its freshly constructed values);
2. every optimizer sub-group gets the same ``step`` tensor object, so one ``engine.step()`` advances it once per
   sub-group (2 -> 4 here instead of 3);
3. every param group gets ``param_groups[0]``'s hyper-parameters (the no-decay group gets weight_decay 0.01).

``load`` prints what it finds and exits 1 while any of the three is present, 0 when none is. The pipeline's
workaround is ``pipeline/ds_universal.py``.
"""
from __future__ import annotations

import os
import sys

import deepspeed
import torch
import torch.distributed as dist

CONFIG = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 3}, "checkpoint": {}}


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = torch.nn.Linear(8, 8)
        self.trained = torch.nn.Linear(8, 1)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trained(self.frozen(x)).pow(2).mean()


def engine(load_universal: bool):
    torch.manual_seed(1 if load_universal else 0)        # the loading run constructs other frozen values
    model = Model()
    groups = [{"params": [model.trained.weight], "weight_decay": 0.01},
              {"params": [model.trained.bias], "weight_decay": 0.0}]
    config = {**CONFIG, "train_batch_size": dist.get_world_size(), "checkpoint": {"load_universal": load_universal}}
    eng, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups, lr=1e-2), config=config)
    return eng


def frozen_weight(eng) -> torch.Tensor:
    with deepspeed.zero.GatheredParameters([eng.module.frozen.weight]):
        return eng.module.frozen.weight.detach().clone()


def main(mode: str, folder: str) -> int:
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(dist.get_rank())
    if mode == "save":
        eng = engine(False)
        for _ in range(2):
            eng.backward(eng(torch.randn(1, 8)))
            eng.step()
        eng.save_checkpoint(folder, tag="step2")
        if dist.get_rank() == 0:
            torch.save(frozen_weight(eng), os.path.join(folder, "frozen_weight.pt"))
        else:
            frozen_weight(eng)
        return 0
    eng = engine(True)
    eng.load_checkpoint(os.path.join(folder, "step2"), tag="universal")
    zero = eng.optimizer
    states = [zero.optimizer.state[f] for f in zero.fp32_partitioned_groups_flat]
    shared = len({id(s["step"]) for s in states}) < len(states)
    eng.backward(eng(torch.randn(1, 8)))
    eng.step()
    steps = [float(s["step"]) for s in states]
    decay = [g["weight_decay"] for g in zero.optimizer.param_groups]
    frozen_ok = torch.equal(frozen_weight(eng), torch.load(os.path.join(folder, "frozen_weight.pt"), weights_only=True))
    print(f"deepspeed {deepspeed.__version__}: frozen layer restored: {frozen_ok}; one step tensor shared by "
          f"{len(states)} sub-groups: {shared}; steps after one more step: {steps} (expected 3.0 each); "
          f"weight decay per group: {decay} (expected [0.01, 0.0])")
    return 0 if frozen_ok and not shared and steps == [3.0] * len(states) and decay == [0.01, 0.0] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
