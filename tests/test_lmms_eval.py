"""The ``aki`` lmms-eval model and ``pipeline.eval.paper`` under the real lmms-eval evaluator.

Local copies of MME, MMBench, POPE and CV-Bench (a few rows each, in the hub datasets' column schema,
images made here) are read by lmms-eval's own task YAMLs, overriding only where the data comes from.
"""
from __future__ import annotations

import glob
import json
import os
import lmms_eval.tasks
import pytest
from datasets import Dataset, Features, Image as ImageFeature, Sequence, Value
from PIL import Image

from pipeline.eval import paper

LMMS_TASKS = os.path.dirname(os.path.abspath(lmms_eval.tasks.__file__))


def _image(k: int, size=(48, 40)) -> Image.Image:
    return Image.new("RGB", size, ((60 * k) % 256, (90 + 40 * k) % 256, (200 - 30 * k) % 256))


def _write(folder, name: str, columns: dict, features: dict) -> str:
    path = os.path.join(folder, f"{name}.parquet")
    Dataset.from_dict(columns, features=Features(features)).to_parquet(path)
    return path


def _mme(folder):
    # Two images, two questions each (MME scores pairs): one perception, one cognition category.
    rows = [("existence/1.png", "Is there a dog in the image? Please answer yes or no.", "Yes", "existence", 0),
            ("existence/1.png", "Is there a cat in the image? Please answer yes or no.", "No", "existence", 0),
            ("code_reasoning/2.png", "Does the code print 3? Please answer yes or no.", "Yes", "code_reasoning", 1),
            ("code_reasoning/2.png", "Does the code print 4? Please answer yes or no.", "No", "code_reasoning", 1)]
    return _write(folder, "mme", {"question_id": [r[0] for r in rows], "image": [_image(r[4]) for r in rows],
                                  "question": [r[1] for r in rows], "answer": [r[2] for r in rows],
                                  "category": [r[3] for r in rows]},
                  {"question_id": Value("string"), "image": ImageFeature(), "question": Value("string"),
                   "answer": Value("string"), "category": Value("string")})


def _mmbench(folder):
    n = 3
    cols = {"index": list(range(n)), "question": ["What color is the square?", "How many circles?", "Which side?"],
            "hint": ["nan", "Count carefully.", "nan"], "A": ["red", "one", "left"], "B": ["blue", "two", "right"],
            "C": ["green", "three", "nan"], "D": ["nan", "four", "nan"], "answer": ["A", "C", "B"],
            "category": ["color", "count", "spatial"], "image": [_image(k) for k in range(n)],
            "source": ["test"] * n, "L2-category": ["perception"] * n, "comment": ["nan"] * n, "split": ["dev"] * n}
    feats = {k: Value("int64") if k == "index" else ImageFeature() if k == "image" else Value("string") for k in cols}
    return _write(folder, "mmbench", cols, feats)


def _pope(folder, split: str, offset: int):
    rows = [("Is there a dog in the image?", "yes"), ("Is there a car in the image?", "no"),
            ("Is there a tree in the image?", "yes")]
    n = len(rows)
    return _write(folder, f"pope_{split}", {
        "id": [str(offset + i) for i in range(n)], "question_id": [str(offset + i) for i in range(n)],
        "question": [q for q, _ in rows], "answer": [a for _, a in rows],
        "image_source": [f"COCO_val2014_{i:012d}" for i in range(n)], "image": [_image(i + offset) for i in range(n)],
        "category": [split] * n},
        {"id": Value("string"), "question_id": Value("string"), "question": Value("string"),
         "answer": Value("string"), "image_source": Value("string"), "image": ImageFeature(),
         "category": Value("string")})


def _cv_bench(folder, kind: str):
    rows = ([(0, "Count", "ADE20K", "How many chairs are in the image?", ["3", "2", "1", "0"], "(B)"),
             (1, "Relation", "COCO", "Where is the dog with respect to the cat?", ["left", "right"], "(A)")]
            if kind == "2D" else
            [(0, "Depth", "Omni3D", "Which is closer to the camera, the lamp or the sofa?", ["lamp", "sofa"], "(B)"),
             (1, "Distance", "Omni3D", "Which is closer to the table, the chair or the door?", ["chair", "door"], "(A)")])
    prompts = [q + " Select from the following choices.\n" + "\n".join(f"({chr(65 + i)}) {c}" for i, c in enumerate(ch))
               for _, _, _, q, ch, _ in rows]
    return _write(folder, f"cv_bench_{kind}", {
        "idx": [r[0] for r in rows], "type": [kind] * len(rows), "task": [r[1] for r in rows],
        "image": [_image(k) for k in range(len(rows))], "question": [r[3] for r in rows],
        "choices": [r[4] for r in rows], "answer": [r[5] for r in rows], "prompt": prompts,
        "filename": [f"img/{kind}/{r[1].lower()}/{k}.png" for k, r in enumerate(rows)],
        "source": [r[2] for r in rows], "source_dataset": [r[2].lower() for r in rows],
        "source_filename": [f"{k}.png" for k in range(len(rows))]},
        {"idx": Value("int64"), "type": Value("string"), "task": Value("string"), "image": ImageFeature(),
         "question": Value("string"), "choices": Sequence(Value("string")), "answer": Value("string"),
         "prompt": Value("string"), "filename": Value("string"), "source": Value("string"),
         "source_dataset": Value("string"), "source_filename": Value("string")})


def _task_yaml(folder, name: str, upstream: str, split: str, data: str) -> None:
    """lmms-eval's own task YAML, only reading the parquet copy instead of the hub dataset."""
    with open(os.path.join(folder, f"{name}.yaml"), "w") as f:
        f.write(f"include: {os.path.join(LMMS_TASKS, upstream)}\ntask: {name}\ndataset_path: parquet\n"
                f"dataset_name: null\ndataset_kwargs:\n  data_files:\n    {split}: {data}\n")


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory) -> tuple[str, dict[str, str]]:
    """(include folder, {lmms-eval task: local task}) for MME, MMBench, POPE x 3, CV-Bench 2D/3D, and a
    RealWorldQA copy whose data lacks the question column (the task crashes)."""
    folder = str(tmp_path_factory.mktemp("lmms_tasks"))
    data = os.path.join(folder, "data")
    os.makedirs(data)
    _task_yaml(folder, "local_mme", "mme/mme.yaml", "test", _mme(data))
    _task_yaml(folder, "local_mmbench", "mmbench/mmbench_en_dev_static.yaml", "dev", _mmbench(data))
    for task, split, offset in (("pope_random", "random", 0), ("pope_pop", "popular", 10),
                                ("pope_adv", "adversarial", 20)):
        _task_yaml(folder, f"local_{task}", f"pope/{task}.yaml", split, _pope(data, split, offset))
    _task_yaml(folder, "local_cv_bench_2d", "cv_bench/cv_bench_2d.yaml", "test", _cv_bench(data, "2D"))
    _task_yaml(folder, "local_cv_bench_3d", "cv_bench/cv_bench_3d.yaml", "test", _cv_bench(data, "3D"))
    broken = _write(data, "realworldqa", {"image": [_image(1)], "answer": ["A"]},
                    {"image": ImageFeature(), "answer": Value("string")})
    _task_yaml(folder, "local_realworldqa", "realworldqa/realworldqa.yaml", "test", broken)
    mapping = {t: f"local_{t}" for t in ("mme", "pope_random", "pope_pop", "pope_adv", "cv_bench_2d",
                                         "cv_bench_3d", "realworldqa")}
    mapping["mmbench_en_dev_static"] = "local_mmbench"
    return folder, mapping


def test_paper_table_from_lmms_eval_on_local_tasks(tmp_path, tiny_export, local_tasks, monkeypatch, capsys):
    include, mapping = local_tasks
    for key in ("OPENAI_API_KEY", "AZURE_API_KEY", "API_TYPE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "datasets"))
    out = tmp_path / "paper"
    columns = ["MMEP", "MMEC", "MMB", "POPE", "RealWorldQA", "CV-Bench2D", "CV-Bench3D"]
    rc = paper.main(["--model", tiny_export, "--out", str(out), "--include-path", include,
                     "--model-args", "max_new_tokens=3", "--batch-size", "2", "--num-processes", "1",
                     "--label", "tiny", "--columns", *columns,
                     *[a for t, local in mapping.items() for a in ("--task", f"{t}={local}")]])
    printed = capsys.readouterr()
    assert rc == 1, printed.err[-3000:]                 # the RealWorldQA copy crashed
    assert list((out / "submissions").glob("mmbench_*"))    # MMBench's submission files, in the output folder
    # lmms-eval's own result files, with each task's metrics
    metrics = {}
    for task in ("local_mme", "local_mmbench", "local_pope_random", "local_pope_pop", "local_pope_adv",
                 "local_cv_bench_2d", "local_cv_bench_3d"):
        files = glob.glob(str(out / "lmms_eval" / task / "*" / "[0-9]*_results.json"))
        assert len(files) == 1, (task, printed.err[-3000:])
        with open(files[0]) as f:
            metrics[task] = json.load(f)["results"][task]
        assert glob.glob(str(out / "lmms_eval" / task / "*" / f"*_samples_{task}.jsonl"))
    assert not glob.glob(str(out / "lmms_eval" / "local_realworldqa" / "*" / "*_results.json"))
    # the table: our row in the paper's column order beside the paper's two rows
    with open(out / "paper_table.json") as f:
        table = json.load(f)
    row, status = table["rows"]["tiny"], table["status"]
    assert table["columns"] == list(paper.COLUMN_NAMES)
    assert row["MMEP"] == pytest.approx(metrics["local_mme"]["mme_perception_score,none"])
    assert row["MMEC"] == pytest.approx(metrics["local_mme"]["mme_cognition_score,none"])
    assert 0 <= row["MMEP"] <= 200 and 0 <= row["MMEC"] <= 200          # one category each: acc + acc+
    assert row["MMB"] == pytest.approx(metrics["local_mmbench"]["gpt_eval_score,none"])
    f1 = [metrics[f"local_{t}"]["pope_f1_score,none"] for t in ("pope_random", "pope_pop", "pope_adv")]
    assert row["POPE"] == pytest.approx(100 * sum(f1) / 3)
    assert row["CV-Bench2D"] == pytest.approx(100 * metrics["local_cv_bench_2d"]["cv_bench_acc,none"])
    assert row["CV-Bench3D"] == pytest.approx(100 * metrics["local_cv_bench_3d"]["cv_bench_acc,none"])
    assert status["RealWorldQA"] == "crashed" and row["RealWorldQA"] is None
    assert {c: status[c] for c in ("LLaVAW", "MathVmini", "MM-Vet")} == dict.fromkeys(
        ("LLaVAW", "MathVmini", "MM-Vet"), "not judged")
    assert status["SEEDI"] == status["MMMU"] == "not run"
    assert table["rows"]["AKI-4B (paper, Table 2)"]["POPE"] == 86.9
    assert table["rows"]["MMA (paper, Table 1)"]["MMEP"] == 1363.7
    assert table["crashed_tasks"] == ["local_realworldqa"]
    assert "pools the questions" in table["notes"]["CV-Bench2D"]        # not the official 2D mean: labelled
    assert "CV-Bench2D: lmms-eval's cv_bench_acc pools" in printed.out
    # printed as markdown, every column of every row filled
    lines = [ln for ln in printed.out.splitlines() if ln.startswith("| ")]
    assert lines[0] == "| model | " + " | ".join(paper.COLUMN_NAMES) + " |"
    ours = [ln for ln in lines if ln.startswith("| tiny |")][0]
    assert ours.count("not judged") == 3 and "crashed" in ours and ours.count("|") == len(paper.COLUMN_NAMES) + 2


def test_plugin_answers_equal_pipeline_generate(tiny_export):
    from lmms_eval.api.instance import Instance

    from pipeline.chat import Chat
    from pipeline.eval.lmms import AKI
    from pipeline.generate import generate

    model = AKI.create_from_arg_string(f"pretrained={tiny_export},batch_size=2,max_new_tokens=6",
                                       {"batch_size": "1", "device": None})
    assert model.batch_size == 2                       # model_args win over the CLI's --batch_size
    docs = [{"images": [_image(0)]}, {"images": [_image(1), _image(2, (30, 60))]}, {"images": []},
            {"images": [_image(3)]}, {"images": [_image(4)]}]
    model.task_dict = {"t": {"test": docs}}
    texts = ["What is shown?", "Compare the two pictures in detail, please.", "Say yes or no.",
             "<image>\nIs there a red square in the image?", "How many circles?"]
    greedy, long_ = {"max_new_tokens": 16, "temperature": 0, "do_sample": False}, {"max_new_tokens": 64}
    requests = [Instance("generate_until", (text, dict(greedy if i % 2 else long_), lambda d: d["images"], i,
                                            "t", "test"), idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1})
                for i, text in enumerate(texts)]
    answers = model.generate_until(requests)
    expected = [generate(model.model, None, [Chat(((text.replace("<image>", "").strip(), None),))],
                         [doc["images"]], max_new_tokens=6)[0] for text, doc in zip(texts, docs)]
    assert answers == expected
    assert len(set(answers)) > 1                        # not trivially equal


def test_stop_strings_and_sampling_settings_come_from_the_task():
    from pipeline.eval.lmms import cut_at_stops, sampling_args

    assert cut_at_stops("A. red\nASSISTANT: more", ["ASSISTANT:", "\n"]) == "A. red"
    assert cut_at_stops("yes", ["ASSISTANT:"]) == "yes"
    assert sampling_args({"until": "ASSISTANT:", "max_new_tokens": 1024}, 8) == (
        {"max_new_tokens": 8, "temperature": 0.0}, ["ASSISTANT:"])
    assert sampling_args({"max_new_tokens": 16, "temperature": 0.2, "do_sample": False}, None)[0] == {
        "max_new_tokens": 16, "temperature": 0.0}                 # greedy unless the task samples
    assert sampling_args({"temperature": 0.7, "do_sample": True, "top_p": 0.9}, None)[0] == {
        "max_new_tokens": 128, "temperature": 0.7, "top_p": 0.9}


def test_entry_point_registers_the_aki_model():
    from lmms_eval.models import get_model

    assert get_model("aki").__name__ == "AKI"
