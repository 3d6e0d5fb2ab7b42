"""Recipes: loading, inheritance, overrides, validation errors, DeepSpeed "auto" filling."""
from __future__ import annotations

import json

import pytest

from pipeline.config import RECIPES_DIR, REPO_ROOT, ConfigError, load_config, save_config
from pipeline.validation import grad_accum_steps, validate_launch
from pipeline.ds_config import fill_deepspeed_config, offloads_optimizer

ALL_RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
DS_JSONS = sorted((REPO_ROOT / "ds_configs").glob("*.json"))


def write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ALL_RECIPES)
def test_every_shipped_recipe_validates(name):
    config = load_config(name)
    assert config.name == name
    assert config.train.output_dir == f"runs/{name}"


def test_paper_hyperparameters_in_aki4b_recipes():
    pt, sft = load_config("aki4b_pt"), load_config("aki4b_sft_mma")
    assert (pt.train.global_batch_size, pt.optim.lr, pt.optim.min_lr, pt.optim.warmup_steps,
            pt.optim.weight_decay) == (192, 1e-4, 1e-5, 2000, 1e-2)
    assert (sft.train.global_batch_size, sft.optim.lr, sft.optim.min_lr, sft.optim.warmup_steps,
            sft.optim.weight_decay) == (64, 2e-5, 1e-6, 150, 1e-4)
    for c in (pt, sft):
        assert (c.optim.grad_clip, c.train.precision, c.optim.scheduler) == (1.0, "bf16", "cosine_with_min_lr")
    assert sft.model.attention_mode == "mma" and sft.train.stage == "sft"
    assert sft.train.init_from == "runs/aki4b_pt/export" and pt.optim.weight_decay_all and sft.optim.weight_decay_all
    # one run of 275k steps: Kale (100M-sample subset) for 250k, then OCR-200m (5M) for 25k (Appendix B.1)
    assert pt.train.total_steps == 275000
    assert [(p.name, p.start_step, [(s.path, s.samples) for s in p.datasets]) for p in pt.data.phases] == [
        ("kale", 0, [("data/pt/kale", 100_000_000)]), ("ocr", 250000, [("data/pt/ocr", 5_000_000)])]


def test_table1_rows_differ_only_where_the_paper_says():
    base = load_config("t1_causal_sft").to_dict()
    expected = {  # recipe -> (attention mode, orders, steps)
        "t1_causal_sft": ("causal", ["it"], 5000), "t1_cca_sft": ("cca", ["it"], 5000),
        "t1_mma_sft": ("mma", ["it"], 5000), "t1_dot_sft": ("causal", ["ti", "it"], 10000),
        "t1_dot-wo-ti-sft_sft": ("causal", ["it"], 5000), "t1_dot-wo-it-sft_sft": ("causal", ["ti"], 5000),
        "t1_dot-wo-ti-pt_pt": ("causal", ["it"], 50000), "t1_dot-wo-it-pt_pt": ("causal", ["ti"], 50000),
        "t1_dot_pt": ("causal", ["ti", "it"], 100000), "t1_cca_pt": ("cca", ["it"], 50000),
    }
    for name, (mode, orders, steps) in expected.items():
        c = load_config(name)
        assert (c.model.attention_mode, c.data.orders, c.train.total_steps) == (mode, orders, steps), name
        if c.train.stage == "sft":  # same data and optimiser as the baseline row (DOT: a schedule per order)
            optim = {**c.to_dict()["optim"], "schedule_span": "stage"}
            assert optim == base["optim"] and c.data.mixture == load_config("t1_causal_sft").data.mixture
        else:                       # the same 10M Kale samples for every row
            assert [(s.path, s.samples) for s in c.data.phases[0].datasets] == [("data/pt/kale", 10_000_000)]
        assert c.optim.weight_decay_all
        assert c.optim.schedule_span == ("order" if len(c.data.orders) > 1 else "stage"), name
    assert load_config("t1_dot-wo-it-sft_sft").train.init_from == "runs/t1_dot_pt/export"


def test_base_inheritance_merges_recursively(tmp_path):
    write(tmp_path / "parent.yaml", "model: {size: tiny, attention_mode: cca}\noptim: {lr: 0.5, min_lr: 0.1}\n")
    child = write(tmp_path / "child.yaml", "base: parent.yaml\noptim: {lr: 0.25}\n")
    c = load_config(child)
    assert (c.model.attention_mode, c.optim.lr, c.optim.min_lr, c.name) == ("cca", 0.25, 0.1, "child")


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "a.yaml")


def test_set_overrides_parse_values_with_yaml():
    c = load_config("tiny_pt", ["optim.lr=2e-3", "data.orders=[ti, it]", "model.activation_checkpointing=true",
                                "data.datasets=[{path: /x, proportion: 10.3%}, {path: /y, proportion: 1/4}]"])
    assert c.optim.lr == 2e-3 and c.data.orders == ["ti", "it"] and c.model.activation_checkpointing is True
    assert [s.proportion for s in c.data.datasets] == [pytest.approx(0.103), 0.25]


@pytest.mark.parametrize("override, message", [
    ("optim.lr_sheduler=cosine", "`optim.lr_sheduler` unknown; did you mean `optim.scheduler`?"),
    ("train.lr=1e-4", "`train.lr` unknown; did you mean `optim.lr`?"),
    ("modle.size=tiny", "`modle` unknown; did you mean `model`?"),
    ("optim.lr=-1e-4", "`optim.lr` must be > 0"),
    ("optim.lr=0", "`optim.lr` must be > 0"),
    ("optim.min_lr=1", "`optim.min_lr` .* is above `optim.lr`"),
    ("model.attention_mode=mmaa", "`model.attention_mode` is 'mmaa'; did you mean 'mma'\\?"),
    ("model.size=huge", "`model.size` is 'huge'"),
    ("data.collate=packed", "did you mean 'pack'"),
    ("data.datasets=[{path: /x, proportion: lots}]", "proportion 'lots' does not parse"),
    ("data.datasets=[{path: /x, proportion: -0.5}]", "must be a finite number >= 0"),
    ("data.datasets=[{path: /x, proportion: 0}]", "proportions sum to 0"),
    ("data.orders=[it, tt]", "`data.orders\\[1\\]` is 'tt'"),
    ("train.micro_batch_size=3", "not a multiple of `train.micro_batch_size`"),
    ("train.total_steps=ten", "`train.total_steps` must be an integer"),
    ("optim.betas=[0.9]", "`optim.betas` must have 2 values"),
    ("data.max_length=1024", "`data.pack_tokens` \\(256\\) is smaller than `data.max_length`"),
    ("noequals", "not of the form section.key=value"),
])
def test_bad_config_is_one_clear_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny_pt", [override])


def test_unknown_recipe_name_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean `tiny_pt`"):
        load_config("tiny_ptt")


def test_batch_must_divide_by_micro_batch_times_world_size():
    c = load_config("aki4b_pt")  # 192 = micro 24 x ranks x accumulation
    assert grad_accum_steps(c, 8) == 1 and grad_accum_steps(c, 2) == 4
    with pytest.raises(ConfigError, match=r"not divisible .* x world size \(5\)"):
        grad_accum_steps(c, 5)


def test_validate_launch_checks_data_and_paths(tmp_path):
    with pytest.raises(ConfigError, match="config has no data"):
        validate_launch(load_config("tiny_pt"), 1)
    c = load_config("tiny_pt", [f"data.datasets=[{{path: {tmp_path / 'missing'}}}]"])
    with pytest.raises(ConfigError, match=r"data.datasets\[0\].path`: .*missing does not exist"):
        validate_launch(c, 1)
    (tmp_path / "data").mkdir()
    assert validate_launch(load_config("tiny_pt", [f"data.datasets=[{{path: {tmp_path / 'data'}}}]"]), 2) == 2


def test_saved_config_loads_back_identical(tmp_path):
    c = load_config("t1_dot_sft", ["optim.lr=3e-5"])
    save_config(c, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml").to_dict() == c.to_dict()


@pytest.mark.parametrize("ds_json", DS_JSONS, ids=lambda p: p.stem)
def test_deepspeed_json_autos_are_all_filled(ds_json):
    from deepspeed.runtime.config import DeepSpeedConfig

    c = load_config("aki4b_sft_mma", [f"train.deepspeed={ds_json}"])
    ds = fill_deepspeed_config(c, world_size=1)  # DeepSpeedConfig below sees one process
    assert "auto" not in json.dumps(ds)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"],
            ds["gradient_clipping"], ds["bf16"]["enabled"]) == (64, 8, 8, 1.0, True)
    assert "optimizer" not in ds and "scheduler" not in ds
    parsed = DeepSpeedConfig(ds)  # DeepSpeed itself accepts it
    assert parsed.train_batch_size == 64 and parsed.gradient_accumulation_steps == 8
    assert offloads_optimizer(ds) == (ds_json.stem == "zero3_offload")


def test_fp32_recipe_disables_bf16():
    ds = fill_deepspeed_config(load_config("tiny_pt"), world_size=2)
    assert ds["bf16"]["enabled"] is False and ds["gradient_accumulation_steps"] == 2


def test_deepspeed_unknown_auto_or_conflict_is_an_error(tmp_path):
    bad = write(tmp_path / "ds.json", json.dumps({"train_batch_size": "auto", "zero_optimization": {"stage": 3, "sub_group_size": "auto"}}))
    with pytest.raises(ConfigError, match="`zero_optimization.sub_group_size` is \"auto\""):
        fill_deepspeed_config(load_config("tiny_pt", [f"train.deepspeed={bad}"]), 1)
    clash = write(tmp_path / "clash.json", json.dumps({"train_batch_size": 16}))
    with pytest.raises(ConfigError, match="sets `train_batch_size` to 16 but the recipe gives 8"):
        fill_deepspeed_config(load_config("tiny_pt", [f"train.deepspeed={clash}"]), 1)
    opt = write(tmp_path / "opt.json", json.dumps({"optimizer": {"type": "AdamW"}}))
    with pytest.raises(ConfigError, match="has a `optimizer` section"):
        fill_deepspeed_config(load_config("tiny_pt", [f"train.deepspeed={opt}"]), 1)


def test_recipe_lr_schedule_warms_up_then_decays_to_min_lr():
    import torch
    from transformers import get_scheduler

    o = load_config("tiny_sft", ["train.total_steps=20", "optim.warmup_steps=4"]).optim
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=o.lr)
    schedule = get_scheduler(o.scheduler, optimizer, num_warmup_steps=4, num_training_steps=20,
                             scheduler_specific_kwargs=o.scheduler_kwargs())
    lrs = []
    for _ in range(20):
        lrs.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    lrs.append(schedule.get_last_lr()[0])
    assert lrs[0] == 0.0 and lrs[4] == pytest.approx(o.lr)
    assert lrs[-1] == pytest.approx(o.min_lr) and all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_reproduction_guide_is_regenerated_from_the_recipes():
    from pipeline.reproduction import GUIDE, main, render

    text = render()
    assert GUIDE.read_text() == text, "pipeline/configs/README.md is stale: run python -m pipeline.reproduction"
    assert main(["--check"]) == 0
    # one line per recipe of each paper run, with its steps, batch and samples
    assert "| Table 1: DOT | PT | `t1_dot_pt` | kale@0: `data/pt/kale` (10M) | 100k | 192 |" in text
    assert "| 19.2M | 9.6M |" in text.split("`t1_dot_pt`")[1].splitlines()[0]
    assert "ocr@250000: `data/pt/ocr` (5M) | 275k |" in text


@pytest.mark.parametrize("override, message", [
    ("data.phases=[{name: a, start_step: 2, datasets: [{path: d}]}]", "the first must have start_step 0"),
    ("data.phases=[{name: a, datasets: [{path: d}]}, {name: b, start_step: 6, datasets: [{path: e}]}]",
     r"must be after the previous phase's \(0\) and below `train.total_steps` \(6\)"),
    ("data.phases=[{name: a, datasets: [{path: d}]}, {name: a, start_step: 3, datasets: [{path: e}]}]", "repeat"),
    ("data.phases=[{name: a}]", r"`data.phases\[0\]` \('a'\) has no data"),
    ("data.datasets=[{path: d, samples: 5, proportion: 0.5}]", "sets both `samples` and `proportion`"),
    ("data.datasets=[{path: d, samples: 5}, {path: e}]", "some streams set `samples` and some do not"),
    ("optim.schedule_span=orders", "did you mean 'order'"),
    ("data.ti_pt_image=first", "choose one of 'before_end', 'last'"),
])
def test_bad_phases_subsets_and_schedules_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny_pt", [override])


def test_phases_exclude_top_level_data_and_several_dot_orders():
    phases = "data.phases=[{name: a, datasets: [{path: d}]}, {name: b, start_step: 3, datasets: [{path: e}]}]"
    with pytest.raises(ConfigError, match="give the data in the phases only"):
        load_config("tiny_pt", [phases, "data.datasets=[{path: d}]"])
    with pytest.raises(ConfigError, match="several `data.phases` and several `data.orders`"):
        load_config("tiny_pt", [phases, "data.orders=[ti, it]"])
    with pytest.raises(ConfigError, match="must split evenly"):
        load_config("tiny_pt", ["data.orders=[ti, it]", "train.total_steps=7", "optim.schedule_span=order"])
