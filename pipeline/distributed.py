"""Joining the process group, under a launcher (torchrun, srun) or as one plain process."""
from __future__ import annotations

import os
import socket
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed() -> tuple[int, int, torch.device]:
    """Join the process group (gloo on CPU, NCCL on GPUs); returns (rank, world size, device).

    A run started without a launcher (no ``WORLD_SIZE``) is one rank whose rendezvous takes a free port,
    so several single-process runs can share a machine.
    """
    import deepspeed
    import torch

    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    else:
        device = torch.device("cpu")
    # DeepSpeed 0.19.8's ZeRO calls torch.distributed's reduce_scatter_tensor / all_gather_into_tensor, which
    # torch 2.14 deprecates with a FutureWarning per call (hundreds of lines a step in a run's log); the
    # names are DeepSpeed's to change.
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated")
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device
