"""Train AKI with DeepSpeed ZeRO-3: one recipe, one stage (PT or SFT), resumable at any step.

    torchrun --nproc_per_node 8 -m pipeline.train --config aki4b_pt [--set optim.lr=5e-5 ...]
             [--resume auto|CKPT_DIR] [--output-dir DIR] [--stop-at-step N]

What it does, top to bottom: read and validate the recipe (a bad one fails here, before any distributed
work) → join the process group → build (:mod:`pipeline.build`) the tokenizer and the model under
``deepspeed.zero.Init`` (each parameter is partitioned as it is created, so no rank holds the whole model;
``init_from`` loads a previous stage's export; ``model.lora`` adds PEFT adapters to a frozen base,
:mod:`pipeline.lora`) → AdamW on the trainable connector + LLM (SigLIP stays frozen; LoRA: adapters +
connector) with the recipe's ``transformers`` LR schedule → DeepSpeed engine → optionally resume → loop →
final checkpoint and export.

One optimizer step (:meth:`Trainer.train_step`; its hot path :func:`forward_backward` is also what
``python -m bench.train_step --engine deepspeed`` times): fetch the step's micro-batches, all-reduce their
target-token count once, then forward/backward each with ``loss_sum · world / global_target_tokens`` —
so the step's gradient is that of the token-mean loss of the whole global batch, whatever the split
into ranks and accumulation steps. Before the last backward the step's loss is all-reduced; when it is
not finite the update is skipped (the last backward is made non-finite on purpose, so DeepSpeed's
own overflow check drops the accumulated gradients and does not step), logged, and the run aborts after
``train.max_nonfinite_steps`` such steps in a row.

SIGTERM / SIGUSR1 set a flag; all ranks agree on it in the next step's all-reduce, finish that step,
save a checkpoint and exit 0 (a requeued job continues with ``--resume auto``).

Samples the loader dropped are summed over the ranks in the same all-reduce and counted by source and
reason (:class:`pipeline.metrics.DroppedSamples`: each step's record, the run's summary, the stop past
``data.max_skip_fraction``). A :class:`pipeline.watchdog.StepWatchdog` per rank ends the process with
every thread's stack when no step finishes within ``train.step_timeout``.

With ``eval:`` in the recipe, a :class:`pipeline.train_eval.TrainingEvaluator` measures the held-out loss
per source (and a benchmark) on the same engine every ``eval.every`` steps and at the end, without
changing what training computes; the best checkpoint by ``eval.best`` is kept.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import signal
import sys
import time
import uuid
import zlib
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline import checkpoint as ckpt
from pipeline.build import build_engine, build_model, load_run_tokenizer
from pipeline.config import Config, load_config, save_config
from pipeline.distributed import setup_distributed
from pipeline.ds_config import fill_deepspeed_config
from pipeline.validation import validate_launch
from pipeline.weights_check import frozen_digest
from pipeline.flops import BatchShape, count_model, step_flops, visible_pairs
from pipeline.process import freeze_setup_objects
from pipeline.metrics import DroppedSamples, MetricsLogger, StepMetrics, peak_flops, peak_memory_gb
from pipeline.tokens import PAD
from pipeline.train_eval import TrainingEvaluator, check_eval_access, progress_fields
from pipeline.watchdog import StepWatchdog
from pipeline.zero3 import register_zero_config

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.train", description="Train AKI (one stage) with DeepSpeed.")
    p.add_argument("--config", required=True, help="recipe YAML (path, or name of a recipe in pipeline/configs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set optim.lr=2e-5 (repeatable)")
    p.add_argument("--resume", default=None, metavar="auto|CKPT_DIR",
                   help="auto: continue from the newest complete checkpoint of the output dir (fresh start if "
                        "none); or a checkpoint folder")
    p.add_argument("--output-dir", default=None, help="run folder (overrides train.output_dir)")
    p.add_argument("--stop-at-step", type=int, default=None,
                   help="save and exit 0 after this step (the LR schedule still spans train.total_steps)")
    return p.parse_args(argv)


def device_inputs(model: torch.nn.Module, batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """The model inputs of a collated batch on the device, validated on the CPU first (the step then runs
    ``validate=False``: no read-backs from the device inside the step); copies are non-blocking from the
    loader's pinned memory."""
    from pipeline.data.collate import MODEL_INPUTS

    inputs = {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}
    model.check_inputs(**inputs)
    return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}


def forward_backward(engine, batches: list[dict[str, Any]], prepare: Callable[[dict[str, Any]], dict[str, Any]],
                     scale: float, targets: float) -> float:
    """Forward, backward and ``engine.step()`` of each micro-batch of one optimizer step; returns the step's
    token-mean loss over the global batch (one all-reduce and one host read, before the last backward).

    Each micro-batch's loss is ``loss_sum · scale`` (``scale`` = world / global target tokens). When the
    step's loss is not finite, the last backward is made non-finite on purpose so DeepSpeed's overflow
    check drops the accumulated gradients and skips the update.
    """
    import torch.distributed as dist

    loss_sum = torch.zeros((), dtype=torch.float32, device=engine.device)
    step_loss = float("nan")
    for i, batch in enumerate(batches):
        out = engine(**prepare(batch), return_logits=False, validate=False)
        loss_sum += out.loss_sum.detach().float()
        loss = out.loss_sum * scale
        if i == len(batches) - 1:
            total = loss_sum.clone()
            dist.all_reduce(total)
            step_loss = total.item() / max(targets, 1.0)
            if not math.isfinite(step_loss):
                loss = loss * float("nan")   # DeepSpeed's overflow check then skips the update
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()
    return step_loss


class Trainer:
    """Builds everything from a validated recipe; :meth:`fit` runs the stage. ``freeze_setup`` (the command
    line's): the process is this run's, so its set-up leaves garbage collection (:mod:`pipeline.process`)."""

    def __init__(self, config: Config, resume: str | None = None, stop_at_step: int | None = None,
                 freeze_setup: bool = False):
        import torch.distributed as dist
        from pipeline.data.phases import PhasedLoader

        self.config, self.stop_at_step = config, stop_at_step
        started = time.perf_counter()
        phases: dict[str, float] = {}

        def phase(name: str) -> None:
            phases[name] = round(time.perf_counter() - started - sum(phases.values()), 3)

        self.rank, self.world, self.device = setup_distributed()
        phase("distributed_s")
        self.output_dir = Path(config.train.output_dir)
        self.gas = validate_launch(config, self.world)
        path = [ckpt.resolve_resume(resume, self.output_dir) if self.rank == 0 else None]
        dist.broadcast_object_list(path, src=0)
        self.resume_from = path[0]
        universal = self.resume_from is not None and ckpt.needs_universal(self.resume_from, self.world)
        if universal and self.rank == 0:
            ckpt.ensure_universal(self.resume_from)
        dist.barrier()

        self.ds_config = fill_deepspeed_config(config, self.world)
        self.ds_config["checkpoint"] = {"load_universal": universal}
        self._zero_ref = register_zero_config(self.ds_config)   # keep alive: transformers holds a weakref
        self.tokenizer = load_run_tokenizer(config)
        model = build_model(config, self.ds_config, self.tokenizer, load_init_weights=self.resume_from is None)
        phase("model_s")
        self.flops = count_model(model)
        self.engine, self.scheduler = build_engine(model, config, self.ds_config)
        if freeze_setup:            # before the data loaders, which a phase switch frees
            freeze_setup_objects()
        phase("engine_s")
        self.data = PhasedLoader(config, self.tokenizer, model.image_processor,
                                 on_start=lambda info: self.logger.event({"event": "data_phase", "step": self.step,
                                                                          **info}))

        self.evaluator = TrainingEvaluator.from_config(config, self.tokenizer, model.image_processor, self.rank,
                                                       self.world, self.device)
        self.eval_postfix: dict[str, str] = {}      # the last evaluation's figures in the progress bar
        self.step, self.nonfinite_streak, self.skipped_steps = 0, 0, 0
        self.dropped = DroppedSamples(config.data.max_skip_fraction)
        self.watchdog = StepWatchdog.from_config(config, self.rank)
        self.run_id = uuid.uuid4().hex[:8]
        repairs = None
        if self.resume_from is not None:
            from pipeline.lora import load_trainable

            state, rank_state = ckpt.load(self.engine, self.resume_from, seed=config.train.seed,
                                          load_module=load_trainable if config.model.lora is not None else None)
            self.step, self.run_id = int(state["step"]), state["wandb_run_id"]
            self.skipped_steps = int(state.get("skipped_steps", 0))
            self.frozen_sha256, repairs = state["frozen_sha256"], state.get("universal_repairs")
            self.dropped.load_state_dict(state.get("dropped"))
            self.data.load_state_dict(rank_state["data"], self.step)
            if self.evaluator is not None:
                self.evaluator.best.load_state_dict(state.get("eval_best"))
        else:
            self.frozen_sha256 = frozen_digest(self.engine.module)   # written into every checkpoint, checked on resume
        phase("data_and_resume_s")
        self.logger = MetricsLogger(self.output_dir, self.rank == 0, config.train.wandb_project,
                                    config.train.wandb_mode, self.run_id, config.name, config.to_dict())
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.output_dir / "recipe.yaml")
            self.logger.truncate_after(self.step)
            self.logger.event({"event": "startup", "step": self.step, **phases})
            if self.resume_from is not None:
                self.logger.event({"event": "resumed", "step": self.step, "checkpoint": str(self.resume_from),
                                   "universal": universal, "world_size": self.world,
                                   "frozen_sha256": self.frozen_sha256, "universal_repairs": repairs})
        self.stop_signal: int | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._request_stop)

    def _request_stop(self, signum: int, frame: Any) -> None:
        self.stop_signal = signum

    # ---- one optimizer step ---------------------------------------------------------------------
    def prepare(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return device_inputs(self.engine.module, batch, self.device)

    def train_step(self, batches: list[dict[str, Any]]) -> dict[str, Any]:
        import torch.distributed as dist

        mode, n_visual = self.config.model.attention_mode, self.flops.num_latents
        counts = torch.tensor([sum(b["num_target_tokens"] for b in batches),
                               sum(int((b["modality_ids"] != PAD).sum()) for b in batches),
                               sum(b["modality_ids"].numel() for b in batches),
                               sum(int(b["pixel_values"].shape[0]) for b in batches),
                               sum(visible_pairs(b["modality_ids"], b.get("document_ids"), mode, n_visual)
                                   for b in batches),
                               sum(b["num_samples"] for b in batches),
                               sum(n for b in batches for reasons in b["skipped"].values() for n in reasons.values()),
                               float(self.stop_signal is not None)], dtype=torch.float64, device=self.device)
        dist.all_reduce(counts)
        targets, tokens, grid, images, pairs, samples, dropped, stop = counts.tolist()
        lr = self.scheduler.get_last_lr()[0]
        step_loss = forward_backward(self.engine, batches, self.prepare, self.world / max(targets, 1.0), targets)
        finite = math.isfinite(step_loss)
        if finite and not self.engine.was_step_applied():
            finite = False      # DeepSpeed found a non-finite gradient norm with a finite loss
        grad_norm = self.engine.get_global_grad_norm() if finite else None
        return {"loss": step_loss, "lr": lr, "grad_norm": None if grad_norm is None else float(grad_norm),
                "targets": int(targets), "tokens": tokens, "grid": grid, "images": images, "pairs": pairs,
                "samples": samples, "dropped": int(dropped), "stop": stop > 0, "finite": finite}

    def data_digest(self, batches: list[dict[str, Any]]) -> str:
        """Hash of the global batch in global micro-batch order (micro index, then rank)."""
        import torch.distributed as dist

        local = torch.tensor([zlib.crc32(b["input_ids"].numpy().tobytes()) for b in batches], dtype=torch.int64,
                             device=self.device)
        gathered = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(gathered, local)
        order = torch.stack(gathered).t().flatten().cpu().numpy()
        return hashlib.sha1(order.tobytes()).hexdigest()[:16]

    # ---- the loop ---------------------------------------------------------------------------------
    def fit(self) -> Path | None:
        """Train to ``train.total_steps`` (or until stopped); returns the export folder when finished."""
        from tqdm import tqdm

        t = self.config.train
        peak = peak_flops(t.precision)
        bar = tqdm(total=t.total_steps, initial=self.step, disable=self.rank != 0, desc=self.config.name,
                   dynamic_ncols=True)
        saved_at = self.step if self.resume_from is not None else None
        self.watchdog.start(self.step)
        while self.step < t.total_steps:
            start = time.perf_counter()
            batches = self.data.micro_batches(self.step, self.gas)
            waited = time.perf_counter() - start
            digest = self.data_digest(batches)
            r = self.train_step(batches)
            self.step += 1
            elapsed = time.perf_counter() - start
            self.nonfinite_streak = 0 if r["finite"] else self.nonfinite_streak + 1
            self.skipped_steps += 0 if r["finite"] else 1
            dropped = self.dropped.add(batches, r["samples"], r["dropped"])
            flops = step_flops(self.flops, BatchShape(tokens=int(r["tokens"]), grid_tokens=int(r["grid"]),
                                                      predicted=r["targets"], visible_pairs=int(r["pairs"]),
                                                      images=int(r["images"])))
            metrics = StepMetrics(
                step=self.step, loss=r["loss"], lr=r["lr"], grad_norm=r["grad_norm"],
                samples_per_s=r["samples"] / elapsed, tokens_per_s=r["tokens"] / elapsed,
                target_tokens=r["targets"], mfu=None if peak is None else flops / (elapsed * peak * self.world),
                peak_mem_gb=peak_memory_gb(), data_wait_share=waited / elapsed, step_time_s=elapsed,
                skipped=not r["finite"], data_digest=digest, dropped=r["dropped"], dropped_by_source=dropped)
            self.logger.log(metrics)
            self.watchdog.beat(self.step)
            bar.update(1)
            if self.rank == 0 and (self.step % t.log_every == 0 or not r["finite"]):
                bar.set_postfix(loss=f"{r['loss']:.4f}", lr=f"{r['lr']:.2e}", **self.eval_postfix, refresh=False)
            if not r["finite"]:
                self.logger.event({"event": "nonfinite_loss", "step": self.step, "loss": r["loss"],
                                   "streak": self.nonfinite_streak})
                if self.nonfinite_streak >= t.max_nonfinite_steps:
                    raise RuntimeError(
                        f"loss was not finite for {self.nonfinite_streak} steps in a row (steps "
                        f"{self.step - self.nonfinite_streak + 1}..{self.step}; train.max_nonfinite_steps="
                        f"{t.max_nonfinite_steps}); every such step was skipped. Lower optim.lr or raise "
                        f"optim.warmup_steps, check the data, and resume from the last checkpoint with --resume")
            if self.dropped.too_many():
                self.logger.summary(*self.dropped.summary(self.step))
                raise RuntimeError(self.dropped.too_many())
            stop = r["stop"] or self.step == self.stop_at_step
            saving = stop or self.step % t.save_every == 0 or self.step == t.total_steps
            if self.evaluator is not None:
                self.evaluate(elapsed, saving)
            if saving:
                self.save()
                saved_at = self.step
                self.watchdog.beat(self.step)
            if stop:
                self.watchdog.stop()
                self.logger.event({"event": "stopped", "step": self.step, "signal": self.stop_signal})
                self.logger.summary(*self.dropped.summary(self.step))
                bar.close()
                return None
        bar.close()
        if saved_at != self.step:
            self.save()
        self.watchdog.stop()
        self.logger.summary(*self.dropped.summary(self.step))
        if self.nonfinite_streak:
            raise RuntimeError(
                f"the run's last {self.nonfinite_streak} step(s) (to step {self.step}) had a non-finite loss and "
                f"were skipped, so it ends without an export; the final checkpoint is kept for inspection. Check the "
                f"data and the learning rate, then resume from an earlier checkpoint with --resume CKPT_DIR")
        return self.export()

    def evaluate(self, step_time: float, saving: bool) -> None:
        """The recipe's evaluation when one is due after this step (:mod:`pipeline.train_eval`); one at a
        checkpoint step may become the run's best."""
        self.evaluator.add_training_time(step_time)
        if not self.evaluator.due(self.step):
            return
        record = self.evaluator.run(self.engine, self.step, self.prepare)
        if saving and self.evaluator.best.update(record, self.step):
            record["best"] = self.evaluator.best.state_dict()
        self.logger.log_eval(record)
        self.watchdog.beat(self.step)
        self.eval_postfix = progress_fields(record)

    def save(self) -> Path:
        state = {"wandb_run_id": self.run_id, "skipped_steps": self.skipped_steps, "config": self.config.to_dict(),
                 "dropped": self.dropped.state_dict(), "frozen_sha256": self.frozen_sha256}
        best = None if self.evaluator is None else self.evaluator.best.state_dict()
        if best is not None:
            state["eval_best"] = best
        from pipeline.export import save_skeleton

        path = ckpt.save(self.engine, self.output_dir, self.step, state, {"data": self.data.state_dict()},
                         self.config.train.keep_last,
                         write_extra=lambda p: save_skeleton(self.engine.module, p / ckpt.SKELETON),
                         trainable_only=self.config.model.lora is not None,
                         protect=[best["step"]] if best and best["step"] is not None else [])
        self.logger.event({"event": "checkpoint", "step": self.step, "path": str(path)})
        return path

    def export(self) -> Path:
        """Consolidate the newest checkpoint into ``{output_dir}/export`` (rank 0 writes, all wait)."""
        import torch.distributed as dist

        from pipeline.export import export_checkpoint

        out = self.output_dir / "export"
        if self.rank == 0:
            export_checkpoint(ckpt.checkpoints_root(self.output_dir) / ckpt.step_tag(self.step), out,
                              self.config.to_dict())
            self.logger.event({"event": "export", "step": self.step, "path": str(out)})
        dist.barrier()
        return out

    def close(self) -> None:
        self.watchdog.stop()
        self.data.close()
        self.logger.close()


def prepare_config(args: argparse.Namespace) -> Config:
    """The validated recipe and run folder of a command line; raises ValueError before any distributed work."""
    config = load_config(args.config, args.set)
    if args.output_dir is not None:
        config.train.output_dir = args.output_dir
    validate_launch(config, int(os.environ.get("WORLD_SIZE", "1")))
    if os.environ.get("RANK", "0") == "0":      # one scan of the run folder; the launcher stops the other ranks
        ckpt.check_start(ckpt.resolve_resume(args.resume, config.train.output_dir), config.train.output_dir)
        from pipeline.data.dataset import check_data_access

        check_data_access(config.data)          # a missing bucket or a wrong credential: one error, no training
        check_eval_access(config)               # held-out data and benchmark files, the same
    return config


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = prepare_config(args)
    except ValueError as err:           # ConfigError is one
        print(f"error: {err}", file=sys.stderr)
        return 2
    trainer = Trainer(config, resume=args.resume, stop_at_step=args.stop_at_step, freeze_setup=True)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
