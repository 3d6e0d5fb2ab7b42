"""Evaluation while training: held-out loss per source and a small benchmark, on the engine that trains.

``eval:`` in a recipe (:class:`EvalConfig`) turns it on::

    eval:
      every: 500                  # optimizer steps between evaluations (and always at the last step)
      max_samples: 256            # held-out samples per source, the same ones every time
      micro_batch: 8              # samples per rank per forward
      best: heldout/overall       # the metric whose best checkpoint is kept (never pruned)
      benchmark: {task: cv_bench, data: /data/CV-Bench, limit: 200}

**Held-out loss.** The held-out datasets are the holdouts that ``data_prep`` wrote beside the run's own
datasets (``--holdout``; each training dataset's manifest names its held-out folder), or the folders
listed in ``eval.datasets`` (both found and opened by :mod:`pipeline.data.heldout`). Each evaluation
reads the first ``max_samples`` samples of every held-out dataset (index order: the same samples every
time, on any number of ranks), sample ``i`` on rank
``i mod world``, pads them one per row and runs them through the training engine in eval mode without
gradients. Per source it sums the cross-entropy and the number of target tokens over ranks and
micro-batches (one all-reduce) and reports their ratio — the token mean over target tokens, the same
rule as the training loss — and ``heldout/overall``, the token mean over every source. Under ZeRO-3 every
rank takes part in every forward (a rank with fewer samples runs an empty placeholder row): there is no
second copy of the model.

**Benchmark.** ``eval.benchmark`` runs a generation benchmark of :mod:`pipeline.eval` (:data:`BENCHMARKS`:
``cv_bench``, ``pope``) on its first ``limit`` questions, with the readers, prompts and scoring of its
command line (``python -m pipeline.eval.cv_bench``): questions sharded ``rank::world``, greedy decoding,
every rank decoding until all ranks are done (:func:`pipeline.generate.generate_ids` ``synced``).

**Training is not disturbed.** The held-out data has its own readers (the training stream's position is
untouched); the RNG states of Python, NumPy and torch are saved before and restored after; the model's
train/eval mode is restored. A run that evaluates gives the same losses and data as one that does not.

**What it reports.** The benchmark's answers and scores of each evaluation in
``{output_dir}/eval/<task>/step_<step>/`` (``predictions.jsonl``, ``scores.json``). One ``eval`` event per
evaluation in ``metrics.jsonl`` (``heldout/<source>``,
``heldout/overall``, ``<task>/<score>``, samples and target tokens per source, ``eval_s`` and
``eval_share``: evaluation time over training time since the previous evaluation), the same figures in
wandb under ``eval/`` (one chart per source), and the held-out loss in the progress bar.
:class:`BestTracker` keeps the best value of ``eval.best`` among evaluations at checkpoint steps (lower
is better for a loss, higher for a benchmark score); that checkpoint is never pruned and the record
survives ``--resume`` (``trainer_state.json``).

Recipe checks are in :mod:`pipeline.validation` (``_validate_eval``) and :func:`check_eval_access`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from pipeline.config import Config

HELDOUT = "heldout"
OVERALL = "overall"


@dataclasses.dataclass
class BenchmarkConfig:
    """A small generation benchmark run at each evaluation (``eval.benchmark``)."""

    task: str = "cv_bench"
    """Which benchmark: a key of pipeline.train_eval.BENCHMARKS ("cv_bench", "pope")."""
    data: str = ""
    """The benchmark's files, as its command line's ``--data`` (CV-Bench folder or file; POPE folder)."""
    limit: int = 64
    """Evaluate the first this many questions (the same ones every time)."""
    batch_size: int = 8
    """Questions per rank per generation batch."""
    max_new_tokens: int = 8
    """Longest answer generated (greedy)."""


@dataclasses.dataclass
class EvalSource:
    """One held-out dataset folder written by data_prep (``eval.datasets``)."""

    path: str | None = None
    """Local folder (index.json, shards, manifest.json). Set this or ``remote``."""
    remote: str | None = None
    """Its ``s3://bucket/prefix`` instead; cached in ``local`` (None: under ``data.cache_dir``)."""
    local: str | None = None
    """Cache folder of a ``remote`` dataset."""
    name: str | None = None
    """Label in the reports; None: the folder's name."""


@dataclasses.dataclass
class EvalConfig:
    """Evaluation while training (``eval:``): held-out loss per source, optionally a benchmark."""

    every: int = 0
    """Evaluate every this many optimizer steps, and at the last step; 0: only at the last step."""
    datasets: list[EvalSource] | None = None
    """Held-out datasets; None: the holdouts data_prep wrote beside the run's datasets (``--holdout``)."""
    max_samples: int = 64
    """Held-out samples evaluated per source: the first this many of each dataset, every time."""
    micro_batch: int = 4
    """Held-out samples per rank per forward (one per padded row)."""
    best: str | None = None
    """Keep the checkpoint with the best value of this metric: "heldout/overall", "heldout/<source>" (lower
    is better) or "<task>/<score>" of the benchmark, e.g. "cv_bench/overall" (higher is better). Only
    evaluations at checkpoint steps count, so ``train.save_every`` must be a multiple of ``every``."""
    benchmark: BenchmarkConfig | None = None
    """A generation benchmark at each evaluation; None: held-out loss only."""


# ---------------------------------------------------------------------------------------- benchmarks


@dataclasses.dataclass(frozen=True)
class BenchmarkTask:
    """A benchmark of :mod:`pipeline.eval`: how to read its items and the module that scores them."""

    read: Callable[[str], tuple[list[Any], Any]]
    benchmark: Callable[[], Any]          # -> pipeline.eval.runner.Benchmark (imported when used)
    higher_is_better: tuple[str, ...]     # score names (flattened, "/"-joined) that eval.best may name


def _cv_bench() -> Any:
    from pipeline.eval.cv_bench import BENCHMARK

    return BENCHMARK


def _pope() -> Any:
    from pipeline.eval.pope import BENCHMARK

    return BENCHMARK


def _read_cv_bench(path: str) -> tuple[list[Any], Any]:
    from pipeline.eval.readers import read_cv_bench

    return read_cv_bench(path)


def _read_pope(path: str) -> tuple[list[Any], Any]:
    from pipeline.eval.readers import read_pope

    return read_pope(path)


BENCHMARKS: dict[str, BenchmarkTask] = {
    "cv_bench": BenchmarkTask(_read_cv_bench, _cv_bench, ("overall", "accuracy", "2D", "3D", "strict/overall")),
    "pope": BenchmarkTask(_read_pope, _pope, ("mean/f1", "mean/accuracy")),
}


def flatten_scores(scores: dict[str, Any], prefix: str) -> dict[str, float]:
    """Numeric leaves of a benchmark's scores as ``{prefix/key/subkey: value}`` (counts left out)."""
    out: dict[str, float] = {}
    for key, value in scores.items():
        name = f"{prefix}/{key}"
        if isinstance(value, dict) and key not in ("counts",):
            out.update(flatten_scores(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("n", "unanswered"):
            out[name] = float(value)
    return out


def metric_direction(metric: str) -> str:
    """"min" for a held-out loss, "max" for a benchmark score."""
    return "min" if metric.startswith(HELDOUT + "/") else "max"


# ---------------------------------------------------------------------------------------- checks


def check_eval_access(config: Config) -> None:
    """Before training: the held-out datasets exist, are readable and are not training datasets, and the
    benchmark's files read. Raises ConfigError naming the problem and the fix."""
    from pipeline.config import data_phases
    from pipeline.data.dataset import resolve_sources, source_manifest
    from pipeline.data.heldout import heldout_sources
    from pipeline.recipes import ConfigError

    e = config.eval
    if e is None:
        return
    sources = heldout_sources(config)
    if not sources and e.benchmark is None:
        raise ConfigError("config `eval` has nothing to evaluate: the run's datasets have no holdout (build them "
                          "with data_prep's --holdout N) and `eval.datasets` and `eval.benchmark` are not set")
    if not sources and e.best is not None and e.best.startswith(HELDOUT + "/"):
        raise ConfigError(f"config `eval.best` is {e.best!r} but the run has no held-out data; build the datasets "
                          "with --holdout, set `eval.datasets`, or choose a benchmark score")
    training = {os.path.normpath(s.remote or s.local) for p in data_phases(config.data)
                for s in resolve_sources(p, config.data.cache_dir)}
    names = set()
    for source in sources:
        where = source.remote or source.local
        if os.path.normpath(where) in training:
            raise ConfigError(f"config `eval.datasets`: {where} is one of the run's training datasets; evaluate on "
                              "held-out data (data_prep --holdout writes it beside the training data)")
        if source.name in names:
            raise ConfigError(f"config `eval.datasets`: two held-out datasets are named {source.name!r}; give each "
                              "a distinct `name`")
        names.add(source.name)
        try:
            source_manifest(source)
        except (OSError, ValueError) as err:
            raise ConfigError(f"config `eval`: held-out dataset {where} cannot be read: {err}") from None
    if e.best is not None and e.best.startswith(HELDOUT + "/"):
        wanted = e.best.split("/", 1)[1]
        if wanted != OVERALL and wanted not in names:
            raise ConfigError(f"config `eval.best` is {e.best!r}, but the held-out sources are {sorted(names)}; "
                              f"choose heldout/{OVERALL} or one of them")
    if e.benchmark is not None:
        try:
            items, _ = BENCHMARKS[e.benchmark.task].read(e.benchmark.data)
        except (OSError, ValueError) as err:
            raise ConfigError(f"config `eval.benchmark.data` ({e.benchmark.data}): cannot read the "
                              f"{e.benchmark.task} questions: {err}") from None
        if not items:
            raise ConfigError(f"config `eval.benchmark.data` ({e.benchmark.data}) holds no {e.benchmark.task} question")


# ---------------------------------------------------------------------------------------- best checkpoint


class BestTracker:
    """The best value of ``eval.best`` among evaluations at checkpoint steps, and its step."""

    def __init__(self, metric: str | None):
        self.metric = metric
        self.value: float | None = None
        self.step: int | None = None

    def update(self, record: dict[str, Any], step: int) -> bool:
        """Take the evaluation at ``step`` (a checkpoint step); True when it is the new best."""
        if self.metric is None:
            return False
        if self.metric not in record:
            raise KeyError(f"eval.best names {self.metric!r}, which the evaluation did not report; it reported "
                           f"{sorted(k for k in record if '/' in k)}")
        value = record[self.metric]
        if value is None or not math.isfinite(value):
            return False
        better = (self.value is None or (value < self.value if metric_direction(self.metric) == "min"
                                         else value > self.value))
        if better:
            self.value, self.step = float(value), step
        return better

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "value": self.value, "step": self.step}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state and state.get("metric") == self.metric:
            self.value, self.step = state.get("value"), state.get("step")


# ---------------------------------------------------------------------------------------- the evaluator


class RestoredState:
    """Saves the RNG states (:func:`pipeline.checkpoint.rng_state`) and the model's mode on entry and puts
    them back on exit."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __enter__(self) -> "RestoredState":
        from pipeline.checkpoint import rng_state

        self.training, self.rng = self.module.training, rng_state()
        self.module.eval()
        return self

    def __exit__(self, *exc: Any) -> None:
        from pipeline.checkpoint import set_rng_state

        set_rng_state(self.rng)
        self.module.train(self.training)


class TrainingEvaluator:
    """Runs the recipe's ``eval:`` on the training engine; built by :meth:`from_config` (None without one)."""

    def __init__(self, config: Config, tokenizer: Any, image_processor: Any, rank: int, world: int,
                 device: torch.device):
        from pipeline.data.dataset import build_collator
        from pipeline.data.heldout import heldout_sources

        self.config, self.eval = config, config.eval
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.rank, self.world, self.device = rank, world, device
        self.sources = heldout_sources(config)
        self.datasets: dict[str, Any] | None = None      # opened at the first evaluation
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        padded = dataclasses.replace(config, data=dataclasses.replace(config.data, collate="pad"))
        self.collator = build_collator(padded, pad_id)      # one sample per row
        self.best = BestTracker(self.eval.best)
        self.items: list[Any] | None = None
        self.trained_s = 0.0

    @classmethod
    def from_config(cls, config: Config, tokenizer: Any, image_processor: Any, rank: int, world: int,
                    device: torch.device) -> "TrainingEvaluator | None":
        if config.eval is None:
            return None
        from pipeline.data.dataset import check_sources
        from pipeline.model.sizes import get_model_size
        from pipeline.model.tokenizer import tokenizer_fingerprint

        evaluator = cls(config, tokenizer, image_processor, rank, world, device)
        check_sources(evaluator.sources, get_model_size(config.model.size).num_visual_tokens,
                      tokenizer_fingerprint(tokenizer), config.model.text_layout)
        return evaluator

    def due(self, step: int) -> bool:
        """Whether an evaluation follows optimizer step ``step`` (1-based, as logged)."""
        every, total = self.eval.every, self.config.train.total_steps
        return step == total or (every > 0 and step % every == 0)

    def add_training_time(self, seconds: float) -> None:
        """Training time since the last evaluation (for ``eval_share``)."""
        self.trained_s += seconds

    def run(self, engine: Any, step: int, prepare: Callable[[dict[str, Any]], dict[str, torch.Tensor]]
            ) -> dict[str, Any]:
        """One evaluation on every rank; returns the ``eval`` record (the same on every rank)."""
        start = time.perf_counter()
        record: dict[str, Any] = {"event": "eval", "step": step}
        with RestoredState(engine.module), torch.no_grad():
            if self.sources:
                record.update(self._heldout(engine, prepare))
            if self.eval.benchmark is not None:
                record.update(self._benchmark(engine.module, step))
        elapsed = time.perf_counter() - start
        record["eval_s"] = round(elapsed, 3)
        record["eval_share"] = round(elapsed / self.trained_s, 4) if self.trained_s > 0 else None
        self.trained_s = 0.0
        return record

    # ---- held-out loss -----------------------------------------------------------------------------
    def _heldout(self, engine: Any, prepare: Callable[[dict[str, Any]], dict[str, torch.Tensor]]) -> dict[str, Any]:
        import torch.distributed as dist

        if self.datasets is None:
            from pipeline.data.heldout import open_heldout

            self.datasets = {s.name: open_heldout(s, self.config, self.tokenizer, self.image_processor)
                             for s in self.sources}
        micro = self.eval.micro_batch
        losses = torch.zeros(len(self.sources), dtype=torch.float64, device=self.device)  # read once, at the end
        counts = torch.zeros(len(self.sources), 2, dtype=torch.float64)                  # target tokens, samples
        skipped = 0
        for k, source in enumerate(self.sources):
            dataset = self.datasets[source.name]
            n = min(self.eval.max_samples, int(dataset.num_samples))
            mine = list(range(self.rank, n, self.world))
            rounds = math.ceil(math.ceil(n / self.world) / micro)
            for r in range(rounds):
                samples = [dataset.get_item(i) for i in mine[r * micro:(r + 1) * micro]]
                batch = self.collator(samples)       # no samples left: one placeholder row without targets
                skipped += sum(c for reasons in batch["skipped"].values() for c in reasons.values())
                out = engine(**prepare(batch), return_logits=False, validate=False)
                losses[k] += out.loss_sum.detach().double()
                counts[k, 0] += float(batch["num_target_tokens"])
                counts[k, 1] += len(batch["sources"])
        totals = torch.cat([losses[:, None], counts.to(self.device)], dim=1).flatten()
        totals = torch.cat([totals, torch.tensor([float(skipped)], dtype=torch.float64, device=self.device)])
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(totals)
        totals = totals.cpu()
        sums, skipped = totals[:-1].view(-1, 3), int(totals[-1])
        record: dict[str, Any] = {}
        for k, source in enumerate(self.sources):
            loss, targets, samples = sums[k].tolist()
            record[f"{HELDOUT}/{source.name}"] = loss / targets if targets else None
            record.setdefault("heldout_samples", {})[source.name] = int(samples)
            record.setdefault("heldout_targets", {})[source.name] = int(targets)
        loss, targets = float(sums[:, 0].sum()), float(sums[:, 1].sum())
        record[f"{HELDOUT}/{OVERALL}"] = loss / targets if targets else None
        record["heldout_skipped"] = skipped
        return record

    # ---- benchmark ---------------------------------------------------------------------------------
    def predictions_dir(self, step: int) -> Path:
        """Where the benchmark's answers of the evaluation after ``step`` are written (predictions.jsonl,
        scores.json, as ``python -m pipeline.eval.<task>`` writes them)."""
        return Path(self.config.train.output_dir) / "eval" / self.eval.benchmark.task / f"step_{step:08d}"

    def _benchmark(self, module: torch.nn.Module, step: int) -> dict[str, Any]:
        import torch.distributed as dist

        from pipeline.eval.runner import DistContext, evaluate, write_results

        b = self.eval.benchmark
        task = BENCHMARKS[b.task]
        if self.items is None:
            items, _ = task.read(b.data)
            self.items = items[:b.limit]
        ctx = DistContext(rank=self.rank, world_size=self.world, device=str(self.device))
        result = evaluate(task.benchmark(), module, self.tokenizer, self.items, ctx, batch_size=b.batch_size,
                          max_new_tokens=b.max_new_tokens, synced=True, progress=False)
        if result is not None:          # rank 0: the answers, as the benchmark's command writes them
            write_results(str(self.predictions_dir(step)), *result)
        scores = [flatten_scores(result[1], b.task) if result is not None else None]
        if dist.is_initialized() and self.world > 1:
            dist.broadcast_object_list(scores, src=0)
        return {**scores[0], "benchmark_questions": len(self.items)}


def progress_fields(record: dict[str, Any]) -> dict[str, str]:
    """What an evaluation adds to the progress bar: the overall held-out loss and the benchmark's main score."""
    out = {}
    if record.get(f"{HELDOUT}/{OVERALL}") is not None:
        out["heldout"] = f"{record[f'{HELDOUT}/{OVERALL}']:.4f}"
    for name, task in BENCHMARKS.items():
        key = f"{name}/{task.higher_is_better[0]}"
        if record.get(key) is not None:
            out[name] = f"{100 * record[key]:.1f}%"
    return out


__all__ = ["BENCHMARKS", "BenchmarkConfig", "BestTracker", "EvalConfig", "EvalSource", "TrainingEvaluator",
           "check_eval_access", "flatten_scores", "metric_direction", "progress_fields"]
