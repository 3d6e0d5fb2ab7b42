"""Every check of a recipe: on its own (:func:`validate`, run by :func:`pipeline.config.load_config`) and
against its launch (:func:`validate_launch`, run on every rank before any distributed work).

Each failure is one :class:`ConfigError` naming the key, the value and the fix. :func:`validate` needs
neither the world size nor the file system; :func:`validate_launch` checks the batch split into ranks and
accumulation steps, and that the files the recipe names exist.
"""
from __future__ import annotations

import difflib
import os
import typing
from typing import TYPE_CHECKING, Any

from pipeline.data.remote import is_remote
from pipeline.recipes import ConfigError, resolve_path

if TYPE_CHECKING:       # the recipe's dataclasses (pipeline.config imports this module to validate them)
    from pipeline.config import Config, DataConfig, DatasetSource, OptimConfig

# The values a recipe may choose from (the dataclasses in pipeline.config document each key).
STAGES = ("pt", "sft")
PRECISIONS = ("bf16", "fp32")
COLLATE_MODES = ("pad", "pack")
ATTN_IMPLEMENTATIONS = ("sdpa", "flex_attention", "eager")
INPUT_ORDERS = ("it", "ti")   # image-then-text (as stored) / text-then-image (DOT)
SCHEDULE_SPANS = ("stage", "order")
WANDB_MODES = ("online", "offline", "disabled")
# LR schedules by transformers.get_scheduler name -> the scheduler_specific_kwargs they take.
SCHEDULERS: dict[str, typing.Callable[["OptimConfig"], dict[str, Any]]] = {
    "cosine_with_min_lr": lambda optim: {"min_lr": optim.min_lr},
    "linear": lambda optim: {},
    "constant_with_warmup": lambda optim: {},
}


def _choice(value: str, choices: typing.Iterable[str], key: str) -> None:
    choices = list(choices)
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"config `{key}` is {value!r}; {hint}choose one of {', '.join(map(repr, choices))}")


def _positive(value: float, key: str, allow_zero: bool = False) -> None:
    if not (value > 0 or (allow_zero and value == 0)) or value != value:
        raise ConfigError(f"config `{key}` must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def validate(config: Config) -> None:
    """Every check that needs neither the world size nor the file system."""
    from pipeline.chat import LAYOUTS
    from pipeline.data.dot import TI_PT_IMAGE
    from pipeline.model.attention import MODES
    from pipeline.model.sizes import MODEL_SIZES

    m, d, o, t = config.model, config.data, config.optim, config.train
    _choice(m.size, MODEL_SIZES, "model.size")
    _choice(m.attention_mode, MODES, "model.attention_mode")
    _choice(m.text_layout, LAYOUTS, "model.text_layout")
    _choice(m.attn_implementation, ATTN_IMPLEMENTATIONS, "model.attn_implementation")
    _validate_phases(d, t.total_steps)
    _choice(d.collate, COLLATE_MODES, "data.collate")
    for key in ("pack_tokens", "max_length", "pad_to_multiple_of"):
        _positive(getattr(d, key), f"data.{key}")
    if d.predownload is not None:
        _positive(d.predownload, "data.predownload")
    _positive(d.num_workers, "data.num_workers", allow_zero=True)
    if d.download_retry < 1:
        raise ConfigError(f"config `data.download_retry` must be >= 1 (attempts of each download), got "
                          f"{d.download_retry}")
    _positive(d.download_timeout, "data.download_timeout")
    if d.max_skip_fraction is not None and not 0 <= d.max_skip_fraction < 1:
        raise ConfigError(f"config `data.max_skip_fraction` must be in [0, 1) (a share of the samples read), "
                          f"got {d.max_skip_fraction}; null never stops the run")
    if d.collate == "pack" and d.pack_tokens < d.max_length:
        raise ConfigError(f"config `data.pack_tokens` ({d.pack_tokens}) is smaller than `data.max_length` "
                          f"({d.max_length}): a packed row must hold the longest sample")
    if not d.orders:
        raise ConfigError("config `data.orders` is empty; use [it] (as stored) or [ti, it] (DOT)")
    for i, order in enumerate(d.orders):
        _choice(order, INPUT_ORDERS, f"data.orders[{i}]")
    _choice(d.ti_pt_image, TI_PT_IMAGE, "data.ti_pt_image")
    _positive(o.lr, "optim.lr")
    _positive(o.min_lr, "optim.min_lr", allow_zero=True)
    if o.min_lr > o.lr:
        raise ConfigError(f"config `optim.min_lr` ({o.min_lr}) is above `optim.lr` ({o.lr}); "
                          "the cosine schedule decays from lr down to min_lr")
    for key in ("warmup_steps", "weight_decay", "grad_clip", "eps"):
        _positive(getattr(o, key), f"optim.{key}", allow_zero=key != "eps")
    for i, beta in enumerate(o.betas):
        if not 0 <= beta < 1:
            raise ConfigError(f"config `optim.betas[{i}]` must be in [0, 1), got {beta}")
    _choice(o.scheduler, SCHEDULERS, "optim.scheduler")
    _choice(o.schedule_span, SCHEDULE_SPANS, "optim.schedule_span")
    if o.schedule_span == "order" and (t.total_steps % len(d.orders)
                                       or o.warmup_steps >= t.total_steps // len(d.orders)):
        raise ConfigError(f"config `optim.schedule_span` is 'order': `train.total_steps` ({t.total_steps}) must "
                          f"split evenly between the {len(d.orders)} orders of `data.orders` and each share must "
                          f"be longer than `optim.warmup_steps` ({o.warmup_steps})")
    _choice(t.stage, STAGES, "train.stage")
    _choice(t.precision, PRECISIONS, "train.precision")
    _choice(t.wandb_mode, WANDB_MODES, "train.wandb_mode")
    for key in ("global_batch_size", "micro_batch_size", "total_steps", "save_every", "keep_last",
                "max_nonfinite_steps", "log_every"):
        _positive(getattr(t, key), f"train.{key}")
    if t.step_timeout is not None:
        _positive(t.step_timeout, "train.step_timeout", allow_zero=True)
    if o.warmup_steps >= t.total_steps:
        raise ConfigError(f"config `optim.warmup_steps` ({o.warmup_steps}) must be below `train.total_steps` "
                          f"({t.total_steps})")
    if t.total_steps < len(d.orders):
        raise ConfigError(f"config `train.total_steps` ({t.total_steps}) cannot be split between the "
                          f"{len(d.orders)} input orders of `data.orders`")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(f"config `train.global_batch_size` ({t.global_batch_size}) is not a multiple of "
                          f"`train.micro_batch_size` ({t.micro_batch_size})")
    if t.output_dir is None:
        t.output_dir = os.path.join("runs", config.name)
    if m.lora is not None:
        _validate_lora(config)
    if config.eval is not None:
        _validate_eval(config)


def _validate_eval(config: Config) -> None:
    """``eval``: positive sizes, one source per entry, a known benchmark, a metric ``eval.best`` can name, and
    evaluations at the checkpoint steps that may keep the best."""
    from pipeline.train_eval import BENCHMARKS, HELDOUT

    e, t = config.eval, config.train
    _positive(e.every, "eval.every", allow_zero=True)
    for key in ("max_samples", "micro_batch"):
        if getattr(e, key) < 1:
            raise ConfigError(f"config `eval.{key}` must be a positive integer, got {getattr(e, key)!r}")
    for i, s in enumerate(e.datasets or []):
        if (s.path is None) == (s.remote is None):
            raise ConfigError(f"config `eval.datasets[{i}]` needs exactly one of `path` (a local folder) and "
                              f"`remote` (s3://bucket/prefix), got {s!r}")
        if s.remote is not None and not is_remote(s.remote):
            raise ConfigError(f"config `eval.datasets[{i}].remote` must be an s3:// URL, got {s.remote!r}")
    b = e.benchmark
    if b is not None:
        _choice(b.task, BENCHMARKS, "eval.benchmark.task")
        if not b.data:
            raise ConfigError(f"config `eval.benchmark.data` is empty; give the {b.task} files (as the benchmark "
                              f"command's --data)")
        for key in ("limit", "batch_size", "max_new_tokens"):
            if getattr(b, key) < 1:
                raise ConfigError(f"config `eval.benchmark.{key}` must be a positive integer, "
                                  f"got {getattr(b, key)!r}")
    if e.best is not None:
        kind, _, metric = e.best.partition("/")
        if kind == HELDOUT:
            if not metric:
                raise ConfigError(f"config `eval.best` is {e.best!r}; name a source, e.g. {HELDOUT}/overall")
        elif b is None or kind != b.task:
            if b is None:
                scores = " (or add `eval.benchmark` to keep the best by a benchmark score)"
            else:
                names = ", ".join(f"{b.task}/{k}" for k in BENCHMARKS[b.task].higher_is_better)
                scores = f" or a {b.task} score ({names})"
            raise ConfigError(f"config `eval.best` is {e.best!r}; choose {HELDOUT}/overall, {HELDOUT}/<source>{scores}")
        else:
            _choice(metric, BENCHMARKS[kind].higher_is_better, "eval.best (the score after the task)")
        if e.every == 0 or t.save_every % e.every:
            raise ConfigError(f"config `eval.best` keeps the best checkpoint among evaluations at checkpoint steps: "
                              f"`train.save_every` ({t.save_every}) must be a multiple of `eval.every` ({e.every})")


def _validate_lora(config: Config) -> None:
    """``model.lora``: rank, alpha, dropout, target names (only the LLM's linear layers), quantization, and
    the export it fine-tunes (``train.init_from``)."""
    from pipeline.lora import LLM_TARGETS, NOT_TARGETS, QUANTIZATIONS

    lora = config.model.lora
    if lora.rank <= 0:
        raise ConfigError(f"config `model.lora.rank` must be a positive integer, got {lora.rank!r} "
                          "(e.g. --set model.lora.rank=64)")
    _positive(lora.alpha, "model.lora.alpha")
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"config `model.lora.dropout` must be in [0, 1), got {lora.dropout!r}")
    if not lora.target_modules:
        raise ConfigError(f"config `model.lora.target_modules` is empty; give some of {', '.join(LLM_TARGETS)}")
    for i, name in enumerate(lora.target_modules):
        key = f"model.lora.target_modules[{i}]"
        if name in NOT_TARGETS:
            raise ConfigError(f"config `{key}` is {name!r}, {NOT_TARGETS[name]}: LoRA wraps only the LLM's "
                              f"attention and MLP layers; choose from {', '.join(map(repr, LLM_TARGETS))}")
        _choice(name, LLM_TARGETS, key)
    if lora.quantize is not None:
        _choice(lora.quantize, QUANTIZATIONS, "model.lora.quantize")
    if config.train.init_from is None:
        raise ConfigError("config `model.lora` is set but `train.init_from` is not: LoRA fine-tunes an AKI export "
                          "(e.g. a converted released AKI-4B: python -m pipeline.convert from-official ...); "
                          "set train.init_from to its folder")


def _validate_sources(mixture: str | None, datasets: list[DatasetSource] | None, key: str) -> None:
    if mixture is not None and datasets is not None:
        raise ConfigError(f"config sets both `{key}.mixture` and `{key}.datasets`; keep one")
    if datasets is not None and sum(s.proportion for s in datasets) <= 0:
        raise ConfigError(f"config `{key}.datasets`: the proportions sum to 0; give at least one a weight > 0")
    limited = [s.samples is not None for s in datasets or []]
    if any(limited) and not all(limited):
        raise ConfigError(f"config `{key}.datasets`: some streams set `samples` and some do not; a phase "
                          "weights its streams either all by `samples` or all by `proportion`")
    for i, s in enumerate(datasets or []):
        if (s.path is None) == (s.remote is None):
            raise ConfigError(f"config `{key}.datasets[{i}]` needs exactly one of `path` (a local folder) and "
                              "`remote` (an s3:// URL, cached in `local`)")
        if s.remote is not None and not is_remote(s.remote):
            raise ConfigError(f"config `{key}.datasets[{i}].remote` is {s.remote!r}: give a URL such as "
                              "s3://bucket/prefix (local folders go in `path`)")
        if s.samples is not None:
            _positive(s.samples, f"{key}.datasets[{i}].samples")
            if s.proportion != 1.0:
                raise ConfigError(f"config `{key}.datasets[{i}]` sets both `samples` and `proportion`; a stream "
                                  "limited to `samples` is weighted by that number: remove `proportion`")


def _validate_phases(d: DataConfig, total_steps: int) -> None:
    """Either one set of data (``mixture``/``datasets``) or ``phases`` starting at 0, in step order."""
    if d.phases is None:
        _validate_sources(d.mixture, d.datasets, "data")
        return
    if d.mixture is not None or d.datasets is not None:
        raise ConfigError("config sets `data.phases` and also `data.mixture`/`data.datasets`; give the data "
                          "in the phases only (set the others to null)")
    if not d.phases or d.phases[0].start_step != 0:
        raise ConfigError("config `data.phases` must list at least one phase and the first must have start_step 0")
    for i, phase in enumerate(d.phases):
        key = f"data.phases[{i}]"
        if phase.mixture is None and not phase.datasets:
            raise ConfigError(f"config `{key}` ({phase.name!r}) has no data: set its `mixture` or `datasets`")
        _validate_sources(phase.mixture, phase.datasets, key)
        if i and not d.phases[i - 1].start_step < phase.start_step < total_steps:
            raise ConfigError(f"config `{key}.start_step` ({phase.start_step}) must be after the previous phase's "
                              f"({d.phases[i - 1].start_step}) and below `train.total_steps` ({total_steps})")
    names = [p.name for p in d.phases]
    if len(set(names)) != len(names):
        raise ConfigError(f"config `data.phases`: names {names} repeat; give each phase its own name")
    if len(d.phases) > 1 and len(d.orders) > 1:
        raise ConfigError("config has several `data.phases` and several `data.orders`; DOT splits a stage "
                          "with one set of data: use one phase, or one order")


def grad_accum_steps(config: Config, world_size: int) -> int:
    """Accumulation steps per optimizer step; ConfigError when the batch does not divide evenly."""
    t = config.train
    per_step = t.micro_batch_size * world_size
    if world_size < 1 or t.global_batch_size % per_step:
        raise ConfigError(
            f"`train.global_batch_size` ({t.global_batch_size}) is not divisible by `train.micro_batch_size` "
            f"({t.micro_batch_size}) x world size ({world_size}) = {per_step}; change one of them "
            f"(e.g. --set train.micro_batch_size=...)")
    return t.global_batch_size // per_step


def validate_launch(config: Config, world_size: int) -> int:
    """Checks that need the world size and the files; returns the accumulation steps.

    Call it on every rank before any distributed work (it only reads files).
    """
    accum = grad_accum_steps(config, world_size)
    d = config.data
    if d.phases is None and d.mixture is None and not d.datasets:
        raise ConfigError("config has no data: set `data.mixture` (a mixture YAML from data_prep) or "
                          "`data.datasets` (e.g. --set 'data.datasets=[{path: data/kale}]')")
    paths = {"train.deepspeed": config.train.deepspeed, "train.init_from": config.train.init_from,
             "model.tokenizer": config.model.tokenizer}
    for i, phase in enumerate([d] if d.phases is None else d.phases):    # data_phases(d), keyed as in the recipe
        key = "data" if d.phases is None else f"data.phases[{i}]"
        paths[f"{key}.mixture"] = phase.mixture
        paths.update({f"{key}.datasets[{j}].path": s.path for j, s in enumerate(phase.datasets or [])})
    for key, path in paths.items():
        if path is not None and not is_remote(path) and not resolve_path(path).exists():
            raise ConfigError(f"config `{key}`: {path} does not exist (working directory {os.getcwd()})")
    if config.model.lora is not None:
        _validate_lora_launch(config)
    if config.eval is not None:
        paths = {f"eval.datasets[{i}].path": s.path for i, s in enumerate(config.eval.datasets or [])}
        if config.eval.benchmark is not None:
            paths["eval.benchmark.data"] = config.eval.benchmark.data
        for key, path in paths.items():
            if path is not None and not resolve_path(path).exists():
                raise ConfigError(f"config `{key}`: {path} does not exist (working directory {os.getcwd()})")
    return accum


def _validate_lora_launch(config: Config) -> None:
    """QLoRA on this machine and engine (bitsandbytes' 4-bit layers tried once; not under ZeRO-3)."""
    import json

    from pipeline.lora import quantization_problem

    try:
        stage = json.loads(resolve_path(config.train.deepspeed).read_text()).get("zero_optimization", {}).get("stage", 0)
    except (OSError, ValueError):
        stage = 0               # pipeline.ds_config reports an unreadable DeepSpeed JSON
    problem = quantization_problem(config.model.lora, stage)
    if problem is not None:
        raise ConfigError(f"config `model.lora.quantize`: {problem}")
