"""The whole pipeline on a CPU in minutes: ``make quickstart`` (``python -m pipeline.quickstart``).

Every step runs the real command line in a subprocess, exactly as a user would on real data:

1. ``python -m data_prep.synthetic`` — the synthetic shapes world in the datasets' raw formats;
2. a tiny byte-level BPE tokenizer trained on the world's texts (``build_tiny_tokenizer``);
3. ``data_prep/build_pretrain_shards.py`` (Kale- and OCR-200m-style tars → MDS);
4. ``data_prep/build_sft_mixture.py`` (VQAv2, A-OKVQA, LLaVA, VSR, RefCOCO, ScienceQA, Visual Genome
   files → MDS + mixture.yaml);
5. ``python -m pipeline.train`` — pretraining of the ``small`` size (random init; DeepSpeed on the CPU);
6. the same for SFT from the PT export, once with ``mma`` and once with ``causal`` attention (each training
   also evaluates while it trains, :mod:`pipeline.train_eval`: held-out loss per source on the samples
   data prep kept out with ``--holdout``, and for SFT the CV-Bench-style set);
7. ``python -m pipeline.eval.cv_bench`` on the world's CV-Bench-style set, for both;
8. ``python -m pipeline.inspect``: the mask pictures of one SFT sample for every attention mode
   (``masks/``) and the image → question attention share per layer of both models (``attention/``);
9. the results table (printed), ``report.md`` (with the pictures), ``loss_curves.png``, ``eval_curves.png``
   (the evaluations while training) and ``results.json``
   in ``--out``.

The run fails (exit 3) when a finetuned model does not beat chance by ``--min-margin`` on the pooled
accuracy: a pipeline that learns nothing is a broken pipeline. ``--steps-scale`` scales the training steps
(the test suite runs half the plan with ``--seed 3``, the seed measured to learn the most at that length).
One training process (DeepSpeed's single-device ZeRO-2 config) is the default: on a small CPU it is faster
than several gloo ranks; ``--ranks 2`` trains with the recipes' ZeRO-3 config on two processes under
``torchrun``.

Reproducible: ``--seed`` seeds the world, the tokenizer's texts, the sample order and the weights; every
run rebuilds its data from scratch (byte-identical for a seed and a plan), and every process gets a fixed
number of threads (:data:`THREADS`) whatever the machine's cores, so the same seed prints the same table on
every run of one machine (CPU kernels of another instruction set may round differently).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from pipeline.distributed import free_port
from pipeline.inspect import MASKS_INDEX, SHARE_JSON, SHARE_PLOT

REPO = Path(__file__).resolve().parents[1]
ATTENTION_MODES = ("mma", "causal")
INSPECT_SOURCE = "aokvqa"       # multiple-choice questions, like the evaluation's
INSPECT_SAMPLES = 8
# Threads of every process, fixed whatever the machine: CPU kernels split their sums by thread count, so
# another count rounds differently and, hundreds of steps later, prints other figures. With one each, the two
# SFT runs (and the two evaluations) run side by side on two cores or more, one after the other on one core,
# with the same results. (Two threads for the pre-training, alone, gain little on idle cores and lose much on
# a busy machine: 8 s per step instead of 0.1 s when the two cores were shared with other work.)
THREADS = 1
EVAL_PLOT = "eval_curves.png"
POOLED = "cv_bench/accuracy"    # the evaluation's accuracy over all questions (the table's pooled figure)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of one quickstart; :meth:`scaled` changes the number of training steps."""

    pretrain_images: int = 1024
    sft_images: int = 384
    eval_images: int = 96
    pt_steps: int = 600         # the images start to matter after ~200 steps; before, the text prior is learnt
    sft_steps: int = 400        # the answers start to depend on the image after ~150-200 steps
    pt_batch: int = 16
    sft_batch: int = 16
    pt_lr: float = 1e-3
    sft_lr: float = 5e-4
    pt_holdout: float = 0.03    # share of each pre-training source held out (data_prep --holdout; ~31 and ~15)
    pt_eval_samples: int = 32   # held-out samples per pre-training source each evaluation reads
    sft_holdout: int = 16       # held-out samples per SFT source
    evaluations: int = 8        # evaluations while each training runs (held-out loss, CV-Bench for SFT)
    model_size: str = "small"
    tokenizer_vocab: int = 1000

    def scaled(self, scale: float) -> "Plan":
        """The same data with ``scale`` times the training steps."""
        if not 0 < scale <= 4:
            raise ValueError(f"--steps-scale must be in (0, 4], got {scale}")
        return dataclasses.replace(self, pt_steps=max(10, round(self.pt_steps * scale)),
                                   sft_steps=max(20, round(self.sft_steps * scale)))


class QuickstartError(RuntimeError):
    """A step failed; the message names it and shows the end of its log."""


@dataclasses.dataclass
class Quickstart:
    """Paths and settings shared by the steps."""

    out: Path
    plan: Plan
    ranks: int
    min_margin: float
    seed: int = 0
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    world = property(lambda self: self.out / "world")
    tokenizer = property(lambda self: self.out / "tokenizer")
    data = property(lambda self: self.out / "data")
    runs = property(lambda self: self.out / "runs")
    evals = property(lambda self: self.out / "eval")
    masks = property(lambda self: self.out / "masks")
    attention = property(lambda self: self.out / "attention")
    logs = property(lambda self: self.out / "logs")

    def folders(self) -> tuple[Path, ...]:
        """Every folder a run writes (removed first: nothing of an earlier run or version is reused)."""
        return (self.world, self.tokenizer, self.data, self.runs, self.evals, self.masks, self.attention, self.logs)

    def env(self) -> dict[str, str]:
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        return {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": path, "OMP_NUM_THREADS": str(THREADS),
                "MKL_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false",
                "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"),
                "PYTHONUNBUFFERED": "1"}

    def run(self, name: str, cmd: list[str]) -> None:
        """Run one command line, its output going to ``logs/<name>.log``; raise with the log tail on failure."""
        self.run_side_by_side({name: cmd})

    def run_side_by_side(self, cmds: dict[str, list[str]]) -> None:
        """Run the command lines at the same time, each process with :data:`THREADS` threads and its output in
        ``logs/<name>.log``; when one fails, raise with its log tail (after every one has ended)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        running = []
        for name, cmd in cmds.items():
            log = open(self.logs / f"{name}.log", "w")
            log.write("$ " + shlex.join(cmd) + "\n")
            log.flush()
            running.append((name, log, subprocess.Popen(cmd, cwd=REPO, env=self.env(), stdout=log,
                                                         stderr=subprocess.STDOUT)))
        failed = []
        for name, log, proc in running:
            code = proc.wait()
            log.close()
            failed += [(name, code)] if code != 0 else []
        if failed:
            name, code = failed[0]
            log_path = self.logs / f"{name}.log"
            tail = "".join(log_path.read_text().splitlines(keepends=True)[-40:])
            raise QuickstartError(f"step {name!r} failed (exit {code}); full log: {log_path}\n{tail}")

    def side_by_side(self, cmds: dict[str, list[str]], processes_each: int = 1) -> None:
        """Run independent commands of ``processes_each`` processes, as many at once as the cores allow (the
        results are the same either way)."""
        cores = os.cpu_count() or 1
        at_once = max(1, min(len(cmds), cores // (processes_each * THREADS)))
        names = list(cmds)
        for i in range(0, len(names), at_once):
            self.run_side_by_side({n: cmds[n] for n in names[i:i + at_once]})

    def train_cmd(self, run: str, train_args: list[str]) -> list[str]:
        """``python -m pipeline.train`` into a fresh ``runs/<run>`` (a re-run replaces the earlier results),
        under torchrun when there are several ranks."""
        shutil.rmtree(self.runs / run, ignore_errors=True)
        launcher = [sys.executable]
        if self.ranks > 1:
            launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(self.ranks),
                         "--master_port", str(free_port())]
        return [*launcher, "-m", "pipeline.train", *train_args, "--output-dir", str(self.runs / run)]


# --------------------------------------------------------------------------- the steps


def make_world(q: Quickstart) -> None:
    p = q.plan
    q.run("world", [sys.executable, "-m", "data_prep.synthetic", "--out", str(q.world), "--seed", str(q.seed),
                    "--pretrain", str(p.pretrain_images), "--sft", str(p.sft_images), "--eval", str(p.eval_images),
                    "--image-side", "64"])


def make_tokenizer(q: Quickstart) -> None:
    code = ("import sys; from data_prep.synthetic import world_texts; "
            "from pipeline.model.tokenizer import build_tiny_tokenizer; "
            "build_tiny_tokenizer(world_texts(int(sys.argv[3])), sys.argv[1], vocab_size=int(sys.argv[2]))")
    q.run("tokenizer", [sys.executable, "-c", code, str(q.tokenizer), str(q.plan.tokenizer_vocab), str(q.seed)])


def _encode_args(q: Quickstart) -> list[str]:
    return ["--tokenizer", str(q.tokenizer), "--model-size", q.plan.model_size, "--workers", "1"]


def pretrain_shards(q: Quickstart) -> None:
    q.side_by_side({f"pt_shards_{source}": [sys.executable, "data_prep/build_pretrain_shards.py",
                                            str(q.world / "pt" / source), "--source", source,
                                            "--out", str(q.data / "pt" / source), *_encode_args(q),
                                            "--holdout", str(q.plan.pt_holdout)]
                    for source in ("kale", "ocr200m")})


def sft_mixture(q: Quickstart) -> None:
    # The evaluation asks multiple-choice questions; A-OKVQA-style samples are the ones that teach the
    # answer format, so they get a larger share than Table 4 gives them.
    # ScienceQA (mostly text-only problems) and Visual Genome are in for their records, at small shares.
    ratios = {"aokvqa": 0.6, "vqav2": 0.25, "llava150k": 0.05, "vsr": 0.05, "refcoco": 0.05, "scienceqa": 0.03,
              "vg": 0.02}
    q.run("sft_mixture", [sys.executable, "data_prep/build_sft_mixture.py", "--sources",
                          str(q.world / "sources.yaml"), "--out", str(q.data / "sft"),
                          *[a for name, r in ratios.items() for a in ("--ratio", f"{name}={r}")], *_encode_args(q),
                          "--seed", str(q.seed), "--holdout", str(q.plan.sft_holdout)])


def warmup_steps(steps: int) -> int:
    """Warm-up steps of a training of ``steps`` steps (the learning rate rises linearly over them)."""
    return max(1, steps // 20)


def _train_args(q: Quickstart, recipe: str, steps: int, batch: int, lr: float, extra: list[str]) -> list[str]:
    micro = max(1, batch // q.ranks)
    settings = [f"model.size={q.plan.model_size}", f"train.total_steps={steps}",
                f"train.global_batch_size={batch}", f"train.micro_batch_size={micro}",
                f"train.save_every={steps}", "train.keep_last=1", "train.log_every=5",
                f"optim.lr={lr}", f"optim.min_lr={lr / 2}", f"optim.warmup_steps={warmup_steps(steps)}",
                f"train.seed={q.seed}", f"data.shuffle_seed={q.seed}", "train.wandb_mode=disabled", *extra]
    if q.ranks == 1:        # one process has nothing to partition: the single-device ZeRO-2 config is faster
        settings.append("train.deepspeed=ds_configs/zero2_single_gpu.json")
    return ["--config", recipe, *[a for s in settings for a in ("--set", s)]]


def evaluation(q: Quickstart, steps: int, samples: int, benchmark: bool) -> str:
    """The ``eval`` setting of a training: the held-out sets data prep wrote beside its datasets, every
    ``steps / plan.evaluations`` steps; with ``benchmark``, the whole CV-Bench-style set too."""
    every = max(1, steps // q.plan.evaluations)
    cv_bench = (f", benchmark: {{task: cv_bench, data: {q.world / 'cvbench'}, limit: 100000, batch_size: 32, "
                f"max_new_tokens: 4}}") if benchmark else ""
    return f"eval={{every: {every}, max_samples: {samples}, micro_batch: 16{cv_bench}}}"


def pretrain(q: Quickstart) -> None:
    datasets = f"data.datasets=[{{path: {q.data / 'pt' / 'kale'}}}, {{path: {q.data / 'pt' / 'ocr200m'}, proportion: 0.1}}]"
    args = _train_args(q, "tiny_pt", q.plan.pt_steps, q.plan.pt_batch, q.plan.pt_lr,
                       [datasets, f"model.tokenizer={q.tokenizer}",
                        evaluation(q, q.plan.pt_steps, q.plan.pt_eval_samples, benchmark=False)])
    q.side_by_side({"pt": q.train_cmd("pt", args)}, q.ranks)


def finetune_cmd(q: Quickstart, mode: str, run: str) -> list[str]:
    """The SFT command line of one attention mode, from the PT export into ``runs/<run>``."""
    return q.train_cmd(run, _train_args(q, "tiny_sft", q.plan.sft_steps, q.plan.sft_batch, q.plan.sft_lr,
                                        [f"model.attention_mode={mode}", f"train.init_from={q.runs / 'pt' / 'export'}",
                                         f"data.mixture={q.data / 'sft' / 'mixture.yaml'}",
                                         evaluation(q, q.plan.sft_steps, q.plan.sft_holdout, benchmark=True)]))


def finetune(q: Quickstart) -> None:
    """SFT from the PT export once per attention mode (side by side when the cores allow)."""
    q.side_by_side({f"sft_{mode}": finetune_cmd(q, mode, f"sft_{mode}") for mode in ATTENTION_MODES}, q.ranks)


def evaluate(q: Quickstart) -> None:
    q.side_by_side({f"eval_{mode}": [
        sys.executable, "-m", "pipeline.eval.cv_bench", "--model", str(q.runs / f"sft_{mode}" / "export"),
        "--data", str(q.world / "cvbench"), "--out", str(q.evals / mode), "--batch-size", "32",
        "--max-new-tokens", "4", "--device", "cpu"] for mode in ATTENTION_MODES})


def inspect_models(q: Quickstart) -> None:
    """Mask pictures of one SFT sample for every mode, and how much each model's image tokens read the question."""
    sample = str(q.data / "sft" / INSPECT_SOURCE)
    models = [a for mode in ATTENTION_MODES for a in ("--model", str(q.runs / f"sft_{mode}" / "export"))]
    q.side_by_side({
        "inspect_masks": [sys.executable, "-m", "pipeline.inspect", "masks", "--data", sample, "--index", "0",
                          "--tokenizer", str(q.tokenizer), "--out", str(q.masks)],
        "inspect_attention": [sys.executable, "-m", "pipeline.inspect", "attention", *models, "--data", sample,
                              "--index", *map(str, range(INSPECT_SAMPLES)), "--device", "cpu",
                              "--out", str(q.attention)],
    })


STEPS: dict[str, Callable[[Quickstart], None]] = {
    "world": make_world, "tokenizer": make_tokenizer, "pt_shards": pretrain_shards, "sft_mixture": sft_mixture,
    "pretrain": pretrain, "finetune": finetune, "evaluate": evaluate, "inspect": inspect_models,
}


# --------------------------------------------------------------------------- results


def summarise(q: Quickstart) -> dict:
    """Results table (printed), report.md, loss_curves.png, results.json; returns the results."""
    from pipeline.eval.readers import read_cv_bench
    from pipeline.eval.report import (chance_accuracy, plot_eval_curves, plot_loss_curves, read_eval_curves,
                                      read_loss_curve, results_table, write_report)

    items, _ = read_cv_bench(str(q.world / "cvbench"))
    n_choices = {i.key: len(i.choices) for i in items}
    curves = {"pt": read_loss_curve(str(q.runs / "pt" / "metrics.jsonl"))}
    rows, chance = {}, 0.0
    for mode in ATTENTION_MODES:
        scores = json.loads((q.evals / mode / "scores.json").read_text())
        with open(q.evals / mode / "predictions.jsonl") as f:
            chance = chance_accuracy([json.loads(line) for line in f], n_choices)
        curves[f"sft {mode}"] = read_loss_curve(str(q.runs / f"sft_{mode}" / "metrics.jsonl"))
        losses = curves[f"sft {mode}"][1]
        rows[f"SFT {mode}"] = {"scores": scores, "final_loss": losses[-1] if losses else None}
    table = results_table(rows, chance)
    plot_loss_curves(curves, str(q.out / "loss_curves.png"))
    runs = ("pt", *(f"sft_{mode}" for mode in ATTENTION_MODES))
    evals = {run: read_eval_curves(str(q.runs / run / "metrics.jsonl")) for run in runs}
    plot_eval_curves({f"SFT {mode}": evals[f"sft_{mode}"] for mode in ATTENTION_MODES}, str(q.out / EVAL_PLOT),
                     benchmark=POOLED, chance=chance)
    shares = {run: _eval_share(q.runs / run / "metrics.jsonl") for run in runs}
    attention = json.loads((q.attention / SHARE_JSON).read_text())["models"]
    masks = json.loads((q.masks / MASKS_INDEX).read_text())
    results = {"chance": chance, "min_margin": q.min_margin, "n_questions": len(items),
               "accuracy": {m: rows[f"SFT {m}"]["scores"]["accuracy"] for m in ATTENTION_MODES},
               "scores": {m: rows[f"SFT {m}"]["scores"] for m in ATTENTION_MODES},
               "attention_share": {m: attention[m]["per_layer"] for m in ATTENTION_MODES},
               "pt_final_loss": curves["pt"][1][-1] if curves["pt"][1] else None,
               "eval_while_training": {run: {k: {"steps": v[0], "values": v[1]} for k, v in evals[run].items()}
                                       for run in runs},
               "eval_share": shares,
               "timings_s": q.timings, "plan": dataclasses.asdict(q.plan), "ranks": q.ranks, "seed": q.seed}
    notes = ["Pooled accuracy: " + ", ".join(f"{m} {100 * a:.1f}%" for m, a in results["accuracy"].items())
             + f" on {len(items)} questions; uniform guessing gives {100 * chance:.1f}%.",
             "Share of the image tokens' attention on the question (mean over layers, "
             f"{attention[ATTENTION_MODES[0]]['samples']} {INSPECT_SOURCE} samples): "
             + ", ".join(f"{m} {attention[m]['mean']:.3f}" for m in ATTENTION_MODES)
             + " (0 under causal by construction).",
             f"Attention masks of {', '.join(masks['samples'])} ({masks['tokens']} tokens) for every mode; "
             "left the mask (row = query), right its difference from causal (red: unlocked)."
             + "".join(f" {m} not drawn: {why}" for m, why in masks["skipped"].items()),
             _eval_note(q, evals, shares)]
    figures = [("evaluation while training: held-out loss per source and CV-Bench accuracy", EVAL_PLOT)]
    figures += [("image → question attention share", f"{q.attention.name}/{SHARE_PLOT}")]
    figures += [(f"{mode} mask", f"{q.masks.name}/{name}") for mode, name in masks["pictures"].items()]
    write_report(str(q.out / "report.md"), "AKI quickstart", table, q.timings,
                 {"plan": dataclasses.asdict(q.plan), "ranks": q.ranks, "seed": q.seed, "out": str(q.out)}, notes,
                 figures)
    (q.out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n" + table + "\n" + notes[0])
    print(f"report: {q.out / 'report.md'}   loss curves: {q.out / 'loss_curves.png'}")
    return results


def _eval_share(metrics_path: Path) -> float | None:
    """Evaluation time over training time of a run (its ``eval`` events' ``eval_s``, its steps' times)."""
    evaluated = trained = 0.0
    for line in metrics_path.read_text().splitlines() if metrics_path.exists() else []:
        record = json.loads(line)
        if record.get("event") == "eval":
            evaluated += record.get("eval_s") or 0.0
        elif "event" not in record:
            trained += record.get("step_time_s") or 0.0
    return evaluated / trained if trained else None


def _eval_note(q: Quickstart, evals: dict, shares: dict) -> str:
    """One paragraph on the evaluations while training (the figure's numbers)."""
    def last(run: str, key: str) -> str:
        values = evals[run].get(key, ([], []))[1]
        return f"{values[-1]:.3f}" if values else "n/a"

    pt_sources = sorted(k.split("/", 1)[1] for k in evals["pt"] if k.startswith("heldout/"))
    accuracy = {m: evals[f"sft_{m}"].get(POOLED, ([], []))[1] for m in ATTENTION_MODES}
    return ("Evaluation while training (pipeline.train_eval, on the training engine, held-out samples data prep "
            f"kept out of training: {100 * q.plan.pt_holdout:g} % of each PT source, {q.plan.sft_holdout} samples "
            "per SFT source). "
            "PT held-out loss at the end: " + ", ".join(f"{s} {last('pt', f'heldout/{s}')}" for s in pt_sources)
            + "; SFT held-out loss (all sources): " + ", ".join(f"{m} {last(f'sft_{m}', 'heldout/overall')}"
                                                               for m in ATTENTION_MODES)
            + "; CV-Bench-style accuracy (all questions) over the evaluations: " + "; ".join(
                f"{m} " + " → ".join(f"{100 * a:.1f}" for a in accuracy[m]) for m in ATTENTION_MODES)
            + ". Evaluation time over training time: " + ", ".join(
                f"{run} {100 * share:.1f}%" for run, share in shares.items() if share is not None) + ".")


def below_margin(results: dict, min_margin: float) -> dict[str, float]:
    """The models whose pooled accuracy is below chance + ``min_margin`` (mode → accuracy)."""
    return {m: a for m, a in results["accuracy"].items() if a < results["chance"] + min_margin}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.quickstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/quickstart", help="output folder (replaced steps write into it)")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="scale data sizes and training steps")
    parser.add_argument("--ranks", type=int, default=1,
                        help="torchrun processes (one process with every core is the fastest on a small CPU)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the world, the tokenizer's texts, the sample order and the initial weights")
    parser.add_argument("--min-margin", type=float, default=0.06,
                        help="fail unless each SFT model's accuracy is at least chance + this")
    parser.add_argument("--evaluations", type=int, default=Plan.evaluations,
                        help="evaluations while each training runs (they change no training figure)")
    args = parser.parse_args(argv)
    if args.ranks < 1:
        parser.error(f"--ranks must be at least 1, got {args.ranks}")
    if args.evaluations < 1:
        parser.error(f"--evaluations must be at least 1, got {args.evaluations}")
    plan = dataclasses.replace(Plan().scaled(args.steps_scale), evaluations=args.evaluations)
    q = Quickstart(Path(args.out).resolve(), plan, args.ranks, args.min_margin, args.seed)
    for folder in q.folders():
        shutil.rmtree(folder, ignore_errors=True)
    q.out.mkdir(parents=True, exist_ok=True)
    print(f"quickstart → {q.out} (seed {q.seed}, {args.ranks} rank(s); logs in {q.logs})", flush=True)
    try:
        for name, step in STEPS.items():
            start = time.perf_counter()
            step(q)
            q.timings[name] = time.perf_counter() - start
            print(f"  {name:<12} {q.timings[name]:6.1f} s", flush=True)
    except QuickstartError as err:
        print(f"quickstart failed: {err}", file=sys.stderr)
        return 1
    results = summarise(q)
    print(f"total {sum(q.timings.values()):.0f} s")
    print("see them side by side: python -m pipeline.demo "
          + " ".join(f"--model {q.runs / f'sft_{mode}' / 'export'}" for mode in ATTENTION_MODES))
    failing = below_margin(results, args.min_margin)
    if failing:
        print(f"quickstart: {', '.join(failing)} did not beat chance ({100 * results['chance']:.1f}%) by "
              f"{100 * args.min_margin:.0f} points — the pipeline did not learn; see {q.out / 'report.md'}",
              file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
