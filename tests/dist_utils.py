"""Helpers of the training tests: tiny MDS datasets, a torchrun launcher, and a probing entry point.

``python tests/dist_utils.py probe PROBE_DIR -- <pipeline.train arguments>`` runs the real trainer (under
torchrun) and around it saves the engine's logits on a fixed batch (before and after training), computed
by the live ZeRO-3 engine with its partitioned weights. ``AKI_TEST_NAN_STEPS=2,3`` makes the model's
loss non-finite on those optimizer steps (fault injection for the non-finite-loss guard);
``AKI_TEST_STALL=RANK:STEP`` makes that rank's forward of that optimizer step sleep for an hour (a stalled
rank, for the step watchdog); ``AKI_TEST_SIGTERM_STEP=2`` makes each process send itself SIGTERM during that
optimizer step (a preemption at a known step); ``AKI_TEST_SAVE_STATE=1`` also saves the engine's whole
gathered state dict at the end.
"""
from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jpeg(color: str, side: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (side, side), COLORS[color]).save(out, format="JPEG")
    return out.getvalue()


def write_dataset(folder: str | os.PathLike, tokenizer, kind: str, n: int, num_visual_tokens: int = 4,
                  image_size: int = 32, text_only_every: int = 0, caption: str = "a {color} square",
                  shard_size: int = 1 << 14) -> str:
    """An MDS dataset folder (+ manifest.json) of synthetic colour samples.

    ``kind``: "pt" (``<image>{caption}`` with the colour filled in) or "sft" (question about the colour;
    every ``text_only_every``-th sample is a text-only multiple-choice question, like ScienceQA without image).
    """
    from streaming import MDSWriter

    from pipeline import chat
    from pipeline.data.format import MDS_COLUMNS, Manifest, join_images
    from pipeline.model.tokenizer import tokenizer_fingerprint

    names = list(COLORS)
    manifest = Manifest(source=kind, num_visual_tokens=num_visual_tokens, image_size=image_size,
                        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), text_layout=chat.DEFAULT_LAYOUT)
    with MDSWriter(out=str(folder), columns=MDS_COLUMNS, size_limit=shard_size) as writer:
        for i in range(n):
            color = names[i % len(names)]
            images = [jpeg(color, image_size)]
            if kind == "pt":
                segments = chat.pretrain_segments(caption.format(color=color))
            elif text_only_every and i % text_only_every == 0:
                images = []
                segments = chat.chat_segments([(f"Which word names a colour? A. {color} B. table", "A")],
                                              num_images=0)
            else:
                segments = chat.chat_segments([("What color is the square?", color)])
            enc = chat.encode(tokenizer, segments, num_visual_tokens)
            blob, lengths = join_images(images)
            writer.write({"input_ids": enc.input_ids, "modality_ids": enc.modality_ids, "images": blob,
                          "image_lengths": lengths, "source": kind, "id": f"{kind}-{i}"})
            manifest.samples += 1
            manifest.tokens += len(enc.input_ids)
    manifest.write(folder)
    return str(folder)


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder ``name`` of this test run, made by ``build(folder)`` (``folder`` does not exist yet) only
    by the first test module that asks for it: every module of the run (in every pytest-xdist worker: they
    share the parent of their temporary folders) gets the same folder, and a later one waits under a file
    lock while the first builds it. A failed build leaves nothing behind (the next asker builds again)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            try:
                build(folder)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            done.touch()
    return folder


def torchrun(args: list[str], nproc: int, env: dict[str, str] | None = None, timeout: float = 240,
             module: bool = True) -> subprocess.CompletedProcess:
    """Run ``torchrun --nproc_per_node N [-m] ARGS`` from the repository root; print its log on failure."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port())] + (["-m"] if module else []) + args
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    return proc


def show(proc: subprocess.CompletedProcess) -> str:
    """The tail of a finished process's output, for assertion messages."""
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-8000:]}"


def probe_batch(tokenizer, num_visual_tokens: int = 4, image_size: int = 32):
    """A fixed two-row batch (one SFT sample with an image, one PT caption) for logits comparisons."""
    import torch

    from pipeline import chat
    from pipeline.data.collate import collate
    from pipeline.model.images import ImageProcessor

    proc = ImageProcessor(image_size)
    samples = []
    for segments, color in ((chat.chat_segments([("What color is the square?", "blue")]), "blue"),
                            (chat.pretrain_segments("a green square"), "green")):
        enc = chat.encode(tokenizer, segments, num_visual_tokens)
        samples.append({"input_ids": enc.input_ids.astype(np.int64), "modality_ids": enc.modality_ids.astype(np.int64),
                        "pixel_values": proc([jpeg(color, image_size)])})
    batch = collate(samples, "pad", tokenizer.pad_token_id)
    return {k: batch[k] for k in ("input_ids", "modality_ids", "pixel_values") if isinstance(batch[k], torch.Tensor)}


def _probe(probe_dir: str, train_args: list[str]) -> int:
    """Train like ``python -m pipeline.train`` and save the engine's probe logits before/after."""
    import torch
    import torch.distributed as dist

    from pipeline.model.aki import AKIModel
    from pipeline.train import Trainer, parse_args, prepare_config

    nan_steps = {int(s) for s in os.environ.get("AKI_TEST_NAN_STEPS", "").split(",") if s}
    if nan_steps:
        forward = AKIModel.forward

        def poisoned(self, *a, **kw):
            out = forward(self, *a, **kw)
            if self.training and TRAINER.step + 1 in nan_steps:
                out.loss_sum = out.loss_sum * float("nan")
            return out

        AKIModel.forward = poisoned
    if os.environ.get("AKI_TEST_STALL"):
        import time

        stall_rank, stall_step = map(int, os.environ["AKI_TEST_STALL"].split(":"))
        before_stall = AKIModel.forward

        def stalled(self, *a, **kw):
            if self.training and TRAINER.step + 1 == stall_step and dist.get_rank() == stall_rank:
                time.sleep(3600)
            return before_stall(self, *a, **kw)

        AKIModel.forward = stalled
    sigterm_step = int(os.environ.get("AKI_TEST_SIGTERM_STEP", "0"))
    if sigterm_step:
        import signal

        forward_once = AKIModel.forward

        def preempted(self, *a, **kw):
            if self.training and TRAINER.step + 1 == sigterm_step and TRAINER.stop_signal is None:
                os.kill(os.getpid(), signal.SIGTERM)
            return forward_once(self, *a, **kw)

        AKIModel.forward = preempted
    args = parse_args(train_args)
    global TRAINER
    TRAINER = trainer = Trainer(prepare_config(args), resume=args.resume, stop_at_step=args.stop_at_step,
                                freeze_setup=True)          # as the command line does

    def logits(tag: str) -> None:
        engine = trainer.engine
        engine.module.eval()
        with torch.no_grad():
            batch = {k: v.to(trainer.device) for k, v in probe_batch(trainer.tokenizer).items()}
            out = engine(**batch, return_logits=True).logits.float().cpu()
        engine.module.train()
        if dist.get_rank() == 0:
            os.makedirs(probe_dir, exist_ok=True)
            torch.save(out, os.path.join(probe_dir, f"logits_{tag}.pt"))

    logits("start")
    try:
        trainer.fit()
    finally:
        trainer.close()
    logits("end")
    if os.environ.get("AKI_TEST_SAVE_STATE"):
        import deepspeed

        module = trainer.engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
        if dist.get_rank() == 0:
            torch.save(state, os.path.join(probe_dir, "state_end.pt"))
    return 0


TRAINER = None

if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "probe":
        sep = sys.argv.index("--")
        sys.exit(_probe(sys.argv[2], sys.argv[sep + 1:]))
    sys.exit(f"usage: {sys.argv[0]} probe PROBE_DIR -- <pipeline.train arguments>")
