"""LoRA fine-tuning (pipeline/lora.py) from a converted released-layout checkpoint, through the real trainer.

Runs shared between tests (each costs a process launch):

* Z3 — LoRA SFT under ZeRO-3 on 2 ranks, 4 steps (probe: engine logits and gathered state at the end);
* S1 — the same in one process under ZeRO-2 (no parameter sharding), 4 steps straight;
* R  — S1's recipe preempted by SIGTERM during step 2 (checkpoint after step 3, exit 0), then ``--resume auto``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from pipeline import checkpoint as ckpt
from pipeline.metrics import read_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import TINY_CORPUS  # noqa: E402
from dist_utils import REPO, probe_batch, show, torchrun, write_dataset  # noqa: E402
from official_fixtures import NUM_LATENTS, build_phi35_like_tokenizer, write_official_checkpoint  # noqa: E402

LORA = "model.lora={rank: 4, alpha: 8, dropout: 0.1}"
STEPS = 4
ZERO2 = "train.deepspeed=ds_configs/zero2_single_gpu.json"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from pipeline.convert import from_official
    from pipeline.model.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("lora")
    tok_path = build_phi35_like_tokenizer(TINY_CORPUS, root / "tok")
    tok = load_tokenizer(tok_path)
    official = write_official_checkpoint(root / "official", tok_path)
    converted = from_official(official["aki"], root / "converted")
    data = write_dataset(root / "sft", tok, "sft", 16, num_visual_tokens=NUM_LATENTS, text_only_every=4)
    args = ["--config", "tiny_sft", "--set", f"train.init_from={converted}", "--set", f"data.datasets=[{{path: {data}}}]",
            "--set", LORA, "--set", f"train.total_steps={STEPS}", "--set", "train.save_every=2",
            "--set", "train.keep_last=3"]
    return {"root": root, "tok": tok, "official": official, "converted": Path(converted), "args": args}


def train(world, name: str, extra: list[str], nproc: int, probe: bool = True, env: dict | None = None) -> Path:
    out = world["root"] / name
    full = world["args"] + extra + ["--output-dir", str(out)]
    env = {"WANDB_MODE": "disabled", "PYTHONPATH": str(REPO), **(env or {})}   # this checkout's pipeline
    if probe:
        proc = torchrun(["tests/dist_utils.py", "probe", str(out / "probe"), "--"] + full, nproc,
                        {"AKI_TEST_SAVE_STATE": "1", **env}, module=False)
    else:
        proc = torchrun(["pipeline.train"] + full, nproc, env)
    assert proc.returncode == 0, show(proc)
    return out


@pytest.fixture(scope="module")
def run_z3(world):
    return train(world, "Z3", [], nproc=2)


@pytest.fixture(scope="module")
def run_s1(world):
    return train(world, "S1", ["--set", ZERO2], nproc=1)


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out)}


def digests(out: Path) -> dict[int, str]:
    return {r["step"]: r["data_digest"] for r in read_metrics(out)}


def check_only_adapters_and_connector_changed(world, out: Path) -> None:
    from safetensors.torch import load_file

    base = load_file(world["converted"] / "model.safetensors")
    state = torch.load(out / "probe" / "state_end.pt", weights_only=True)
    adapters = {k: v for k, v in state.items() if ".lora_" in k}
    assert adapters and all(".layers." in k and k.startswith("llm.model.") for k in adapters)
    wrapped = {k.rsplit(".", 3)[0] for k in adapters}           # ...self_attn.qkv_proj
    assert {w.rsplit(".", 1)[1] for w in wrapped} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in adapters.items() if ".lora_B." in k)
    rest = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
    assert rest.keys() == base.keys()
    for key, value in rest.items():
        if key.startswith(("resampler.", "projection.")):
            continue
        assert torch.equal(value, base[key]), f"{key} changed"   # vision tower and base LLM: bit-identical
    assert all(not torch.equal(rest[k], base[k]) for k in ("resampler.latents", "projection.weight"))
    # the checkpoints hold the trainable state only
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    last = ckpt.latest_complete(out)
    saved = get_fp32_state_dict_from_zero_checkpoint(str(last.parent), tag=last.name, exclude_frozen_parameters=True)
    trainable = {k for k in state if ".lora_" in k or k.startswith(("resampler.", "projection."))}
    assert set(saved) == trainable
    size = sum(p.stat().st_size for p in last.glob("*.pt"))
    assert size < (world["converted"] / "model.safetensors").stat().st_size / 4, size


def test_lora_under_zero3_on_two_ranks_trains_only_adapters_and_connector(world, run_z3):
    check_only_adapters_and_connector_changed(world, run_z3)
    loss = losses(run_z3)
    assert sorted(loss) == list(range(1, STEPS + 1)) and loss[STEPS] < loss[1], loss


def test_lora_in_one_process_without_sharding_trains_only_adapters_and_connector(world, run_s1):
    check_only_adapters_and_connector_changed(world, run_s1)


def test_merged_export_and_peft_adapter_give_the_trained_models_logits(world, run_z3):
    from peft import PeftModel
    from safetensors.torch import load_file

    from pipeline.model.aki import AKIModel

    batch = probe_batch(world["tok"], num_visual_tokens=NUM_LATENTS)
    engine = torch.load(run_z3 / "probe" / "logits_end.pt", weights_only=True)
    merged = AKIModel.from_pretrained(run_z3 / "export")               # an ordinary AKI export
    with torch.no_grad():
        merged_logits = merged(**batch).logits
    torch.testing.assert_close(merged_logits, engine, rtol=0, atol=1e-5)
    assert not torch.allclose(engine, torch.load(run_z3 / "probe" / "logits_start.pt", weights_only=True))

    adapter = run_z3 / "export" / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    stored = load_file(adapter / "adapter_model.safetensors")
    assert all(".lora_" in k or ".resampler." in k or ".projection." in k for k in stored)
    with_adapter = PeftModel.from_pretrained(AKIModel.from_pretrained(world["converted"]), str(adapter)).eval()
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(**batch).logits, merged_logits, rtol=0, atol=1e-5)
    base = load_file(world["converted"] / "model.safetensors")
    ours = load_file(run_z3 / "export" / "model.safetensors")
    assert all(torch.equal(ours[k], base[k]) for k in base if k.startswith("vision."))


def test_merged_export_converts_to_the_released_layout_and_back_bit_exactly(world, run_z3, tmp_path):
    from safetensors.torch import load_file

    from pipeline.convert import from_official, to_official

    official = world["official"]
    back = to_official(run_z3 / "export", tmp_path / "official", vision_encoder_path=str(official["siglip"]),
                       lang_model_path=str(official["phi3"]))
    again = from_official(back, tmp_path / "again")
    ours, round_trip = load_file(run_z3 / "export" / "model.safetensors"), load_file(Path(again) / "model.safetensors")
    assert ours.keys() == round_trip.keys()
    assert all(torch.equal(ours[k], round_trip[k]) and ours[k].dtype == round_trip[k].dtype for k in ours)


def test_export_command_of_a_lora_checkpoint_gives_the_trainers_export(world, run_s1, tmp_path):
    from pipeline.export import main as export_main

    assert export_main([str(ckpt.latest_complete(run_s1)), str(tmp_path / "again")]) == 0
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        assert (tmp_path / "again" / name).read_bytes() == (run_s1 / "export" / name).read_bytes(), name


def test_sigterm_and_resume_auto_give_the_straight_runs_losses_and_data(world, run_s1):
    # SIGTERM during step 2: the ranks agree on it in step 3's first all-reduce, finish step 3, save, exit 0
    out = train(world, "R", ["--set", ZERO2], nproc=1, env={"AKI_TEST_SIGTERM_STEP": "2"})
    assert sorted(losses(out)) == [1, 2, 3] and ckpt.latest_complete(out).name == ckpt.step_tag(3)
    train(world, "R", ["--set", ZERO2, "--resume", "auto"], nproc=1, probe=False)
    assert digests(out) == digests(run_s1)
    assert losses(out) == pytest.approx(losses(run_s1), rel=1e-6, abs=1e-6)
    assert (out / "export" / "model.safetensors").read_bytes() == (run_s1 / "export" / "model.safetensors").read_bytes()


# ---- recipe checks: one clear error each, before any distributed work ----------------------------------

@pytest.mark.parametrize("lora, expected", [
    ("{target_modules: [qkv_proj, dense]}", "`model.lora.target_modules[1]` is 'dense'; choose one of 'qkv_proj', "
                                             "'o_proj', 'gate_up_proj', 'down_proj'"),
    ("{target_modules: [fc1]}", "'fc1', a layer of the SigLIP vision tower (frozen, never wrapped)"),
    ("{rank: 0}", "`model.lora.rank` must be a positive integer, got 0"),
    ("{rank: -4}", "`model.lora.rank` must be a positive integer, got -4"),
])
def test_bad_lora_recipe_is_one_clear_error(world, lora, expected, tmp_path, capsys):
    from pipeline import train as trainer

    code = trainer.main(world["args"] + ["--set", f"model.lora={lora}", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and err.count("error:") == 1, err
    assert not (tmp_path / "run").exists()


def test_lora_without_a_base_export_is_refused():
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="LoRA fine-tunes an AKI export.*set train.init_from"):
        load_config("tiny_sft", [LORA])


def test_qlora_is_refused_where_its_4bit_layers_cannot_run(world, monkeypatch):
    from pipeline.config import ConfigError, load_config
    from pipeline.validation import validate_launch

    config = load_config("tiny_sft", world["args"][2:][1::2] + ["model.lora.quantize=nf4"])
    with pytest.raises(ConfigError, match="ZeRO-3 cannot partition.*zero2_single_gpu.json"):
        validate_launch(config, 1)
    config.train.deepspeed = "ds_configs/zero2_single_gpu.json"
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)          # a machine without bitsandbytes
    with pytest.raises(ConfigError, match=r"needs bitsandbytes .*pip install '\.\[qlora\]'"):
        validate_launch(config, 1)


def test_qlora_holds_the_adapted_base_in_4_bits_and_trains_only_adapters_and_connector(tiny_model_factory):
    """Where bitsandbytes' 4-bit layers run (also on the CPU since bitsandbytes 0.46): the wrapped model's
    targeted base layers are 4-bit, and one backward reaches the adapters and the connector only."""
    from pipeline.lora import LoraConfig, apply_lora, quantization_problem

    lora = LoraConfig(rank=4, alpha=8, dropout=0.0, quantize="nf4")
    problem = quantization_problem(lora, zero_stage=2)
    if problem is not None:
        pytest.skip(problem)           # this machine cannot: the recipe check above refuses QLoRA here
    import bitsandbytes as bnb

    from pipeline.model.aki import AKIModel

    model = tiny_model_factory()
    batch = probe_batch_for(model)
    apply_lora(model, lora).train()
    wrapped = [m for n, m in model.named_modules() if n.endswith(".qkv_proj")]
    assert wrapped and all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in wrapped)
    assert all(m.base_layer.weight.dtype == torch.uint8 for m in wrapped)      # packed 4-bit values
    out = AKIModel.forward(model, **batch, return_logits=False)
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all(".lora_" in n or n.startswith(("resampler.", "projection.")) for n in with_grad)
    assert any(".lora_B." in n for n in with_grad) and "projection.weight" in with_grad


def probe_batch_for(model):
    return probe_batch(model.tokenizer, num_visual_tokens=model.num_visual_tokens, image_size=model.image_size)


def test_train_step_bench_measures_lora_against_full_fine_tuning(tmp_path):
    """``python -m bench.train_step --lora``: fewer trainable parameters than full fine-tuning of the same
    size, and AdamW's measured states are its two fp32 moments of exactly those parameters."""
    from bench import train_step

    common = ["--device", "cpu", "--size", "tiny", "--runs", "sft-packed", "--pack-tokens", "256", "--text-mean", "20",
              "--warmup", "0", "--iters", "1", "--out", str(tmp_path)]
    figures = {}
    for name, extra in (("full", []), ("lora", ["--lora", "--lora-rank", "2"])):
        result = train_step.main(common + extra)
        figures[name] = {f.name: f.value for f in result.figures}
    full, lora = figures["full"], figures["lora"]
    assert 0 < lora["trainable parameters"] < full["trainable parameters"]
    for f in (full, lora):
        states = f["optimizer states (AdamW m, v; measured, per rank)"] * 2**30
        assert states == pytest.approx(8 * f["trainable parameters"] * 1e6)
    assert (tmp_path / "train_step-lora-cpu.json").is_file() and (tmp_path / "train_step-cpu.json").is_file()
