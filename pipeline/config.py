"""Training recipes: YAML files validated into dataclasses, with ``--set key=value`` overrides.

A recipe (``pipeline/configs/*.yaml``) has four sections, one per dataclass below::

    base: aki4b_pt.yaml          # optional: a recipe this one extends (merged recursively)
    model: {size: aki-4b, attention_mode: mma, ...}
    data:  {mixture: ..., collate: pack, ...}
    optim: {lr: 1.0e-4, min_lr: 1.0e-5, ...}
    train: {stage: pt, global_batch_size: 192, ...}

:func:`load_config` reads the recipe (following ``base:`` links), applies the command-line overrides,
and validates every value. An unknown or misspelt key, a value of the wrong type or an impossible
setting raises one :class:`ConfigError` naming the key — before the trainer starts any distributed
work. Checks that need the world size (batch divisibility) or the file system (data, weights) are in
:func:`validate_launch`, which the trainer calls right after.

The DeepSpeed JSONs are filled from the recipe by :mod:`pipeline.ds_config`.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pipeline.data.remote import is_remote
from pipeline.recipes import (ConfigError, Proportion, apply_overrides, build_dataclass, read_recipe,
                              resolve_recipe)

if TYPE_CHECKING:
    import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES_DIR = Path(__file__).resolve().parent / "configs"
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


@dataclasses.dataclass
class ModelConfig:
    """Which AKI variant to build and how it runs."""

    size: str = "tiny"
    """Model size name in pipeline.model.sizes.MODEL_SIZES ("aki-4b", "small", "tiny")."""
    attention_mode: str = "mma"
    """LLM attention rule, a key of pipeline.model.attention.MODES ("causal", "mma", "mma_general", "cca")."""
    vision_weights: str | None = None
    """SigLIP weights (folder or hub id); None: the size's default (random init when it has none)."""
    llm_weights: str | None = None
    """Phi-3 weights (folder or hub id); None: the size's default (random init when it has none)."""
    tokenizer: str | None = None
    """Tokenizer folder; None: the LLM weights' folder, or the tokenizer saved in ``train.init_from``."""
    attn_implementation: str = "sdpa"
    """Attention kernel: "sdpa" (dense boolean mask, CPU and tests) or "flex_attention" (GPU BlockMask)."""
    activation_checkpointing: bool = False
    """Recompute LLM layer activations in the backward pass (less memory, about 30% more compute)."""
    text_layout: str = "released"
    """Text layout of the samples and prompts (pipeline.chat.LAYOUTS): "released" (the released AKI-4B's:
    BOS … EOS, answers end with EOS) or "phi3_chat"; the data's manifests must say the same."""


@dataclasses.dataclass
class DatasetSource:
    """One dataset written by data_prep (MDS shards + manifest.json), local or in a bucket, and its weight."""

    path: str | None = None
    """Folder holding index.json, the shards and manifest.json. Set this or ``remote``."""
    remote: str | None = None
    """The dataset's ``s3://bucket/prefix``: streamed into ``local`` (endpoint, credentials: environment)."""
    local: str | None = None
    """Cache folder of a ``remote`` dataset, shared by the ranks of a node; None: under ``data.cache_dir``."""
    proportion: Proportion = Proportion(1.0)
    """Relative sampling weight; weights are normalised to sum to 1 (Table 4 ratios can be given as-is)."""
    name: str | None = None
    """Label for logs; None: the folder's name."""
    samples: int | None = None
    """Read only a seeded sample of this many of the folder's samples, the same ones in every epoch, in
    every phase and order that names the folder, and in every run with the same ``data.shuffle_seed``
    (mosaicml-streaming's per-stream ``choose`` with fixed sampling); None: every sample. Streams with
    ``samples`` are weighted by it: set it on every stream of the phase and leave ``proportion`` at 1."""


@dataclasses.dataclass
class DataPhase:
    """A stretch of the run that reads one set of datasets, from ``start_step`` to the next phase."""

    name: str
    """Label (logs, the loader state of a checkpoint, the run's metrics)."""
    start_step: int = 0
    """First optimizer step (0-based) of this phase; the first phase starts at 0."""
    mixture: str | None = None
    """Mixture YAML written by data_prep, as ``data.mixture``. Set this or ``datasets``."""
    datasets: list[DatasetSource] | None = None
    """Dataset folders with proportions, as ``data.datasets``."""


@dataclasses.dataclass
class DataConfig:
    """Where samples come from and how they are batched."""

    mixture: str | None = None
    """Mixture YAML written by data_prep (``streams: [{name, local, proportion}]``), a path or an s3:// URL
    (its datasets are then streamed from beside it). Set this or ``datasets``."""
    datasets: list[DatasetSource] | None = None
    """Dataset folders with proportions, instead of a mixture file."""
    cache_dir: str | None = None
    """Per-node cache root of remote datasets (each in a sub-folder named after its URL); None: a folder
    under the node's temporary directory ($TMPDIR)."""
    cache_limit: str | None = None
    """Most bytes the cached shards of each remote data phase may take per node (e.g. "200gb"); the least
    recently read shards are evicted. None: no limit. It must hold (2 x predownload + 3) of the largest
    shards per process reading on the node (ranks x max(1, ``num_workers``)), else the loader refuses to
    start (pipeline.data.dataset.cache_shards_needed says why)."""
    predownload: int | None = None
    """Samples each reading process downloads ahead of training (streaming's ``predownload``); None:
    streaming's default, 8 x ``train.micro_batch_size``. Lower it to fit a smaller ``cache_limit``."""
    collate: str = "pack"
    """"pad": one sample per row, padded to the longest; "pack": several samples per row of ``pack_tokens``."""
    pack_tokens: int = 2048
    """Token budget of one packed row (``collate: pack``); must hold the longest sample (``max_length``)."""
    max_length: int = 512
    """Longest sample in tokens, image slots included; longer samples are dropped and counted."""
    pad_to_multiple_of: int = 8
    """Round the padded row length up to a multiple of this (tensor-core friendly shapes)."""
    num_workers: int = 2
    """DataLoader worker processes per rank (JPEG decoding runs there)."""
    shuffle: bool = True
    """Shuffle samples (deterministically from ``shuffle_seed``)."""
    shuffle_seed: int = 9176
    """Seed of the streaming shuffle; the same seed gives the same sample order on any number of ranks."""
    num_canonical_nodes: int | None = None
    """streaming's canonical node count, which fixes the sample order; None: the number of nodes of the
    first run (kept on resume). Give it to get the same order as a run on another number of nodes."""
    orders: list[str] = dataclasses.field(default_factory=lambda: ["it"])
    """Input orders of this stage, trained one after another, each for an equal share of the steps.
    ["it"]: image then text, as stored; ["ti", "it"]: dual-order training (DOT); ["ti"]: DOT ablation.
    Each order reads its data from the start (the same samples in the same sequence), see pipeline/data/dot.py."""
    ti_pt_image: str = "before_end"
    """Where a T&I pre-training sample puts the image (pipeline.data.dot.TI_PT_IMAGE): "before_end"
    (``<s>{caption}<image><|endofchunk|>``: the caption's end is predicted after the image, so the connector
    learns) or "last" (``<s>{caption}<|endofchunk|><image>``: a text-only step, no connector gradient)."""
    phases: list[DataPhase] | None = None
    """Data phases of one run (one optimizer, one LR schedule over all of them), e.g. Kale from step 0
    then OCR-200m from step 250000; each phase reads its datasets from their start. None: one phase of
    ``mixture`` / ``datasets``. Set either ``phases`` or ``mixture``/``datasets``."""


@dataclasses.dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (created by the trainer in PyTorch, not by DeepSpeed)."""

    lr: float = 1e-4
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = 1e-5
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 0
    """Linear warmup length in optimizer steps."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    weight_decay_all: bool = False
    """true: decay every trainable parameter, as the official AKI code does; false: exempt the 1-D ones
    (biases, norm weights), the common transformers practice."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW moment coefficients."""
    eps: float = 1e-8
    """AdamW denominator epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0: no clipping)."""
    scheduler: str = "cosine_with_min_lr"
    """transformers.get_scheduler name; one of SCHEDULERS."""
    schedule_span: str = "stage"
    """What one LR schedule (warmup + decay) spans: "stage" (all of ``train.total_steps``, across data
    phases and input orders) or "order" (restarted for each of ``data.orders``, over its share of the steps)."""

    def scheduler_kwargs(self) -> dict[str, Any]:
        """``scheduler_specific_kwargs`` for ``transformers.get_scheduler(self.scheduler, ...)``."""
        return SCHEDULERS[self.scheduler](self)


@dataclasses.dataclass
class TrainConfig:
    """The run: stage, batch geometry, length, precision, checkpoints and logging."""

    stage: str = "pt"
    """"pt" (captions) or "sft" (instructions); recorded in the export and checked by the next stage."""
    global_batch_size: int = 8
    """Samples per optimizer step over all ranks (= micro_batch_size x world size x accumulation steps)."""
    micro_batch_size: int = 2
    """Samples per rank per forward/backward."""
    total_steps: int = 10
    """Optimizer steps of this stage (the LR schedule's length)."""
    precision: str = "bf16"
    """"bf16" (GPU) or "fp32" (CPU runs and tests)."""
    seed: int = 0
    """Seed of parameter initialisation and of every random choice in the trainer."""
    save_every: int = 1000
    """Save a resumable checkpoint every this many steps (and at the end)."""
    keep_last: int = 2
    """Resumable checkpoints to keep; older ones are deleted."""
    output_dir: str | None = None
    """Run folder (checkpoints, export, logs); None: runs/<recipe name>."""
    init_from: str | None = None
    """Export folder of a previous stage to start from (e.g. PT export for SFT); None: pretrained parts."""
    deepspeed: str = "ds_configs/zero3_bf16.json"
    """DeepSpeed JSON; relative paths are looked up from the working directory, then the repository."""
    max_nonfinite_steps: int = 10
    """Stop after this many consecutive steps with a non-finite loss (such steps are skipped)."""
    log_every: int = 10
    """Log metrics every this many steps."""
    wandb_project: str = "aki"
    """Weights & Biases project."""
    wandb_mode: str = "offline"
    """"offline" (default: write locally, sync later), "online" or "disabled"."""


@dataclasses.dataclass
class Config:
    """A whole recipe."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    name: str = "run"
    """The recipe's name (its file name without .yaml); names the default output folder."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dictionary (YAML/JSON-serialisable), e.g. to store next to a checkpoint."""
        out = dataclasses.asdict(self)
        out["optim"]["betas"] = list(self.optim.betas)
        return out


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Read a recipe (path or shipped name), apply ``--set`` overrides, validate. Raises ConfigError."""
    recipe = resolve_recipe(path, RECIPES_DIR)
    raw = apply_overrides(read_recipe(recipe), list(overrides or []))
    raw.setdefault("name", recipe.stem)
    config = build_dataclass(Config, raw)
    validate(config)
    return config


# --------------------------------------------------------------------------- validation


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


def training_dtype(config: Config) -> "torch.dtype":
    """The dtype the model trains in (``train.precision``); the collator ships pixels in it."""
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32}[config.train.precision]


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


def data_phases(data: DataConfig) -> list[DataPhase]:
    """The run's data phases: ``data.phases``, or one phase named "data" of ``data.mixture``/``data.datasets``."""
    if data.phases is not None:
        return list(data.phases)
    return [DataPhase(name="data", start_step=0, mixture=data.mixture, datasets=data.datasets)]


def resolve_path(path: str) -> Path:
    """A path as given (absolute, or relative to the working directory), else relative to the repository."""
    p = Path(path)
    if p.is_absolute() or p.exists() or not (REPO_ROOT / p).exists():
        return p
    return REPO_ROOT / p


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
    for i, phase in enumerate(data_phases(d)):
        key = "data" if d.phases is None else f"data.phases[{i}]"
        paths[f"{key}.mixture"] = phase.mixture
        paths.update({f"{key}.datasets[{j}].path": s.path for j, s in enumerate(phase.datasets or [])})
    for key, path in paths.items():
        if path is not None and not is_remote(path) and not resolve_path(path).exists():
            raise ConfigError(f"config `{key}`: {path} does not exist (working directory {os.getcwd()})")
    return accum


def save_config(config: Config, path: str | os.PathLike) -> None:
    """Write the validated recipe as YAML (loadable again with :func:`load_config`)."""
    with open(path, "w") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)
