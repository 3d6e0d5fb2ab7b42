"""One AKI training step (forward, backward, grad clip, AdamW): samples/s, tokens/s, MFU, peak memory.

Builds ``AKIModel(--size)`` with random weights (no downloads) and times warm-up + ``--iters`` steps on a
fixed synthetic batch, for each run of :data:`RUNS`: PT and SFT, each padded and packed, collated by the
trainer's own :class:`~pipeline.data.collate.Collator` (packed rows all ``pack_tokens`` wide). Data
loading is not part of the timed step (``bench.loader`` measures it). Two engines:

* ``--engine torch`` (default): one process, plain PyTorch AdamW, the batch already on the device
  (``--pt-batch`` / ``--sft-batch`` samples when padded, as many samples as fill ``--pack-rows`` rows
  when packed): the upper bound of one GPU, without ZeRO's communication;
* ``--engine deepspeed``: the trainer's step itself — the recipe's DeepSpeed JSON (its ZeRO stage,
  buckets, prefetch), the trainer's optimizer and engine (:func:`pipeline.build.build_engine`) and its
  micro-batch loop (:func:`pipeline.train.forward_backward`: validation on the CPU, non-blocking copies
  from pinned memory, one loss all-reduce per step), one micro-batch of the recipe's
  ``train.micro_batch_size`` per rank per step (what the ``aki4b_*`` recipes do on 8 GPUs). Run it
  under ``torchrun --nproc_per_node N`` for N ranks, alone for one. PT runs take the data settings of
  ``--pt-recipe``, SFT runs those of ``--sft-recipe``; the engine is built once, from the first run's recipe.

Both call the model as the trainer does (``validate=False`` after a CPU-side check, ``return_logits=False``).
MFU = model FLOPs of the step (:mod:`pipeline.flops`, formula in its docstring) / (step seconds × world
size × the device's dense bf16 peak, :data:`pipeline.metrics.PEAK_FLOPS` by exact device name); "useful"
MFU counts only real (non-PAD) tokens. On CPU the achieved FLOP/s is reported and MFU only against
``--peak-flops``. The results state engine, ZeRO stage, micro-batch, checkpointing and world size.

With ``--engine torch`` on GPU the weights are bf16 (``--precision bf16``: bf16 weights, gradients and
AdamW states, fused AdamW) or fp32 with bf16 autocast (``--precision amp``); the LLM runs FlexAttention
(``flex_attention``) and the host syncs of one step are counted with torch's sync debug mode.

    python -m bench.train_step                                   # aki-4b on the GPU, single process
    python -m bench.train_step --engine deepspeed                # the trainer's step, ZeRO-3 of the recipe
    python -m bench.train_step --engine deepspeed --deepspeed ds_configs/zero2_single_gpu.json   # cost of ZeRO-3
    python -m bench.train_step --device cpu --size small --iters 3

``--lora`` (either engine) wraps the same model as a LoRA run does (:func:`pipeline.lora.apply_lora`:
adapters of ``--lora-rank`` on the LLM's attention and MLP layers, connector trained in full, the rest
frozen; ``--qlora`` also holds the adapted base layers in 4 bits) and adds its trainable parameters, the
measured optimizer-state bytes and the gradient bytes to the figures; the same command without ``--lora``
gives full fine-tuning of the same size to compare with (results ``train_step[-deepspeed-zeroN]-lora``).

    python -m bench.train_step --device cpu --size small --runs sft-packed --lora
    python -m bench.train_step --engine deepspeed --deepspeed ds_configs/zero2_single_gpu.json --lora
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import torch

from bench.common import (Figure, Result, add_common_args, command_line, gemm_flops, measure, peak_memory_gib,
                          report, reset_peak_memory, result_name)
from bench.layouts import fill_rows, make_sample, pt_sample, sft_sample
from pipeline.data.collate import Collator
from pipeline.flops import BatchShape, ModelCounts, batch_shape, count_model, step_flops
from pipeline.metrics import device_peak_flops
from pipeline.model.aki import AKIModel
from pipeline.train import device_inputs


@dataclasses.dataclass(frozen=True)
class Run:
    """One timed configuration: which samples, how they are batched."""

    name: str
    stage: str          # "pt" or "sft"
    collate_mode: str   # "pad" or "pack"


RUNS: dict[str, Run] = {r.name: r for r in (
    Run("pt-padded", "pt", "pad"),
    Run("pt-packed", "pt", "pack"),
    Run("sft-padded", "sft", "pad"),
    Run("sft-packed", "sft", "pack"),
)}
SAMPLERS: dict[str, Callable[..., np.ndarray]] = {
    "pt": lambda rng, n, text_mean: pt_sample(rng, n),
    "sft": lambda rng, n, text_mean: sft_sample(rng, n, text_mean),
}
GOALS = {"pt-packed": "train_step.pt_mfu", "sft-packed": "train_step.sft_useful_mfu"}


@dataclasses.dataclass
class Timed:
    """What one run measured."""

    seconds: float            # per optimizer step
    samples: int              # per step and rank
    rows: int
    width: int
    shape: BatchShape         # of one rank's step
    peak_gib: float
    host_syncs: int | None = None


def sample_stream(run: Run, args: argparse.Namespace, vocab: int, image_size: int,
                  n_visual: int) -> Callable[[], np.ndarray]:
    """The stage's seeded stream of sample layouts."""
    rng = np.random.default_rng({"pt": 1, "sft": 2}[run.stage])
    return lambda: SAMPLERS[run.stage](rng, n_visual, args.text_mean)


def decode(layouts: list[np.ndarray], vocab: int, image_size: int, n_visual: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(3)
    return [make_sample(m, rng, vocab, image_size, n_visual) for m in layouts]


def count_syncs(step: Callable[[], Any]) -> int:
    """Host-device synchronisations torch reports during one call of ``step`` (GPU only)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def shape_of(batches: list[dict[str, Any]], mode: str, n_visual: int) -> BatchShape:
    """The FLOPs-relevant shape of one rank's micro-batches, summed."""
    shapes = [batch_shape(b["modality_ids"], b["document_ids"], mode, n_visual, len(b["pixel_values"]))
              for b in batches]
    return BatchShape(*(sum(getattr(s, f.name) for s in shapes) for f in dataclasses.fields(BatchShape)))


# ---------------------------------------------------------------------------------------------------
# --engine torch: one process, plain PyTorch
# ---------------------------------------------------------------------------------------------------

class TorchEngine:
    """The single-process upper bound: plain AdamW, no sharding, the batch already on the device."""

    def __init__(self, args: argparse.Namespace):
        on_gpu = args.device.startswith("cuda")
        torch.manual_seed(0)
        with torch.device(args.device):
            self.model = AKIModel(args.size, attention_mode=args.mode, attn_implementation=args.attn)
        if on_gpu and args.precision == "bf16":
            self.model.to(torch.bfloat16)
        wrap_lora(self.model, args, torch.bfloat16 if on_gpu and args.precision == "bf16" else torch.float32)
        self.model.train()
        if args.checkpointing == "full":
            self.model.gradient_checkpointing_enable()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5, weight_decay=1e-4, fused=True if on_gpu else None)
        self.args, self.world = args, 1
        self.autocast = args.precision == "amp" and on_gpu
        self.pixel_dtype = torch.bfloat16 if on_gpu else torch.float32

    def batches(self, run: Run, draw: Callable[[], np.ndarray], size) -> list[dict[str, Any]]:
        a = self.args
        if run.collate_mode == "pack":
            layouts = fill_rows(draw, a.pack_rows, a.pack_tokens)
        else:
            layouts = [draw() for _ in range(a.pt_batch if run.stage == "pt" else a.sft_batch)]
        collator = Collator(run.collate_mode, 0, max_length=a.pack_tokens, pack_tokens=a.pack_tokens,
                            image_size=size.image_size, pixel_dtype=self.pixel_dtype)
        return [collator(decode(layouts, self.model.llm.config.vocab_size, size.image_size, size.num_visual_tokens))]

    def step_fn(self, batches: list[dict[str, Any]]) -> Callable[[], None]:
        """Forward (loss over TEXT_TARGET tokens, no full logits), backward, clip to 1.0, AdamW step."""
        inputs = device_inputs(self.model, batches[0], torch.device(self.args.device))

        def step() -> None:
            ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
            with ctx:
                loss = self.model(**inputs, return_logits=False, validate=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return step

    def describe(self) -> str:
        a = self.args
        return (f"engine torch: one process, plain PyTorch AdamW (no DeepSpeed, no ZeRO), precision "
                f"{a.precision if a.device.startswith('cuda') else 'fp32'}, activation checkpointing "
                f"{'on' if a.checkpointing == 'full' else 'off'}, world size 1; batch already on the device")


# ---------------------------------------------------------------------------------------------------
# --engine deepspeed: the trainer's own step
# ---------------------------------------------------------------------------------------------------

class DeepSpeedEngine:
    """The trainer's engine and micro-batch loop, built from a recipe (random weights, no downloads)."""

    def __init__(self, args: argparse.Namespace, first: Run):
        from pipeline.config import training_dtype
        from pipeline.ds_config import fill_deepspeed_config
        from pipeline.distributed import setup_distributed
        from pipeline.build import build_engine
        from pipeline.zero3 import build_partitioned, register_zero_config

        self.args = args
        self.rank, self.world, self.device = setup_distributed()
        config = self.recipe(first)
        self.ds_config = fill_deepspeed_config(config, self.world)
        self._zero_ref = register_zero_config(self.ds_config)   # keep alive: transformers holds a weakref
        m = config.model
        torch.manual_seed(0)
        with torch.device(self.device):
            model = build_partitioned(
                lambda: AKIModel(m.size, attention_mode=m.attention_mode, attn_implementation=m.attn_implementation),
                self.ds_config, lambda model: [model.vision, model.resampler, model.projection, model.llm])
        wrap_lora(model, args, training_dtype(config))
        if m.activation_checkpointing:
            model.gradient_checkpointing_enable()
        self.engine, _ = build_engine(model, config, self.ds_config)
        self.optimizer = self.engine.optimizer.optimizer if hasattr(self.engine.optimizer, "optimizer") \
            else self.engine.optimizer       # the torch AdamW inside DeepSpeed's ZeRO wrapper
        self.zero_stage = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        self.model, self.config = self.engine.module, config
        self.pixel_dtype = training_dtype(config)
        stage = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        # below 8 ranks each GPU holds more than its 1/8 of the sharded model states (≈ 71 GB for AKI-4B)
        self.memory_note = "" if self.world >= 8 or stage == 0 else \
            f"world size {self.world}: each GPU holds 1/{self.world} of the model states, the 8-GPU job 1/8"

    def recipe(self, run: Run):
        """The run's recipe with the benchmark's overrides: one micro-batch per rank per step."""
        from pipeline.config import load_config

        a = self.args
        recipe = a.pt_recipe if run.stage == "pt" else a.sft_recipe
        sets = [f"data.collate={run.collate_mode}", f"model.size={a.size}", f"model.attention_mode={a.mode}",
                f"model.attn_implementation={a.attn}", f"train.deepspeed={a.deepspeed}" if a.deepspeed else None,
                None if a.device.startswith("cuda") else "train.precision=fp32",
                f"train.micro_batch_size={a.micro_batch}" if a.micro_batch else None,
                f"train.global_batch_size={a.micro_batch * self.world}" if a.micro_batch else None,
                f"model.activation_checkpointing={a.checkpointing == 'full'}" if a.checkpointing else None]
        config = load_config(recipe, [s for s in sets if s] + list(a.set))
        config.train.global_batch_size = config.train.micro_batch_size * self.world
        return config

    def batches(self, run: Run, draw: Callable[[], np.ndarray], size) -> list[dict[str, Any]]:
        from pipeline.data.dataset import build_collator

        config = self.recipe(run)
        collator = build_collator(config, pad_id=0)
        layouts = [draw() for _ in range(config.train.micro_batch_size)]
        batch = collator(decode(layouts, self.model.llm.config.vocab_size, size.image_size, size.num_visual_tokens))
        if self.device.type == "cuda":   # as the loader delivers it: pinned host memory
            batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        self.micro_batch = config.train.micro_batch_size
        return [batch]

    def step_fn(self, batches: list[dict[str, Any]]) -> Callable[[], float]:
        from pipeline.train import forward_backward

        targets = float(sum(b["num_target_tokens"] for b in batches) * self.world)   # every rank: same batch
        return lambda: forward_backward(self.engine, batches, lambda b: device_inputs(self.model, b, self.device),
                                        self.world / max(targets, 1.0), targets)

    def describe(self) -> str:
        z = self.ds_config.get("zero_optimization", {})
        return (f"engine deepspeed: the trainer's step (pipeline.build.build_engine + "
                f"pipeline.train.forward_backward), "
                f"ZeRO stage {z.get('stage', 0)} ({self.args.deepspeed or self.config.train.deepspeed}), "
                f"micro-batch per rank as the run's recipe says (settings: micro_batch), 1 micro-batch per step, "
                f"activation checkpointing {'on' if self.config.model.activation_checkpointing else 'off'}, "
                f"precision {self.config.train.precision}, world size {self.world}")


# ---------------------------------------------------------------------------------------------------

def wrap_lora(model: torch.nn.Module, args: argparse.Namespace, compute_dtype: torch.dtype) -> None:
    """``--lora``: the model as a LoRA run trains it (adapters on the LLM, connector in full)."""
    if args.lora:
        from pipeline.lora import LoraConfig, apply_lora

        apply_lora(model, LoraConfig(rank=args.lora_rank, quantize="nf4" if args.qlora else None), 0, compute_dtype)


def training_memory_figures(bench, world: int) -> list[Figure]:
    """Trainable parameters, AdamW state bytes (measured, per rank) and gradient bytes (one copy of the
    trainable parameters; ZeRO-2/3 keep 1/world of them per rank) after the timed steps."""
    params = [p for p in bench.model.parameters() if p.requires_grad]
    trainable = sum(int(getattr(p, "ds_numel", p.numel())) for p in params)
    state = sum(t.numel() * t.element_size() for s in bench.optimizer.state.values() for t in s.values()
                if isinstance(t, torch.Tensor) and t.dim() > 0)
    shards = world if getattr(bench, "zero_stage", 0) >= 2 else 1
    grads = sum(int(getattr(p, "ds_numel", p.numel())) * p.element_size() for p in params) / shards
    return [Figure("trainable parameters", trainable / 1e6, "M"),
            Figure("optimizer states (AdamW m, v; measured, per rank)", state / 2**30, "GiB"),
            Figure("gradients (trainable parameters x their dtype's bytes, per rank)", grads / 2**30, "GiB")]


def time_run(run: Run, bench, args: argparse.Namespace) -> Timed:
    size = bench.model.size
    draw = sample_stream(run, args, bench.model.llm.config.vocab_size, size.image_size, size.num_visual_tokens)
    batches = bench.batches(run, draw, size)
    shape = shape_of(batches, args.mode, size.num_visual_tokens)
    step = bench.step_fn(batches)
    reset_peak_memory(args.device)
    seconds = measure(step, args.device, args.warmup, args.iters)
    timed = Timed(seconds, sum(len(b["sources"]) for b in batches), sum(b["input_ids"].shape[0] for b in batches),
                  batches[0]["input_ids"].shape[1], shape, peak_memory_gib(args.device))
    if args.device.startswith("cuda"):
        timed.host_syncs = count_syncs(step)
    return timed


def run_figures(name: str, r: Timed, counts: ModelCounts, world: int, peak: float | None, comparable: bool,
                on_gpu: bool, memory_note: str = "") -> tuple[list[Figure], dict[str, Any]]:
    """The figures of one run (whole job: every rank runs the same step) and its settings record."""
    s, shape = r.seconds, r.shape
    useful, total = step_flops(counts, shape, useful=True) * world, step_flops(counts, shape, useful=False) * world
    figures = [
        Figure(f"{name}: samples/s", world * r.samples / s, "samples/s"),
        Figure(f"{name}: tokens/s (padding included)", world * shape.grid_tokens / s, "tokens/s"),
        Figure(f"{name}: useful tokens/s (non-PAD)", world * shape.tokens / s, "tokens/s"),
        Figure(f"{name}: achieved model FLOP/s (useful)", useful / s / 1e12, "TFLOP/s"),
        Figure(f"{name}: peak memory{'' if on_gpu else ' (process RSS)'}", r.peak_gib, "GiB",
               goal="train_step.sft_peak_memory" if name == "sft-packed" else None,
               comparable=comparable and not memory_note, note=memory_note),
    ]
    if peak:
        figures += [Figure(f"{name}: MFU, useful tokens", 100 * useful / s / (peak * world), "% of peak",
                           goal=GOALS.get(name), comparable=comparable),
                    Figure(f"{name}: MFU, padding counted", 100 * total / s / (peak * world), "% of peak")]
    if r.host_syncs is not None:
        figures.append(Figure(f"{name}: host syncs in one step", r.host_syncs, "syncs"))
    record = {"samples": r.samples, "rows": r.rows, "width": r.width, "step_s": s,
              **dataclasses.asdict(shape), "useful_flops": useful}
    return figures, record


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    on_gpu_default = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=("torch", "deepspeed"), default="torch",
                        help="torch: single-process upper bound; deepspeed: the trainer's step (see above)")
    parser.add_argument("--device", default="cuda" if on_gpu_default else "cpu")
    parser.add_argument("--size", default=None, help="model size (default: aki-4b on GPU, small on CPU)")
    parser.add_argument("--mode", default="mma", help="attention mode")
    parser.add_argument("--attn", default=None, help="attn_implementation (default: flex_attention on GPU, "
                                                     "sdpa on CPU)")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--pt-batch", type=int, default=None, help="torch engine: PT samples per padded step "
                                                                   "(GPU 32, CPU 8)")
    parser.add_argument("--sft-batch", type=int, default=None, help="torch engine: SFT samples per padded step "
                                                                    "(GPU 16, CPU 8)")
    parser.add_argument("--pack-tokens", type=int, default=2048, help="torch engine: tokens per packed row")
    parser.add_argument("--pack-rows", type=int, default=None, help="torch engine: packed rows per step (GPU 4, "
                                                                    "CPU 1)")
    parser.add_argument("--text-mean", type=float, default=150.0, help="mean SFT text tokens per sample")
    parser.add_argument("--precision", choices=("bf16", "amp"), default="bf16",
                        help="torch engine on GPU: weights (see above); deepspeed: the recipe's (fp32 on CPU)")
    parser.add_argument("--checkpointing", choices=("none", "full"), default=None,
                        help="activation checkpointing of the LLM layers (default: none; deepspeed: the recipe's)")
    parser.add_argument("--pt-recipe", default="aki4b_pt", help="deepspeed engine: recipe of the PT runs")
    parser.add_argument("--sft-recipe", default="aki4b_sft_mma", help="deepspeed engine: recipe of the SFT runs")
    parser.add_argument("--deepspeed", default=None,
                        help="deepspeed engine: DeepSpeed JSON instead of the recipe's (e.g. the ZeRO-2 one)")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="deepspeed engine: samples per rank per step (default: the recipe's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="deepspeed engine: further recipe overrides (repeatable)")
    parser.add_argument("--peak-flops", type=float, default=None,
                        help="peak FLOP/s per device for MFU (default: the GPU's dense bf16 peak by its name; "
                             "none on CPU)")
    parser.add_argument("--lora", action="store_true",
                        help="LoRA fine-tuning of the same model (pipeline.lora), see above")
    parser.add_argument("--lora-rank", type=int, default=64, help="--lora: adapter rank")
    parser.add_argument("--qlora", action="store_true", help="--lora with the adapted base layers in 4 bits "
                                                             "(bitsandbytes nf4)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    add_common_args(parser)
    args = parser.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    args.size = args.size or ("aki-4b" if on_gpu else "small")
    args.attn = args.attn or ("flex_attention" if on_gpu else "sdpa")
    args.pt_batch = args.pt_batch or (32 if on_gpu else 8)
    args.sft_batch = args.sft_batch or (16 if on_gpu else 8)
    args.pack_rows = args.pack_rows or (4 if on_gpu else 1)
    if args.engine == "torch":
        args.checkpointing = args.checkpointing or "none"
    args.lora = args.lora or args.qlora
    return args


def main(argv: Sequence[str] | None = None) -> Result | None:
    args = parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    table_peak = device_peak_flops(torch.cuda.get_device_name(args.device)) if on_gpu else None
    peak = args.peak_flops or table_peak
    bench = TorchEngine(args) if args.engine == "torch" else DeepSpeedEngine(args, RUNS[args.runs[0]])
    counts = count_model(bench.model)
    comparable = on_gpu and args.size == "aki-4b" and args.peak_flops is None and table_peak is not None
    figures: list[Figure] = []
    settings: dict[str, Any] = {k: v for k, v in vars(args).items() if k not in ("out", "no_write")}
    settings["params"] = dataclasses.asdict(counts)
    settings["world_size"] = bench.world
    if args.engine == "deepspeed":
        z = bench.ds_config.get("zero_optimization", {})
        settings.update(zero_stage=z.get("stage", 0), deepspeed_config=bench.ds_config,
                        activation_checkpointing=bench.config.model.activation_checkpointing)
    for name in args.runs:
        timed = time_run(RUNS[name], bench, args)
        run_figs, settings[name] = run_figures(name, timed, counts, bench.world, peak, comparable, on_gpu,
                                               getattr(bench, "memory_note", ""))
        if args.engine == "deepspeed":
            settings[name]["micro_batch"] = bench.micro_batch
        figures += run_figs
    figures += training_memory_figures(bench, bench.world)
    notes = [bench.describe() + (f"; LoRA rank {args.lora_rank} on the LLM's attention and MLP layers, connector "
                                 f"trained in full{', base layers in 4 bits (QLoRA nf4)' if args.qlora else ''}"
                                 if args.lora else "; full fine-tuning"),
             *(["LoRA: model FLOPs are counted as for full fine-tuning of the same model (6·N per token, the "
                "adapters' N included), so FLOP/s and MFU compare step times with full fine-tuning's, not the "
                "work done (the frozen weights need no weight gradients: about 4·N)"] if args.lora else []),
             f"size {args.size}, mode {args.mode}, attn {args.attn}; synthetic batch, data loading not timed",
             "MFU formula: pipeline/flops.py (6·N·tokens for trainable weights, LM head only where a target is "
             "predicted, visible attention pairs, frozen vision forward); peak: "
             + (f"{peak / 1e12:g} TFLOP/s per device" if peak else "n/a")]
    if not on_gpu:
        yardstick = gemm_flops(args.device, torch.float32)
        best = max(f.value for f in figures if f.name.endswith("achieved model FLOP/s (useful)")) * 1e12
        figures += [Figure("fp32 1024² matmul FLOP/s of this CPU (yardstick)", yardstick / 1e12, "TFLOP/s"),
                    Figure("best run's model FLOP/s over the matmul yardstick", best / yardstick, "fraction")]
    if not peak:
        notes.append("MFU n/a without a known peak (pass --peak-flops); the GPU goals are to be taken on H100/H200")
    name = result_name(("train_step" if args.engine == "torch" else f"train_step-deepspeed-zero{settings['zero_stage']}")
                       + ("-qlora" if args.qlora else "-lora" if args.lora else ""), args)
    result = Result(name, command_line("bench.train_step", argv), settings, figures, args.device, notes)
    if getattr(bench, "rank", 0) != 0:
        return None
    report(result, args.out, write=not args.no_write)
    return result


if __name__ == "__main__":
    main()
