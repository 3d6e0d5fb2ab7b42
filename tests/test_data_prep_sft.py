"""Each SFT parser on a tiny fixture in its real format gives exactly the expected samples."""
from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest

from data_prep.records import Skip
from data_prep.safe_pickle import UnsafePickleError
from data_prep.sft import SftOptions, get_sft_source
from data_prep.writer import Converter, EncodeSettings
from pipeline.chat import SYSTEM_MESSAGE
from pipeline.data.format import split_images
from pipeline.tokens import IMAGE, TEXT_INPUT, TEXT_TARGET
from fixtures_data import mean_rgb, write_image, write_json, write_malicious_pickle, write_plain_pickle

SYS = f"<s><|system|>\n{SYSTEM_MESSAGE}<|end|>\n<|user|>\n"
SHORT = "Answer the question using a single word or phrase. "
CHOICE = "Answer with the option's letter from the given choices directly. "
REGION = "Provide a short description for this region. "
# Layout of a one-image, one-turn sample: prompt, N image slots, rest of the prompt, answer.
ONE_TURN = [TEXT_INPUT, IMAGE, TEXT_INPUT, TEXT_TARGET]


@pytest.fixture(scope="module")
def converter(tiny_tokenizer_path):
    return Converter(EncodeSettings(tiny_tokenizer_path, "tiny", 512))


def run(converter, name, paths, options=SftOptions()):
    rows, skipped = [], Counter()
    for item in get_sft_source(name).parse(paths, options):
        result = converter.convert(item, name)
        if isinstance(result, Skip):
            skipped[result.reason] += 1
        else:
            rows.append(result)
    return rows, skipped


def decode(converter, row, modality):
    ids = row["input_ids"][row["modality_ids"] == modality]
    return converter.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def runs(row):
    m = row["modality_ids"]
    starts = np.flatnonzero(np.r_[True, m[1:] != m[:-1]])
    return [int(m[s]) for s in starts]


def one_turn(user_input):
    return f"{SYS}\n{user_input}<|end|>\n<|assistant|>"


def check(converter, row, user_input, answer, layout=ONE_TURN):
    assert decode(converter, row, TEXT_INPUT) == one_turn(user_input) if IMAGE in layout else True
    assert decode(converter, row, TEXT_TARGET) == f"\n{answer}<|endoftext|>"
    assert runs(row) == layout
    assert int((row["modality_ids"] == IMAGE).sum()) == 4 * layout.count(IMAGE)   # tiny: N = 4


def test_vqav2_joins_questions_and_answers_by_id(tmp_path, converter):
    img = tmp_path / "train2014"
    write_image(str(img / "COCO_train2014_000000000042.jpg"), "green")
    qs = [{"image_id": 42, "question": "What color is the circle?", "question_id": 420},
          {"image_id": 42, "question": "How many circles?", "question_id": 421},
          {"image_id": 7, "question": "Is it sunny?", "question_id": 70},       # image file missing
          {"image_id": 42, "question": "Orphan?", "question_id": 999}]         # no annotation
    anns = [{"question_id": q, "image_id": i, "question_type": "what", "answer_type": t,
             "multiple_choice_answer": a, "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k}
                                                       for k in range(1, 11)]}
            for q, i, t, a in [(421, 42, "number", "2"), (420, 42, "other", "green"), (70, 7, "yes/no", "yes")]]
    paths = {"questions": write_json(str(tmp_path / "q.json"), {"data_subtype": "train2014", "questions": qs}),
             "annotations": write_json(str(tmp_path / "a.json"), {"data_subtype": "train2014", "annotations": anns}),
             "images": str(img)}
    rows, skipped = run(converter, "vqav2", paths)
    assert [r["id"] for r in rows] == ["420", "421"]
    check(converter, rows[0], SHORT + "What color is the circle?", "green")
    check(converter, rows[1], SHORT + "How many circles?", "2")
    assert mean_rgb(split_images(rows[0]["images"], rows[0]["image_lengths"])[0])[1] > 200     # the green image
    assert skipped == {"missing_image": 1, "malformed_record": 1}


def test_gqa(tmp_path, converter):
    write_image(str(tmp_path / "images/n161313.jpg"))
    write_image(str(tmp_path / "images/2354786.jpg"))
    qs = {"201": {"imageId": "n161313", "question": "Which room is it?", "answer": "bedroom",
                  "fullAnswer": "It is a bedroom.", "isBalanced": True},
          "202": {"imageId": "2354786", "question": "Is the cup red?", "answer": "no", "fullAnswer": "No."},
          "203": {"imageId": "2354786", "question": "  ", "answer": "no"}}
    rows, skipped = run(converter, "gqa", {"questions": write_json(str(tmp_path / "q.json"), qs),
                                           "images": str(tmp_path / "images")})
    check(converter, rows[0], SHORT + "Which room is it?", "bedroom")
    check(converter, rows[1], SHORT + "Is the cup red?", "no")
    assert skipped == {"empty_text": 1}


def test_vsr_questions_are_built_word_by_word(tmp_path, converter):
    write_image(str(tmp_path / "coco/train2017/000000000001.jpg"))
    write_image(str(tmp_path / "coco/val2017/000000000002.jpg"))
    lines = [("000000000001.jpg", "train2017", "The cat is inside the refrigerator.", 1),
             ("000000000002.jpg", "val2017", "The scissors is alongside the person.", 0),
             ("000000000001.jpg", "train2017", "The suitcase contains the cat.", 1)]
    path = tmp_path / "train.jsonl"
    import json
    path.write_text("".join(json.dumps({"image": i, "image_link": f"http://images.cocodataset.org/{f}/{i}",
                                        "caption": c, "label": lab, "relation": "x", "annotator_id": 1,
                                        "vote_true_validator_id": "[]", "vote_false_validator_id": "[1, 2]"}) + "\n"
                            for i, f, c, lab in lines) + "not json\n")
    rows, skipped = run(converter, "vsr", {"annotations": str(path), "images": str(tmp_path / "coco")})
    check(converter, rows[0], SHORT + "Is the cat inside the refrigerator? Please answer yes or no.", "yes")
    check(converter, rows[1], SHORT + "Is the scissors alongside the person? Please answer yes or no.", "no")
    check(converter, rows[2], SHORT + "Is it true that the suitcase contains the cat? Please answer yes or no.",
          "yes")
    assert skipped == {"malformed_record": 1}


def test_ocrvqa_keeps_train_split_and_url_extension(tmp_path, converter):
    write_image(str(tmp_path / "images/0001234.gif"), fmt="GIF")
    books = {"0001234": {"imageURL": "http://ecx.images-amazon.com/images/I/41Ab.gif",
                         "questions": ["Who wrote this book?", "Is this a comedy book?"], "answers": ["Jane Doe", "No"],
                         "title": "T", "authorName": "Jane Doe", "genre": "Crafts", "split": 1},
             "0005678": {"imageURL": "http://x/y.jpg", "questions": ["Q?"], "answers": ["A"], "split": 2},
             "0009999": {"imageURL": "http://x/z.jpg", "questions": ["Q?", "R?"], "answers": ["A"], "split": 1}}
    rows, skipped = run(converter, "ocrvqa", {"annotations": write_json(str(tmp_path / "dataset.json"), books),
                                              "images": str(tmp_path / "images")})
    assert [r["id"] for r in rows] == ["0001234-0", "0001234-1"]
    check(converter, rows[0], SHORT + "Who wrote this book?", "Jane Doe")
    check(converter, rows[1], SHORT + "Is this a comedy book?", "No")
    assert skipped == {"malformed_record": 1}


def aokvqa_fixture(tmp_path):
    write_image(str(tmp_path / "coco/train2017/000000299207.jpg"))
    records = [{"split": "train", "image_id": 299207, "question_id": "22MexNkBPpdZGX6sxbxVBH",
                "question": "What is the man by the bags awaiting?",
                "choices": ["skateboarder", "train", "delivery", "cab"], "correct_choice_idx": 3,
                "direct_answers": ["cab"] * 10, "difficult_direct_answer": False, "rationales": ["r"] * 3},
               {"split": "train", "image_id": 299207, "question_id": "bad", "question": "Q?",
                "choices": ["a", "b"], "correct_choice_idx": 5}]
    return {"annotations": write_json(str(tmp_path / "aokvqa_v1p0_train.json"), records),
            "images": str(tmp_path / "coco")}, records


def test_aokvqa_lettered_options(tmp_path, converter):
    paths, _ = aokvqa_fixture(tmp_path)
    rows, skipped = run(converter, "aokvqa", paths)
    check(converter, rows[0], CHOICE + "What is the man by the bags awaiting?\nOptions:\n"
          "A. skateboarder\nB. train\nC. delivery\nD. cab\n", "D")
    assert skipped == {"malformed_record": 1}


def test_option_shuffle_keeps_answer_and_never_mutates_the_record(tmp_path, converter):
    paths, _ = aokvqa_fixture(tmp_path)
    source = get_sft_source("aokvqa")
    raw = next(iter(source.records(paths)))[1]
    stored = list(raw["choices"])
    letters = set()
    for seed in range(6):
        options = SftOptions(shuffle_options=True, seed=seed)
        [sample] = source.samples(raw["question_id"], raw, paths, options)
        [again] = source.samples(raw["question_id"], raw, paths, options)
        assert sample == again                                   # same seed → same order
        assert raw["choices"] == stored                          # the record is never shuffled in place
        [(user, letter)] = sample.content.turns
        assert f"\n{letter}. cab\n" in user                      # the letter still names the correct option
        letters.add(letter)
    assert len(letters) > 1                                      # and shuffling does move it


def test_scienceqa_image_and_text_only_problems(tmp_path, converter):
    write_image(str(tmp_path / "images/train/1/image.png"), fmt="PNG")
    problems = {
        "1": {"question": "Which of these states is farthest north?", "choices": ["West Virginia", "Louisiana"],
              "answer": 0, "hint": "", "image": "image.png", "split": "train", "lecture": "", "solution": ""},
        "2": {"question": "Which word is a noun?", "choices": ["run", "cat", "blue", "fast", "up"], "answer": 1,
              "hint": "Pick one.", "image": None, "split": "train"},
        "3": {"question": "Val?", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None, "split": "val"}}
    splits = {"train": ["1", "2"], "val": ["3"], "test": []}
    rows, skipped = run(converter, "scienceqa", {"problems": write_json(str(tmp_path / "problems.json"), problems),
                                                 "splits": write_json(str(tmp_path / "pid_splits.json"), splits),
                                                 "images": str(tmp_path / "images")})
    assert [r["id"] for r in rows] == ["1", "2"]
    check(converter, rows[0], CHOICE + "Which of these states is farthest north?\nContext: N/A\nOptions:\n"
          "A. West Virginia\nB. Louisiana\n", "A")
    text_only = rows[1]
    assert text_only["images"] == b"" and len(text_only["image_lengths"]) == 0
    assert decode(converter, text_only, TEXT_INPUT) == (
        f"{SYS}{CHOICE}Which word is a noun?\nContext: Pick one.\nOptions:\n"
        "A. run\nB. cat\nC. blue\nD. fast\nE. up\n<|end|>\n<|assistant|>")
    assert decode(converter, text_only, TEXT_TARGET) == "\nB<|endoftext|>"
    assert runs(text_only) == [TEXT_INPUT, TEXT_TARGET]
    assert not skipped


def test_refcoco_mdetr_json_boxes(tmp_path, converter):
    write_image(str(tmp_path / "train2014/COCO_train2014_000000519404.jpg"))
    images = [{"file_name": "COCO_train2014_000000519404.jpg", "height": 480, "width": 640, "id": 262407,
               "original_id": 519404, "caption": "woman in black", "dataset_name": "refcocog"},
              {"file_name": "COCO_train2014_000000519404.jpg", "height": 480, "width": 640, "id": 262408,
               "original_id": 519404, "caption": "the chair on the right edge", "dataset_name": "refcocog"}]
    anns = [{"image_id": 262407, "id": 262407, "bbox": [0.0, 45.95, 238.92, 408.64], "category_id": 1},
            {"image_id": 262408, "id": 262408, "bbox": [600.0, 400.0, 60.0, 100.0], "category_id": 1}]
    path = write_json(str(tmp_path / "finetune_refcocog_train.json"), {"images": images, "annotations": anns})
    rows, skipped = run(converter, "refcocog", {"mdetr": path, "images": str(tmp_path / "train2014")})
    check(converter, rows[0], REGION + "<bbox>[0.000, 0.096][0.373, 0.947]</bbox>", "woman in black")
    check(converter, rows[1], REGION + "<bbox>[0.938, 0.833][1.000, 1.000]</bbox>", "the chair on the right edge")
    assert not skipped


def test_refcoco_refs_pickle_and_instances(tmp_path, converter):
    write_image(str(tmp_path / "train2014/COCO_train2014_000000581857.jpg"))
    refs = [{"ref_id": 5, "ann_id": 11, "category_id": 1, "image_id": 581857, "split": "train",
             "file_name": "COCO_train2014_000000581857_11.jpg", "sent_ids": [1, 2],
             "sentences": [{"tokens": ["left", "man"], "raw": "Left man", "sent": "left man", "sent_id": 1},
                           {"tokens": ["guy"], "raw": "guy", "sent": "guy", "sent_id": 2}]},
            {"ref_id": 6, "ann_id": 11, "image_id": 581857, "split": "testA", "sentences": []}]
    instances = {"images": [{"id": 581857, "file_name": "COCO_train2014_000000581857.jpg", "width": 100,
                             "height": 50}],
                 "annotations": [{"id": 11, "image_id": 581857, "category_id": 1, "bbox": [10, 5, 20, 25]}]}
    paths = {"refs": write_plain_pickle(str(tmp_path / "refs(unc).p"), refs),
             "instances": write_json(str(tmp_path / "instances.json"), instances),
             "images": str(tmp_path / "train2014")}
    rows, _ = run(converter, "refcoco", paths)
    assert [r["id"] for r in rows] == ["5-1", "5-2"]
    check(converter, rows[0], REGION + "<bbox>[0.100, 0.100][0.300, 0.600]</bbox>", "left man")


def test_malicious_refs_pickle_is_refused(tmp_path, converter):
    marker = tmp_path / "code_ran"
    paths = {"refs": write_malicious_pickle(str(tmp_path / "refs(unc).p"), str(marker)),
             "instances": write_json(str(tmp_path / "instances.json"), {"images": [], "annotations": []}),
             "images": str(tmp_path)}
    with pytest.raises(UnsafePickleError, match=r"refs\(unc\)\.p.*refusing to load .*system"):
        run(converter, "refcoco+", paths)
    assert not marker.exists()


def test_visual_genome_regions_clamped_and_counted(tmp_path, converter):
    write_image(str(tmp_path / "VG/1.jpg"))
    write_image(str(tmp_path / "VG/2.jpg"))
    image_data = [{"image_id": 1, "url": "u", "width": 800, "height": 600, "coco_id": None, "flickr_id": None},
                  {"id": 2, "url": "u", "width": 100, "height": 100, "coco_id": 5, "flickr_id": None}]
    regions = [{"id": 1, "regions": [
                   {"region_id": 1382, "image_id": 1, "phrase": "the clock is green", "x": 400, "y": 60,
                    "width": 80, "height": 120},
                   {"region_id": 1383, "image_id": 1, "phrase": "sky", "x": 700, "y": 0, "width": 200, "height": 90}]},
               {"id": 2, "regions": [{"id": 7, "image_id": 2, "phrase": "", "x": 0, "y": 0, "width": 5, "height": 5},
                                     {"id": 8, "image_id": 2, "phrase": "dog", "x": 0, "y": 0, "height": 5}]}]
    paths = {"regions": write_json(str(tmp_path / "region_descriptions.json"), regions),
             "image_data": write_json(str(tmp_path / "image_data.json"), image_data), "images": str(tmp_path / "VG")}
    rows, skipped = run(converter, "vg", paths)
    assert [r["id"] for r in rows] == ["1-1382", "1-1383"]
    check(converter, rows[0], REGION + "<bbox>[0.500, 0.100][0.600, 0.300]</bbox>", "the clock is green")
    check(converter, rows[1], REGION + "<bbox>[0.875, 0.000][1.000, 0.150]</bbox>", "sky")
    assert skipped == {"empty_text": 1, "malformed_record": 1}


def llava_fixture(tmp_path):
    write_image(str(tmp_path / "coco/000000033471.jpg"))
    records = [{"id": "000000033471", "image": "000000033471.jpg", "conversations": [
                   {"from": "human", "value": "<image>\nWhat are the colors of the bus?"},
                   {"from": "gpt", "value": "White and red."},
                   {"from": "human", "value": "What is on the back?"},
                   {"from": "gpt", "value": "An advertisement."}]},
               {"id": "2", "image": "000000033471.jpg", "conversations": [
                   {"from": "human", "value": "Describe it.\n<image>"}, {"from": "gpt", "value": "A bus."}]},
               {"id": "3", "image": "000000033471.jpg", "conversations": [{"from": "human", "value": "Hi"}]}]
    return {"annotations": write_json(str(tmp_path / "llava_instruct_150k.json"), records),
            "images": str(tmp_path / "coco")}


def test_llava_one_sample_per_turn(tmp_path, converter):
    rows, skipped = run(converter, "llava150k", llava_fixture(tmp_path))
    assert [r["id"] for r in rows] == ["000000033471-0", "000000033471-1", "2-0"]
    check(converter, rows[0], "What are the colors of the bus?", "White and red.")
    check(converter, rows[1], "What is on the back?", "An advertisement.")
    check(converter, rows[2], "Describe it.", "A bus.")
    assert skipped == {"malformed_record": 1}


def test_llava_whole_conversations(tmp_path, tiny_tokenizer_path):
    """Whole conversations need a multi-turn layout (Phi-3 chat): answers end with <|end|>."""
    converter = Converter(EncodeSettings(tiny_tokenizer_path, "tiny", 512, text_layout="phi3_chat"))
    rows, _ = run(converter, "llava150k", llava_fixture(tmp_path), SftOptions(whole_conversations=True))
    row = rows[0]
    assert runs(row) == [TEXT_INPUT, IMAGE, TEXT_INPUT, TEXT_TARGET, TEXT_INPUT, TEXT_TARGET]
    assert decode(converter, row, TEXT_INPUT) == (
        f"{SYS}\nWhat are the colors of the bus?<|end|>\n<|assistant|>\n"
        "\n<|user|>\nWhat is on the back?<|end|>\n<|assistant|>\n")
    assert decode(converter, row, TEXT_TARGET) == "White and red.<|end|>An advertisement.<|end|>"


def test_over_length_prompt_is_counted_not_fatal(tmp_path, tiny_tokenizer_path):
    write_image(str(tmp_path / "images/a.jpg"))
    qs = {"1": {"imageId": "a", "question": "how many " * 400 + "?", "answer": "2"},
          "2": {"imageId": "a", "question": "Is it red?", "answer": "yes"}}
    conv = Converter(EncodeSettings(tiny_tokenizer_path, "tiny", 512))
    rows, skipped = run(conv, "gqa", {"questions": write_json(str(tmp_path / "q.json"), qs),
                                      "images": str(tmp_path / "images")})
    assert [r["id"] for r in rows] == ["2"] and skipped == {"over_length": 1}


def test_missing_path_key_names_the_file(tmp_path):
    with pytest.raises(ValueError, match="vqav2 needs paths for `annotations`"):
        list(get_sft_source("vqav2").parse({"questions": "q.json", "images": str(tmp_path)}))
    with pytest.raises(FileNotFoundError, match="GQA questions file"):
        list(get_sft_source("gqa").parse({"questions": str(tmp_path / "nope.json"), "images": str(tmp_path)}))
    assert os.path.exists(tmp_path)
