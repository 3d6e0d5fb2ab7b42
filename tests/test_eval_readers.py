"""Readers of the released CV-Bench and POPE files, on small fixtures in exactly those formats."""
from __future__ import annotations

import io
import json
import os
import sys

import pytest
from PIL import Image

from pipeline.eval.readers import read_cv_bench, read_pope

# (idx, type, task, source, question, choices, answer, image file)
CV_BENCH_ROWS = [
    (0, "2D", "Count", "ADE20K", "How many chairs are in the image?", ["3", "2", "1", "0"], "(B)",
     "img/2D/count/ade20k_10.png"),
    (1, "2D", "Relation", "COCO", "Considering the relative positions of the dog and the cat, where is "
     "the dog located with respect to the cat?", ["left", "right"], "(A)", "img/2D/relation/coco_7.png"),
    (2, "2D", "Count", "COCO", "How many cars are in the image?", ["1", "2", "3", "4", "5", "6"], "(F)",
     "img/2D/count/coco_11.png"),
    (0, "3D", "Depth", "Omni3D", "Which is closer to the camera, the lamp or the sofa?", ["lamp", "sofa"],
     "(B)", "img/3D/depth/omni3d_hypersim_106.jpg"),
    (1, "3D", "Distance", "Omni3D", "Which is closer to the table, the chair or the door?",
     ["chair", "door"], "(A)", "img/3D/distance/omni3d_sunrgbd_3.jpg"),
]


def _image_bytes(color: tuple[int, int, int], fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format=fmt)
    return buf.getvalue()


def write_cv_bench(folder: str, rows=CV_BENCH_ROWS, extra_lines: tuple[str, ...] = ()) -> str:
    """CV-Bench as released: test_2d.jsonl / test_3d.jsonl + img/{2D,3D}/<task>/<file>."""
    os.makedirs(folder, exist_ok=True)
    lines: dict[str, list[str]] = {"2D": [], "3D": []}
    for k, (idx, typ, task, source, question, choices, answer, filename) in enumerate(rows):
        path = os.path.join(folder, filename)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(_image_bytes((40 * k, 100, 200), "PNG" if filename.endswith("png") else "JPEG"))
        opts = "\n".join(f"({chr(65 + i)}) {c}" for i, c in enumerate(choices))
        lines[typ].append(json.dumps({
            "idx": idx, "type": typ, "task": task, "question": question, "choices": choices,
            "answer": answer, "prompt": f"{question} Select from the following choices.\n{opts}",
            "filename": filename, "source": source, "source_dataset": source.lower(),
            "source_filename": os.path.basename(filename), "target_class": None, "target_size": None,
            "bbox": None}))
    lines["2D"].extend(extra_lines)
    for typ, name in (("2D", "test_2d.jsonl"), ("3D", "test_3d.jsonl")):
        with open(os.path.join(folder, name), "w") as f:
            f.write("\n".join(lines[typ]) + "\n")
    return folder


# POPE: per split (question_id restarts at 1), two images × (yes, no).
POPE_QUESTIONS = [("COCO_val2014_000000310196.jpg", "Is there a snowboard in the image?", "yes"),
                  ("COCO_val2014_000000310196.jpg", "Is there a giraffe in the image?", "no"),
                  ("COCO_val2014_000000000042.jpg", "Is there a dog in the image?", "yes"),
                  ("COCO_val2014_000000000042.jpg", "Is there a car in the image?", "no")]


def write_pope(folder: str, image_folder: str, extra_lines: tuple[str, ...] = ()) -> str:
    """POPE as released: coco_pope_{split}.json files that are really JSON Lines, + COCO val2014 images."""
    os.makedirs(folder, exist_ok=True)
    os.makedirs(image_folder, exist_ok=True)
    for name in {q[0] for q in POPE_QUESTIONS}:
        with open(os.path.join(image_folder, name), "wb") as f:
            f.write(_image_bytes((200, 30, 30), "JPEG"))
    for split in ("random", "popular", "adversarial"):
        with open(os.path.join(folder, f"coco_pope_{split}.json"), "w") as f:
            for qid, (image, text, label) in enumerate(POPE_QUESTIONS, start=1):
                f.write(json.dumps({"question_id": qid, "image": image, "text": text, "label": label}) + "\n")
            for line in extra_lines:
                f.write(line + "\n")
    return folder


def test_cv_bench_folder_reads_both_files_with_images(tmp_path):
    items, report = read_cv_bench(write_cv_bench(str(tmp_path / "cvb")))
    assert report.kept == 5 and not report.skipped
    assert [(i.type, i.idx, i.source, i.answer) for i in items] == [
        ("2D", 0, "ADE20K", "B"), ("2D", 1, "COCO", "A"), ("2D", 2, "COCO", "F"),
        ("3D", 0, "Omni3D", "B"), ("3D", 1, "Omni3D", "A")]
    assert len({i.key for i in items}) == 5          # idx restarts per file; keys stay unique
    assert items[2].choices == ["1", "2", "3", "4", "5", "6"]
    img = Image.open(io.BytesIO(items[3].load_image()))
    assert img.size == (8, 8)


def test_cv_bench_single_file(tmp_path):
    folder = write_cv_bench(str(tmp_path / "cvb"))
    items, _ = read_cv_bench(os.path.join(folder, "test_3d.jsonl"))
    assert {i.source for i in items} == {"Omni3D"} and len(items) == 2


def test_cv_bench_bad_records_are_skipped_and_counted(tmp_path):
    bad = [
        "{not json",
        json.dumps({"idx": 9, "question": "q", "choices": ["a", "b"], "answer": "(C)", "source": "COCO",
                    "filename": "img/2D/count/ade20k_10.png"}),
        json.dumps({"idx": 10, "question": "q", "choices": ["a", "b"], "answer": "(A)", "source": "KITTI",
                    "filename": "img/2D/count/ade20k_10.png"}),
        json.dumps({"idx": 11, "question": "q", "choices": ["a", "b"], "answer": "(A)", "source": "COCO",
                    "filename": "img/2D/count/missing.png"}),
        json.dumps({"idx": 12, "question": "q", "choices": ["a", "b"], "source": "COCO"}),
    ]
    items, report = read_cv_bench(write_cv_bench(str(tmp_path / "cvb"), extra_lines=tuple(bad)))
    assert report.kept == 5 == len(items)
    assert dict(report.skipped) == {"not valid JSON": 1, "answer outside the options": 1,
                                    "unknown source": 1, "image file missing": 1,
                                    "missing field answer": 1}
    assert "skipped" in report.summary("CV-Bench")


def test_cv_bench_missing_folder_and_parquet_without_pyarrow_fail_clearly(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="test_2d.jsonl"):
        read_cv_bench(str(tmp_path))
    parquet = tmp_path / "test_2d.parquet"
    parquet.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)          # as on a machine without pyarrow
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="test_2d.jsonl / test_3d.jsonl.*img/"):
        read_cv_bench(str(parquet))


def test_pope_reads_json_lines_per_split(tmp_path):
    folder = write_pope(str(tmp_path / "pope"), str(tmp_path / "val2014"))
    items, report = read_pope(folder, str(tmp_path / "val2014"))
    assert report.kept == 12 and len(items) == 12
    assert [i.split for i in items[::4]] == ["random", "popular", "adversarial"]
    assert [i.question_id for i in items[:4]] == [1, 2, 3, 4]
    assert len({i.key for i in items}) == 12
    assert [i.label for i in items[:4]] == ["yes", "no", "yes", "no"]
    items, _ = read_pope(folder, str(tmp_path / "val2014"), splits=("popular",))
    assert len(items) == 4 and {i.split for i in items} == {"popular"}


def test_pope_bad_lines_are_skipped_and_counted(tmp_path):
    bad = (json.dumps({"question_id": 9, "image": "COCO_val2014_000000000042.jpg", "text": "?", "label": "maybe"}),
           json.dumps({"question_id": 10, "image": "COCO_val2014_000000000001.jpg", "text": "?", "label": "no"}))
    folder = write_pope(str(tmp_path / "pope"), str(tmp_path / "img"), extra_lines=bad)
    items, report = read_pope(folder, str(tmp_path / "img"), splits=("random",))
    assert len(items) == 4
    assert dict(report.skipped) == {"label is not yes/no": 1, "image file missing": 1}


def test_pope_missing_split_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="coco_pope_random.json"):
        read_pope(str(tmp_path))
    with pytest.raises(ValueError, match="unknown POPE split 'hard'"):
        read_pope(str(tmp_path), splits=("hard",))
