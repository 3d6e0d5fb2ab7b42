"""Training recipes: YAML files validated into dataclasses, with ``--set key=value`` overrides.

A recipe (``pipeline/configs/*.yaml``) has four sections, one per dataclass below, and an optional
``eval:`` (:class:`pipeline.train_eval.EvalConfig`)::

    base: aki4b_pt.yaml          # optional: a recipe this one extends (merged recursively)
    model: {size: aki-4b, attention_mode: mma, ...}
    data:  {mixture: ..., collate: pack, ...}
    optim: {lr: 1.0e-4, min_lr: 1.0e-5, ...}
    train: {stage: pt, global_batch_size: 192, ...}

:func:`load_config` reads the recipe (following ``base:`` links), applies the command-line overrides,
and validates every value. An unknown or misspelt key, a value of the wrong type or an impossible
setting raises one :class:`ConfigError` naming the key — before the trainer starts any distributed
work. Checks that need the world size (batch divisibility) or the file system (data, weights) are in
:func:`pipeline.validation.validate_launch`, which the trainer calls right after. Every check is in
:mod:`pipeline.validation`.

The DeepSpeed JSONs are filled from the recipe by :mod:`pipeline.ds_config`.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pipeline.data.remote import DEFAULT_DOWNLOAD_RETRY, DEFAULT_DOWNLOAD_TIMEOUT
from pipeline.recipes import ConfigError  # noqa: F401  (the error every recipe check raises; imported from here)
from pipeline.recipes import REPO_ROOT, resolve_path  # noqa: F401  (imported from here by the pipeline)
from pipeline.lora import LoraConfig
from pipeline.train_eval import EvalConfig
from pipeline.recipes import Proportion, apply_overrides, build_dataclass, read_recipe, resolve_recipe
from pipeline.validation import SCHEDULERS, validate

if TYPE_CHECKING:
    import torch

RECIPES_DIR = Path(__file__).resolve().parent / "configs"


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
    lora: LoraConfig | None = None
    """LoRA / QLoRA fine-tuning of ``train.init_from`` (pipeline.lora); None: full fine-tuning."""


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
    download_retry: int = DEFAULT_DOWNLOAD_RETRY
    """Attempts of each download from object storage (a shard, an index, a manifest) before the run gives
    up; the waits between attempts double from 1 s (1, 2, 4, ... 128 s), so the default 9 rides out an
    outage of about 4 minutes (255 s of waiting plus the attempts). Only transient errors (unreachable
    endpoint, dropped connection, timeout, 5xx) are retried; a missing object or a denied access fails at
    once. Past the last attempt the process prints one line naming the endpoint, the object and the
    error and exits with status 75 (pipeline.data.remote.EXIT_STORAGE): the job ends instead of hanging,
    and ``--resume auto`` continues from the last checkpoint."""
    download_timeout: float = DEFAULT_DOWNLOAD_TIMEOUT
    """Seconds one download attempt may wait for the storage to answer (streaming's ``download_timeout``,
    the client's connect and read timeouts)."""
    max_skip_fraction: float | None = 0.1
    """Stop the run when more than this share of the samples read so far (over all ranks) was dropped
    (undecodable image, image count mismatch, too long, ...), once at least
    pipeline.metrics.MIN_DROPPED_TO_STOP samples were; None: never stop. Every dropped sample is counted
    by source and reason in ``metrics.jsonl`` (``dropped``), wandb and the run's summary either way."""
    on_corrupt_shard: str = "stop"
    """A shard that still fails its size/hash check against ``index.json`` after one fresh download, or a
    sample whose token or modality ids are out of range (pipeline.data.integrity): "stop" ends the run
    with one line naming the dataset, the shard (and the sample); "skip" leaves it out, its samples
    counted as dropped (reasons ``corrupt_shard`` / ``corrupt_sample``)."""
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
    """transformers.get_scheduler name; one of pipeline.validation.SCHEDULERS."""
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
    step_timeout: float | None = 1800.0
    """Seconds without a finished optimizer step (or checkpoint) after which each rank prints the stack of
    every thread and exits non-zero (pipeline.watchdog): a stall (storage, a dead rank, a stuck collective)
    ends the job instead of holding its allocation; 0 or None: no watchdog. Give room for the slowest
    step, the first one (compilation) and a checkpoint save."""
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
    eval: EvalConfig | None = None
    """Held-out loss per source and a benchmark while training (pipeline.train_eval); None: no evaluation."""
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


def training_dtype(config: Config) -> "torch.dtype":
    """The dtype the model trains in (``train.precision``); the collator ships pixels in it."""
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32}[config.train.precision]


def data_phases(data: DataConfig) -> list[DataPhase]:
    """The run's data phases: ``data.phases``, or one phase named "data" of ``data.mixture``/``data.datasets``."""
    if data.phases is not None:
        return list(data.phases)
    return [DataPhase(name="data", start_step=0, mixture=data.mixture, datasets=data.datasets)]


def save_config(config: Config, path: str | os.PathLike) -> None:
    """Write the validated recipe as YAML (loadable again with :func:`load_config`)."""
    with open(path, "w") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)
