"""The benchmarks run in their tiny CPU modes and write well-formed results (speed itself is never asserted)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from bench import common
from pipeline.flops import BatchShape, ModelCounts, batch_shape, step_flops, visible_pairs
from pipeline.model.attention import MODES, dense_mask
from pipeline.tokens import IMAGE, PAD, TEXT_INPUT, TEXT_TARGET


def figures_of(path) -> dict[str, dict]:
    record = json.loads(path.read_text())
    assert record["date"] and record["command"].startswith("python -m bench.")
    assert record["machine"]["cores"] >= 1 and record["machine_summary"]
    return {f["name"]: f for f in record["figures"]}


def test_results_table_marks_gpu_goals_open_on_cpu(tmp_path):
    result = common.Result("demo", "python -m bench.demo", {}, [
        common.Figure("pt mfu", 12.0, "%", goal="train_step.pt_mfu"),
        common.Figure("loader fast", 400.0, "samples/s/core", goal="loader.samples_per_core"),
        common.Figure("loader slow", 10.0, "samples/s/core", goal="loader.samples_per_core"),
        common.Figure("loader tiny", 900.0, "samples/s/core", goal="loader.samples_per_core", comparable=False,
                      note="32² images"),
    ])
    figs = figures_of(common.write_result(result, tmp_path))
    assert figs["pt mfu"]["met"].startswith("n/a (CPU figure")
    assert figs["loader fast"]["met"] == "yes" and figs["loader slow"]["met"] == "no"
    assert figs["loader tiny"]["met"] == "n/a (32² images)"
    readme = (tmp_path / "README.md").read_text()
    goal_rows = {line.split(" | ")[0].lstrip("| "): line for line in readme.splitlines() if line.startswith("| ")}
    assert goal_rows[common.GOALS["train_step.pt_mfu"].what].endswith("| not measured (no GPU): run "
                                                                     "bench/gpu_check.sh on an H100/H200 |")
    assert "400 samples/s/core" in goal_rows[common.GOALS["loader.samples_per_core"].what]   # best decided figure
    assert "not measured" in goal_rows[common.GOALS["prep.samples_per_core"].what]


def test_peak_flops_by_exact_device_name():
    from pipeline.metrics import device_peak_flops

    # three H100 variants with three peaks (NVIDIA data sheets, dense bf16): a substring match cannot tell
    assert device_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert device_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert device_peak_flops("NVIDIA H100 NVL") == 835e12
    assert device_peak_flops("NVIDIA H200") == 989e12
    assert device_peak_flops("NVIDIA A100-SXM4-40GB") == device_peak_flops("NVIDIA A100 80GB PCIe") == 312e12
    assert device_peak_flops("NVIDIA H100 80GB HBM3", "fp32") == 494e12
    assert device_peak_flops("NVIDIA H100 Future Edition") is None      # unknown: no guessed peak


def test_flops_count_visible_pairs_per_document():
    # one row: a 3-token causal document then a 2-token document, then padding
    mods = torch.tensor([[TEXT_INPUT, TEXT_TARGET, TEXT_TARGET, TEXT_INPUT, TEXT_TARGET, PAD]])
    docs = torch.tensor([[1, 1, 1, 2, 2, 0]])
    shape = batch_shape(mods, docs, "causal", num_visual_tokens=1, num_images=0)
    assert shape == BatchShape(tokens=5, grid_tokens=6, predicted=3, visible_pairs=6 + 3, images=0)
    # mma: the image slot also sees the prompt text after it (1 extra pair)
    mma = batch_shape(torch.tensor([[IMAGE, TEXT_INPUT, TEXT_TARGET]]), None, "mma", 1, 1)
    assert mma.visible_pairs == 6 + 1


def test_visible_pairs_count_mma_reads_by_hand():
    # a packed row: doc 1 = [IMG IMG TXT_IN TXT_IN TGT], doc 2 = [IMG TXT_IN TGT TXT_IN TGT] (two turns), PAD
    I, T, G = IMAGE, TEXT_INPUT, TEXT_TARGET
    mods = torch.tensor([[I, I, T, T, G, I, T, G, T, G, PAD]])
    docs = torch.tensor([[1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 0]])
    causal = 15 + 15                       # n(n+1)/2 per document of 5 tokens
    # doc 1: each of the 2 image slots reads the 2 prompt tokens after it; doc 2: the image reads only
    # its own turn's prompt (1 token), not the second turn's question
    assert visible_pairs(mods, docs, "causal", 1) == causal
    assert visible_pairs(mods, docs, "mma", 1) == causal + 2 * 2 + 1
    # mma_general: also the prompt text reading a later image of its turn (none here: images come first)
    assert visible_pairs(mods, docs, "mma_general", 1) == causal + 2 * 2 + 1


@pytest.mark.parametrize("mode", list(MODES))
def test_visible_pairs_equal_the_dense_mask(mode):
    g = torch.Generator().manual_seed(0)
    mods = torch.randint(0, 4, (3, 40), generator=g)          # PAD, TEXT_INPUT, TEXT_TARGET, IMAGE mixed
    mods[:, :4] = IMAGE                                       # runs of 4 image slots (cca: a 2×2 grid)
    mods[:, 4:8] = IMAGE
    docs = torch.where(mods == PAD, 0, 1 + (torch.arange(40) >= 20).long())
    assert sorted({int(v) for v in mods.unique()}) == sorted({PAD, TEXT_INPUT, TEXT_TARGET, IMAGE})
    assert visible_pairs(mods, docs, mode, 4) == int(dense_mask(mods, mode, docs, 4).sum())
    assert visible_pairs(mods, None, mode, 4) == int(dense_mask(mods, mode, None, 4).sum())


def test_step_flops_formula():
    counts = ModelCounts(llm_body=100, llm_hidden=4, llm_layers=2, vocab=10, connector=7, vision=50,
                         vision_hidden=3, vision_layers=1, patches=4, resampler_dim=3, resampler_inner=2,
                         resampler_depth=1, num_latents=2)
    shape = BatchShape(tokens=8, grid_tokens=12, predicted=3, visible_pairs=20, images=1)
    llm = 6 * 100 * 8 + 6 * 4 * 10 * 3 + 12 * 4 * 2 * 20
    # K/V of the 4 patch features: forward, weight and input gradient (norm_media is trained) = 6·2·dim·inner
    connector = 6 * 7 * 2 + 6 * (2 * 3 * 2) * 1 * 4 + 12 * 2 * 1 * 2 * (4 + 2)
    vision = 2 * 50 * 4 + 4 * 3 * 1 * 16
    assert step_flops(counts, shape) == llm + connector + vision
    assert step_flops(counts, shape, useful=False) == llm + 6 * 100 * 4 + connector + vision


def test_attention_bench_tiny(tmp_path):
    from bench import attention

    attention.main(["--device", "cpu", "--size", "tiny", "--seq-len", "256", "--modes", "mma", "cca",
                    "--no-compile", "--warmup", "0", "--iters", "1", "--out", str(tmp_path)])
    figs = figures_of(tmp_path / "attention-cpu.json")
    for mode in ("mma", "cca"):
        assert figs[f"{mode}: max |flex − sdpa| on real tokens"]["value"] < 1e-4   # same rule, same output
        assert figs[f"{mode}: FlexAttention ms"]["value"] > 0 and figs[f"{mode}: SDPA dense-mask ms"]["value"] > 0
    assert figs["mma: speed-up Flex over SDPA"]["goal"] == "attention.mma_speedup"
    assert figs["mma: speed-up Flex over SDPA"]["met"].startswith("n/a")


def test_train_step_bench_tiny(tmp_path):
    from bench import train_step

    result = train_step.main(["--device", "cpu", "--size", "tiny", "--runs", "sft-padded", "sft-packed",
                              "--sft-batch", "4", "--pack-tokens", "512", "--text-mean", "40", "--warmup", "1",
                              "--iters", "1", "--peak-flops", "1e12", "--out", str(tmp_path)])
    figs = figures_of(tmp_path / "train_step-cpu.json")
    for run in ("sft-padded", "sft-packed"):
        assert figs[f"{run}: useful tokens/s (non-PAD)"]["value"] <= figs[f"{run}: tokens/s (padding included)"]["value"]
        achieved = figs[f"{run}: achieved model FLOP/s (useful)"]["value"] * 1e12
        assert figs[f"{run}: MFU, useful tokens"]["value"] == pytest.approx(100 * achieved / 1e12)
        assert result.settings[run]["samples"] >= 1
    # packing fills rows: less padding than one padded row per sample; packed rows have the one static width
    packed, padded = result.settings["sft-packed"], result.settings["sft-padded"]
    assert packed["tokens"] / packed["grid_tokens"] > padded["tokens"] / padded["grid_tokens"]
    assert packed["width"] == 512 and result.settings["world_size"] == 1


def test_train_step_bench_runs_the_trainers_deepspeed_step(tmp_path):
    """``--engine deepspeed``: the recipe's ZeRO-3 engine and the trainer's micro-batch loop, one rank."""
    import subprocess
    import sys

    from dist_utils import REPO, show

    cmd = [sys.executable, "-m", "bench.train_step", "--engine", "deepspeed", "--device", "cpu", "--size", "tiny",
           "--pt-recipe", "tiny_pt", "--sft-recipe", "tiny_sft", "--runs", "pt-packed", "sft-packed",
           "--micro-batch", "3", "--text-mean", "40", "--warmup", "1", "--iters", "1", "--peak-flops", "1e12",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, show(proc)
    record = json.loads((tmp_path / "train_step-deepspeed-zero3-cpu.json").read_text())
    s = record["settings"]
    assert s["zero_stage"] == 3 and s["world_size"] == 1 and s["activation_checkpointing"] is False
    assert s["deepspeed_config"]["train_micro_batch_size_per_gpu"] == 3
    for run, width in (("pt-packed", 256), ("sft-packed", 544)):         # the recipes' data.pack_tokens
        assert s[run]["micro_batch"] == 3 and s[run]["samples"] == 3 and s[run]["width"] == width
    assert any("ZeRO stage 3" in n and "world size 1" in n for n in record["notes"])
    figs = {f["name"]: f for f in record["figures"]}
    assert figs["pt-packed: MFU, useful tokens"]["value"] > 0


def test_loader_bench_tiny(tmp_path):
    from bench import loader

    loader.main(["--samples", "8", "--workers", "0", "--size", "tiny", "--batch", "4", "--pack-tokens", "512",
                 "--out", str(tmp_path)])
    figs = figures_of(tmp_path / "loader-cpu.json")
    assert figs["max |pixel difference| real loader vs webdataset baseline"]["value"] < 1e-5
    assert figs["real, 0 workers: samples/s per core"]["met"] == "n/a (32² images, the goal is for 384²)"
    assert figs["real over webdataset, 0 workers"]["value"] > 0


def test_prep_bench_tiny(tmp_path):
    from bench import prep

    prep.main(["--samples", "4", "--workers", "1", "--size", "tiny", "--out", str(tmp_path)])
    figs = figures_of(tmp_path / "prep-cpu.json")
    assert figs["real pipeline, 1 worker(s): samples/s per core, start-up excluded"]["value"] > 0
    assert figs["webdataset baseline, 1 process: samples/s per core"]["value"] > 0
    assert figs["image step per ≤720p image: to_encoder_jpeg"]["value"] > 0
