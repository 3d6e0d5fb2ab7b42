"""Evaluation while training (pipeline.train_eval): held-out loss per source and CV-Bench on the training engine.

Runs (2 ranks, ZeRO-3, the tiny PT recipe of tests/test_train.py, 6 steps):

* A — tests/test_train.py's run A, without evaluation (built once for the whole test run): the reference;
* E — A's recipe with ``eval`` every 2 steps (held-out loss of two held-out datasets and 5 CV-Bench
  questions), preempted: SIGTERM during step 2 (the ranks agree on it in step 3: checkpoint 3, exit 0), then
  ``--resume auto`` to step 6. Its training figures must be A's: neither the evaluations nor the
  preemption change a loss or a batch.

In-process checks (one process, no DeepSpeed) recompute the same figures from E's export: the held-out loss
by hand from the model's logits, and CV-Bench with the benchmark's own command.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from pipeline import checkpoint as ckpt
from pipeline.metrics import read_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_utils import show, write_dataset  # noqa: E402
from test_eval_readers import write_cv_bench  # noqa: E402
from test_train import PT, launch, run_a, world  # noqa: E402,F401 (fixtures)

pytestmark = pytest.mark.slow
STEPS = 6


@pytest.fixture(scope="module")
def setup(world, tmp_path_factory):
    """Held-out datasets (other captions than A's training data), a CV-Bench folder, E's command line."""
    root = tmp_path_factory.mktemp("train_eval")
    squares = write_dataset(root / "heldout_squares", world["tok"], "pt", 11, caption="one {color} square")
    colours = write_dataset(root / "heldout_colours", world["tok"], "pt", 6, caption="{color}")
    cvb = write_cv_bench(str(root / "cvb"))
    evaluation = (f"eval={{every: 2, max_samples: 9, micro_batch: 2, best: heldout/overall, "
                  f"datasets: [{{path: {squares}, name: squares}}, {{path: {colours}, name: colours}}], "
                  f"benchmark: {{task: cv_bench, data: {cvb}, limit: 5, batch_size: 1, max_new_tokens: 4}}}}")
    args = PT + world["pt"] + ["--set", "train.keep_last=1", "--set", evaluation]
    return {"root": root, "tok": world["tok"], "args": args, "cvb": cvb,
            "heldout": {"squares": squares, "colours": colours}}


def run(setup, name: str, args: list[str], env=None, probe: bool = False):
    out = setup["root"] / name
    proc = launch(out, args, probe=probe, env=env)
    assert proc.returncode == 0, show(proc)
    return out, proc


@pytest.fixture(scope="module")
def run_e(setup):
    """E's folder, its resumed launch, and the checkpoints its preempted launch left."""
    out, _ = run(setup, "E", setup["args"], env={"AKI_TEST_SIGTERM_STEP": "2"}, probe=True)
    stopped = [s for s, _ in ckpt.list_checkpoints(out)]
    _, resumed = run(setup, "E", setup["args"] + ["--resume", "auto"])
    return out, resumed, stopped


def evals(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == "eval"]


# ---- E: what it reports ---------------------------------------------------------------------------


def test_evaluations_report_heldout_loss_per_source_benchmark_and_cost(run_e):
    out, proc, _ = run_e
    records = evals(out)
    assert [r["step"] for r in records] == [2, 4, 6]
    for r in records:
        assert r["heldout_samples"] == {"squares": 9, "colours": 6}
        assert all(math.isfinite(r[f"heldout/{s}"]) and r[f"heldout/{s}"] > 0 for s in ("squares", "colours"))
        # overall = the token mean over both sources, not the mean of the two means
        tokens = r["heldout_targets"]
        expected = ((r["heldout/squares"] * tokens["squares"] + r["heldout/colours"] * tokens["colours"])
                    / (tokens["squares"] + tokens["colours"]))
        assert r["heldout/overall"] == pytest.approx(expected, rel=1e-12)
        assert 0 <= r["cv_bench/overall"] <= 1 and r["benchmark_questions"] == 5
        assert r["eval_s"] > 0 and r["eval_share"] > 0
        assert (out / "eval" / "cv_bench" / f"step_{r['step']:08d}" / "predictions.jsonl").is_file()
    # the model learns the captions: the held-out loss falls
    assert records[-1]["heldout/overall"] < records[0]["heldout/overall"]
    assert "heldout=" in proc.stderr       # the progress bar shows the held-out loss


def test_the_best_checkpoint_is_recorded_and_never_pruned(run_e):
    out, _, stopped = run_e
    # the preempted launch stopped after step 3 (keep_last=1): checkpoint 3, and checkpoint 2, the best so far
    assert stopped == [2, 3], stopped
    records = evals(out)
    best = min(records, key=lambda r: r["heldout/overall"])
    state = ckpt.read_json(ckpt.latest_complete(out) / ckpt.TRAINER_STATE)
    assert state["eval_best"] == {"metric": "heldout/overall", "value": best["heldout/overall"], "step": best["step"]}
    kept = [s for s, _ in ckpt.list_checkpoints(out)]
    assert best["step"] in kept and STEPS in kept and len(kept) <= 2      # keep_last=1 plus the best


# ---- it does not change training -----------------------------------------------------------------


def test_evaluating_and_a_preemption_change_no_training_loss_and_no_batch(run_a, run_e):
    plain, evaluated = read_metrics(run_a), read_metrics(run_e[0])
    assert [r["loss"] for r in evaluated] == [r["loss"] for r in plain]
    assert [r["data_digest"] for r in evaluated] == [r["data_digest"] for r in plain]
    assert [r["grad_norm"] for r in evaluated] == [r["grad_norm"] for r in plain]


# ---- the figures, recomputed outside the trainer ---------------------------------------------------


class PlainEngine:
    """The exported model where the evaluator expects the training engine (one process, no DeepSpeed)."""

    def __init__(self, module):
        self.module = module

    def __call__(self, **inputs):
        return self.module(**inputs)


def evaluate_export(setup, out: Path, overrides: list[str]):
    """E's step-6 export evaluated in this process by the evaluator of E's recipe with ``overrides``."""
    from pipeline.config import load_config
    from pipeline.model.aki import AKIModel
    from pipeline.train_eval import TrainingEvaluator

    model = AKIModel.from_pretrained(str(out / "export")).eval()
    config = load_config(str(out / "recipe.yaml"), ["eval.benchmark=null", "eval.best=null", *overrides])
    evaluator = TrainingEvaluator(config, setup["tok"], model.image_processor, rank=0, world=1,
                                  device=torch.device("cpu"))
    with torch.no_grad():
        record = evaluator.run(PlainEngine(model), STEPS, lambda batch: {
            k: batch[k] for k in ("input_ids", "modality_ids", "pixel_values")})
    return record, model


def test_heldout_loss_equals_a_hand_computation_from_the_logits(setup, run_e):
    """The step-6 export, 1 process: the evaluator's loss = -mean log p(target) over every target token of
    the first 9 / 6 samples, computed here in float64 from the full fp32 logits, one sample at a time
    (measured: at most 9.7e-8 relative apart, the evaluator's cross-entropy being taken in fp32)."""
    from streaming import LocalDataset

    from pipeline.data.format import image_lengths, split_images
    from pipeline.tokens import TEXT_TARGET

    record, model = evaluate_export(setup, run_e[0], ["eval.max_samples=9", "eval.micro_batch=4"])
    totals = {}
    with torch.no_grad():
        for name, folder in setup["heldout"].items():
            dataset = LocalDataset(local=folder)
            nll, count = 0.0, 0
            for i in range(min(9, len(dataset))):
                row = dataset[i]
                ids = torch.tensor(row["input_ids"], dtype=torch.long)[None]
                modality = torch.tensor(row["modality_ids"], dtype=torch.long)[None]
                pixels = model.image_processor(split_images(row["images"], image_lengths(row["image_lengths"])))
                logp = model(ids, modality, pixels).logits[0].double().log_softmax(-1)
                for t in range(1, ids.shape[1]):
                    if modality[0, t] == TEXT_TARGET:
                        nll -= float(logp[t - 1, ids[0, t]])
                        count += 1
            totals[name] = (nll, count)
            assert record[f"heldout/{name}"] == pytest.approx(nll / count, rel=1e-6)
            assert record["heldout_targets"][name] == count
    overall = sum(n for n, _ in totals.values()) / sum(c for _, c in totals.values())
    assert record["heldout/overall"] == pytest.approx(overall, rel=1e-6)


def test_two_rank_zero3_figures_equal_one_process_figures(setup, run_e):
    """E's step-6 evaluation (2 ranks, ZeRO-3, 2 samples per forward) against the step-6 export evaluated
    in one process with 3 samples per forward: the same token means up to fp32 rounding in other batch shapes
    (measured: at most 3.3e-8 relative; fp32's epsilon is 1.2e-7)."""
    mine, _ = evaluate_export(setup, run_e[0], ["eval.max_samples=9", "eval.micro_batch=3"])
    theirs = evals(run_e[0])[-1]
    for key in ("heldout/squares", "heldout/colours", "heldout/overall"):
        assert mine[key] == pytest.approx(theirs[key], rel=1e-6), key
    assert mine["heldout_targets"] == theirs["heldout_targets"]


def test_in_training_cv_bench_equals_the_benchmark_command_on_the_export(setup, run_e, tmp_path):
    from pipeline.eval import cv_bench

    out, _, _ = run_e
    threads = torch.get_num_threads()
    torch.set_num_threads(1)         # the training ranks' thread count: the same sums, the same argmax
    try:
        assert cv_bench.main(["--model", str(out / "export"), "--data", setup["cvb"], "--out", str(tmp_path),
                              "--batch-size", "1", "--max-new-tokens", "4", "--limit", "5", "--device", "cpu"]) == 0
    finally:
        torch.set_num_threads(threads)
    command = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    folder = out / "eval" / "cv_bench" / f"step_{STEPS:08d}"
    training = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert [r["output"] for r in training] == [r["output"] for r in command]
    assert json.loads((folder / "scores.json").read_text())["overall"] == \
        json.loads((tmp_path / "scores.json").read_text())["overall"] == evals(out)[-1]["cv_bench/overall"]


# ---- recipes that cannot work fail before any distributed work -------------------------------------


@pytest.mark.parametrize("setting, message", [
    ("eval.evry=2", "`eval.every`"),
    ("eval.max_samples=0", "`eval.max_samples` must be a positive integer"),
    ("eval.benchmark={task: mmbench, data: /x}", "`eval.benchmark.task` is 'mmbench'"),
    ("eval.best=cv_bench/overall", "add `eval.benchmark`"),
    ("eval.best=heldout/overall", "must be a multiple of `eval.every` (3)"),
    ("eval.datasets=[{path: /no/such/heldout}]", "/no/such/heldout does not exist"),
    ("eval.datasets=[{path: TRAIN}]", "is one of the run's training datasets"),
    ("eval.datasets=[{path: SQUARES}]", "heldout/nosuch"),
    ("eval.datasets=null", "nothing to evaluate"),
])
def test_a_bad_eval_section_is_one_clear_error_before_training(world, setup, tmp_path, capsys, setting, message):
    from pipeline.train import main

    setting = (setting.replace("TRAIN", world["folders"]["pt"])
               .replace("SQUARES", setup["heldout"]["squares"]))
    base = ["--set", "eval={every: 3, max_samples: 4}"]
    if "SQUARES" in message or "nosuch" in message:
        base += ["--set", "train.save_every=3", "--set", "eval.best=heldout/nosuch"]
    code = main(PT + world["pt"] + base + ["--set", setting, "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not (tmp_path / "run").exists()


# ---- which held-out data, and the best checkpoint's bookkeeping -------------------------------------


def test_by_default_the_run_evaluates_the_holdouts_its_datasets_name(world, tmp_path):
    from pipeline.config import load_config
    from pipeline.data.format import read_manifest
    from pipeline.data.heldout import heldout_sources

    train = write_dataset(tmp_path / "kale", world["tok"], "pt", 8)
    held = write_dataset(tmp_path / "kale" / "heldout", world["tok"], "pt", 3)
    manifest = read_manifest(train)
    manifest.heldout = {"path": "heldout", "samples": 3, "spec": 3, "ids": ["pt-0", "pt-1", "pt-2"]}
    manifest.write(train)
    plain = write_dataset(tmp_path / "ocr", world["tok"], "pt", 8)      # built without --holdout
    config = load_config("tiny_pt", [f"data.datasets=[{{path: {train}}}, {{path: {plain}}}]", "eval={every: 2}"])
    sources = heldout_sources(config)
    assert [(s.name, s.local, s.remote) for s in sources] == [("kale", held, None)]


def test_the_best_follows_the_metrics_direction_and_survives_a_resume():
    from pipeline.train_eval import BestTracker

    loss = BestTracker("heldout/overall")
    assert loss.update({"heldout/overall": 2.0}, 2) and not loss.update({"heldout/overall": 2.5}, 4)
    assert loss.update({"heldout/overall": 1.5}, 6) and loss.state_dict() == \
        {"metric": "heldout/overall", "value": 1.5, "step": 6}
    assert not loss.update({"heldout/overall": None}, 8)          # a source without targets: no figure
    score = BestTracker("cv_bench/overall")
    assert score.update({"cv_bench/overall": 0.4}, 2) and not score.update({"cv_bench/overall": 0.3}, 4)
    resumed = BestTracker("cv_bench/overall")
    resumed.load_state_dict(score.state_dict())
    assert not resumed.update({"cv_bench/overall": 0.35}, 6) and resumed.step == 2
    other = BestTracker("heldout/overall")          # a recipe that changed its metric starts afresh
    other.load_state_dict(score.state_dict())
    assert other.value is None
    with pytest.raises(KeyError, match="cv_bench/2D"):
        BestTracker("cv_bench/2D").update({"cv_bench/overall": 0.3}, 2)


def test_pruning_keeps_the_protected_best_checkpoint(tmp_path):
    for step in (2, 4, 6, 8):
        path = ckpt.checkpoints_root(tmp_path) / ckpt.step_tag(step)
        path.mkdir(parents=True)
        ckpt.mark_complete(path)
    ckpt.prune(tmp_path, keep_last=1, protect=[4])
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 8]


def test_a_heldout_set_in_object_storage_gives_the_local_figures(setup, run_e, s3_env, tmp_path):
    """The squares held-out set uploaded to the suite's S3 server, named by URL in ``eval.datasets``: streamed
    into a cache and evaluated, it gives exactly the figures of the local folder."""
    folder = Path(setup["heldout"]["squares"])
    client = s3_env.client()
    for path in folder.iterdir():
        client.upload_file(str(path), s3_env.bucket, f"eval/squares/{path.name}")
    figures_of = {}
    for where, source in (("local", f"{{path: {folder}, name: squares}}"),
                          ("s3", f"{{remote: {s3_env.url('eval', 'squares')}, name: squares}}")):
        figures_of[where], _ = evaluate_export(setup, run_e[0], [
            f"eval={{max_samples: 9, micro_batch: 3, datasets: [{source}]}}", f"data.cache_dir={tmp_path / 'cache'}"])
    assert figures_of["s3"]["heldout/squares"] == figures_of["local"]["heldout/squares"]
    assert figures_of["s3"]["heldout_samples"] == {"squares": 9}
    assert any((tmp_path / "cache").rglob("*.mds*")), "the shards were not streamed into the cache"
