"""Every SFT parser, on a few records in its released layout, through the real writer and back.

Each test builds the source with :func:`data_prep.sft.build.build_source` (parser → converter → MDS
writer → manifest), reads the folder back with the training loader (``AKIStreamingDataset``), collates
it padded and packed, and compares every sample with ids tokenized from a hand-written literal of the
chat layout (:func:`chat_text`) and modality ids given by role.
"""
from __future__ import annotations

import gc
import json

import pytest
from streaming import Stream

from data_prep.safe_pickle import UnsafePickleError
from data_prep.sft import SftOptions, get_sft_source
from data_prep.sft.build import build_source
from data_prep.writer import EncodeSettings
from pipeline.chat import SYSTEM_MESSAGE
from pipeline.data.collate import Collator
from pipeline.data.dataset import AKIStreamingDataset
from pipeline.model.images import ImageProcessor
from pipeline.model.sizes import get_model_size
from pipeline.model.tokenizer import image_token_id
from pipeline.tokens import IMAGE, TEXT_INPUT, TEXT_TARGET
from fixtures_data import write_image, write_json, write_malicious_pickle, write_plain_pickle

TINY = get_model_size("tiny")
SHORT = "Answer the question using a single word or phrase. "
CHOICE = "Answer with the option's letter from the given choices directly. "
REGION = "Provide a short description for this region. "


def chat_text(user_input: str, answer: str, images: int = 1) -> list[tuple[int, str]]:
    """The text of a one-turn SFT sample in the released layout, written out by hand, as ``(role, text)``
    pieces; ``<image>`` marks an image's N slots. This literal is the one place the tests spell the layout:
    BOS + text + EOS, the answer starts with the ``\n`` after ``<|assistant|>`` and ends with EOS."""
    return [(TEXT_INPUT, f"<s><|system|>\n{SYSTEM_MESSAGE}<|end|>\n<|user|>\n{'<image>' * images}"
                         f"{chr(10) if images else ''}{user_input}<|end|>\n<|assistant|>"),
            (TEXT_TARGET, f"\n{answer}<|endoftext|>")]


def expected_tokens(tokenizer, pieces: list[tuple[int, str]]) -> tuple[list[int], list[int]]:
    """Tokenize the literal pieces: ``(input_ids, modality_ids)`` with each ``<image>`` as N IMAGE slots."""
    ids, mods = [], []
    for role, text in pieces:
        for k, part in enumerate(text.split("<image>")):
            if k:
                ids += [image_token_id(tokenizer)] * TINY.num_visual_tokens
                mods += [IMAGE] * TINY.num_visual_tokens
            part_ids = tokenizer.encode(part, add_special_tokens=False) if part else []
            ids += part_ids
            mods += [role] * len(part_ids)
    return ids, mods


@pytest.fixture(scope="module")
def env(tiny_tokenizer_path, tiny_tokenizer):
    """``build(tmp_path, name, paths, options)`` → ``(samples read back, manifest)``, and the tokenizer."""
    def build(tmp_path, name, paths, options=SftOptions(), text_layout="released"):
        settings = EncodeSettings(tiny_tokenizer_path, "tiny", 512, text_layout=text_layout)
        manifest = build_source(name, paths, str(tmp_path / "out"), settings, options)
        return read_back(str(tmp_path / "out" / name), tiny_tokenizer.pad_token_id), manifest

    build.tokenizer = tiny_tokenizer
    return build


def read_back(folder: str, pad_id: int) -> list[dict]:
    """Every sample of ``folder`` through the training loader, in written order; also checks that the
    padded and the packed collation of all of them carry each sample's tokens and images."""
    ds = AKIStreamingDataset(image_processor=ImageProcessor(TINY.image_size), image_size=TINY.image_size,
                             num_visual_tokens=TINY.num_visual_tokens, streams=[Stream(local=folder)],
                             batch_size=1, shuffle=False)
    samples = [ds[i] for i in range(ds.num_samples)]
    del ds
    gc.collect()
    for mode in ("pad", "pack") if samples else ():
        batch = Collator(mode, pad_id, max_length=512, pack_tokens=512, pad_to_multiple_of=1,
                         image_size=TINY.image_size)(samples)
        assert batch["pixel_values"].shape[0] == sum(len(s["pixel_values"]) for s in samples)
        kept = batch["input_ids"][batch["modality_ids"] != 0]
        assert sorted(kept.tolist()) == sorted(t for s in samples for t in s["input_ids"].tolist())
        assert batch["skipped"] == {} and batch["num_target_tokens"] == sum(
            int((s["modality_ids"] == TEXT_TARGET).sum()) for s in samples)
    return samples


def check(env, sample, user_input, answer, images=1):
    """The sample read back holds exactly the tokens of the hand-written layout, roles as modality ids."""
    ids, mods = expected_tokens(env.tokenizer, chat_text(user_input, answer, images))
    assert sample["input_ids"].tolist() == ids
    assert sample["modality_ids"].tolist() == mods
    assert tuple(sample["pixel_values"].shape) == (images, 3, TINY.image_size, TINY.image_size)


def ids_of(samples):
    return [s["id"] for s in samples]


def test_vqav2_joins_questions_and_answers_by_id(tmp_path, env):
    img = tmp_path / "train2014"
    write_image(str(img / "COCO_train2014_000000000042.jpg"), "green")
    qs = [{"image_id": 42, "question": "What color is the circle?", "question_id": 420},
          {"image_id": 42, "question": "¿Qué color tiene el círculo? 円", "question_id": 421},   # unicode
          {"image_id": 7, "question": "Is it sunny?", "question_id": 70},       # image file missing
          {"image_id": 42, "question": "Orphan?", "question_id": 999}]         # no annotation
    anns = [{"question_id": q, "image_id": i, "question_type": "what", "answer_type": t,
             "multiple_choice_answer": a, "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k}
                                                       for k in range(1, 11)]}
            for q, i, t, a in [(421, 42, "other", "verde"), (420, 42, "other", "green"), (70, 7, "yes/no", "yes")]]
    paths = {"questions": write_json(str(tmp_path / "q.json"), {"data_subtype": "train2014", "questions": qs}),
             "annotations": write_json(str(tmp_path / "a.json"), {"data_subtype": "train2014", "annotations": anns}),
             "images": str(img)}
    samples, manifest = env(tmp_path, "vqav2", paths)
    assert ids_of(samples) == ["420", "421"]
    check(env, samples[0], SHORT + "What color is the circle?", "green")
    check(env, samples[1], SHORT + "¿Qué color tiene el círculo? 円", "verde")
    r, g, b = samples[0]["pixel_values"][0].mean(dim=(1, 2)).tolist()
    assert g > 0.5 and r < -0.5 and b < -0.5                                 # the green image
    assert manifest.samples == 2 and manifest.skipped == {"missing_image": 1, "malformed_record": 1}
    assert manifest.extra["skipped_examples"]["missing_image"][0].startswith("70: ")


def test_gqa_corrupt_image_and_unconvertible_or_unwritable_records_are_skipped(tmp_path, env):
    write_image(str(tmp_path / "images/n161313.jpg"))
    write_image(str(tmp_path / "images/2354786.jpg"))
    (tmp_path / "images/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    qs = {"201": {"imageId": "n161313", "question": "Which room is it?", "answer": "bedroom",
                  "fullAnswer": "It is a bedroom.", "isBalanced": True},
          "202": {"imageId": "2354786", "question": "Is the cup red?", "answer": "no", "fullAnswer": "No."},
          "203": {"imageId": "2354786", "question": "  ", "answer": "no"},
          "204": {"imageId": "broken", "question": "What is it?", "answer": "cup"},
          "20\ud8005": {"imageId": "2354786", "question": "Is it red?", "answer": "yes"},   # id MDS cannot store
          "206": {"imageId": "2354786", "question": "Is the cup blue?", "answer": "yes"},
          "207": {"imageId": "2354786", "question": "Is <image> a cup?", "answer": "yes"}}   # text, not an image
    path = tmp_path / "q.json"
    path.write_text(json.dumps(qs))                         # json escapes the lone surrogate as \ud800
    samples, manifest = env(tmp_path, "gqa", {"questions": str(path), "images": str(tmp_path / "images")})
    assert ids_of(samples) == ["201", "202", "206", "207"]
    check(env, samples[0], SHORT + "Which room is it?", "bedroom")
    check(env, samples[1], SHORT + "Is the cup red?", "no")
    check(env, samples[2], SHORT + "Is the cup blue?", "yes")
    literal = samples[3]                                     # one image; the question keeps its "<image>" as text
    assert (literal["modality_ids"] == IMAGE).sum() == TINY.num_visual_tokens and len(literal["pixel_values"]) == 1
    assert SHORT + "Is <image> a cup?" in env.tokenizer.decode(literal["input_ids"][literal["modality_ids"] != IMAGE])
    assert manifest.skipped == {"empty_text": 1, "corrupt_image": 1, "write_error": 1}
    assert "UnicodeEncodeError" in manifest.extra["skipped_examples"]["write_error"][0]


def test_vsr_questions_are_built_word_by_word(tmp_path, env):
    write_image(str(tmp_path / "coco/train2017/000000000001.jpg"))
    write_image(str(tmp_path / "coco/val2017/000000000002.jpg"))
    lines = [("000000000001.jpg", "train2017", "The cat is inside the refrigerator.", 1),
             ("000000000002.jpg", "val2017", "The scissors is alongside the person.", 0),
             ("000000000001.jpg", "train2017", "The suitcase contains the cat.", 1)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"image": i, "image_link": f"http://images.cocodataset.org/{f}/{i}",
                                        "caption": c, "label": lab, "relation": "x", "annotator_id": 1,
                                        "vote_true_validator_id": "[]", "vote_false_validator_id": "[1, 2]"}) + "\n"
                            for i, f, c, lab in lines) + "not json\n")
    samples, manifest = env(tmp_path, "vsr", {"annotations": str(path), "images": str(tmp_path / "coco")})
    check(env, samples[0], SHORT + "Is the cat inside the refrigerator? Please answer yes or no.", "yes")
    check(env, samples[1], SHORT + "Is the scissors alongside the person? Please answer yes or no.", "no")
    check(env, samples[2], SHORT + "Is it true that the suitcase contains the cat? Please answer yes or no.", "yes")
    assert manifest.skipped == {"malformed_record": 1}


def test_ocrvqa_keeps_train_split_and_url_extension(tmp_path, env):
    write_image(str(tmp_path / "images/0001234.gif"), fmt="GIF")
    books = {"0001234": {"imageURL": "http://ecx.images-amazon.com/images/I/41Ab.gif",
                         "questions": ["Who wrote this book?", "Is this a comedy book?"], "answers": ["Jane Doe", "No"],
                         "title": "T", "authorName": "Jane Doe", "genre": "Crafts", "split": 1},
             "0005678": {"imageURL": "http://x/y.jpg", "questions": ["Q?"], "answers": ["A"], "split": 2},
             "0009999": {"imageURL": "http://x/z.jpg", "questions": ["Q?", "R?"], "answers": ["A"], "split": 1}}
    samples, manifest = env(tmp_path, "ocrvqa", {"annotations": write_json(str(tmp_path / "dataset.json"), books),
                                                 "images": str(tmp_path / "images")})
    assert ids_of(samples) == ["0001234-0", "0001234-1"]
    check(env, samples[0], SHORT + "Who wrote this book?", "Jane Doe")
    check(env, samples[1], SHORT + "Is this a comedy book?", "No")
    assert manifest.skipped == {"malformed_record": 1}


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


def test_aokvqa_lettered_options(tmp_path, env):
    paths, _ = aokvqa_fixture(tmp_path)
    samples, manifest = env(tmp_path, "aokvqa", paths)
    check(env, samples[0], CHOICE + "What is the man by the bags awaiting?\nOptions:\n"
          "A. skateboarder\nB. train\nC. delivery\nD. cab\n", "D")
    assert manifest.skipped == {"malformed_record": 1}


def test_option_shuffle_keeps_answer_and_never_mutates_the_record(tmp_path):
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


def test_scienceqa_mostly_text_only_builds_completely(tmp_path, env):
    write_image(str(tmp_path / "images/train/1/image.png"), fmt="PNG")
    problems = {
        "1": {"question": "Which of these states is farthest north?", "choices": ["West Virginia", "Louisiana"],
              "answer": 0, "hint": "", "image": "image.png", "split": "train", "lecture": "", "solution": ""},
        "2": {"question": "Which word is a noun?", "choices": ["run", "cat", "blue", "fast", "up"], "answer": 1,
              "hint": "Pick one.", "image": None, "split": "train"},
        "3": {"question": "Val?", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None, "split": "val"},
        "4": {"question": "Which is a mammal?", "choices": ["whale", "shark"], "answer": 0, "hint": "",
              "image": None, "split": "train"},
        "5": {"question": "Which is hotter?", "choices": ["ice", "fire"], "answer": 1, "hint": "Think.",
              "image": None, "split": "train"},
        "6": {"question": "Which is a solid?", "choices": ["rock", "milk"], "answer": 0, "hint": "",
              "image": "image.png", "split": "train"}}                                # image file missing
    splits = {"train": ["1", "2", "4", "5", "6"], "val": ["3"], "test": []}
    samples, manifest = env(tmp_path, "scienceqa", {
        "problems": write_json(str(tmp_path / "problems.json"), problems),
        "splits": write_json(str(tmp_path / "pid_splits.json"), splits), "images": str(tmp_path / "images")})
    assert ids_of(samples) == ["1", "2", "4", "5"]
    assert manifest.samples == 4 and manifest.skipped == {"missing_image": 1}
    check(env, samples[0], CHOICE + "Which of these states is farthest north?\nContext: N/A\nOptions:\n"
          "A. West Virginia\nB. Louisiana\n", "A")
    check(env, samples[1], CHOICE + "Which word is a noun?\nContext: Pick one.\nOptions:\n"
          "A. run\nB. cat\nC. blue\nD. fast\nE. up\n", "B", images=0)
    check(env, samples[2], CHOICE + "Which is a mammal?\nContext: N/A\nOptions:\nA. whale\nB. shark\n", "A", images=0)
    check(env, samples[3], CHOICE + "Which is hotter?\nContext: Think.\nOptions:\nA. ice\nB. fire\n", "B", images=0)


def test_refcoco_mdetr_json_boxes(tmp_path, env):
    write_image(str(tmp_path / "train2014/COCO_train2014_000000519404.jpg"))
    images = [{"file_name": "COCO_train2014_000000519404.jpg", "height": 480, "width": 640, "id": 262407,
               "original_id": 519404, "caption": "woman in black", "dataset_name": "refcocog"},
              {"file_name": "COCO_train2014_000000519404.jpg", "height": 480, "width": 640, "id": 262408,
               "original_id": 519404, "caption": "the chair on the right edge", "dataset_name": "refcocog"}]
    anns = [{"image_id": 262407, "id": 262407, "bbox": [0.0, 45.95, 238.92, 408.64], "category_id": 1},
            {"image_id": 262408, "id": 262408, "bbox": [600.0, 400.0, 60.0, 100.0], "category_id": 1}]
    path = write_json(str(tmp_path / "finetune_refcocog_train.json"), {"images": images, "annotations": anns})
    samples, manifest = env(tmp_path, "refcocog", {"mdetr": path, "images": str(tmp_path / "train2014")})
    check(env, samples[0], REGION + "<bbox>[0.000, 0.096][0.373, 0.947]</bbox>", "woman in black")
    check(env, samples[1], REGION + "<bbox>[0.938, 0.833][1.000, 1.000]</bbox>", "the chair on the right edge")
    assert not manifest.skipped and manifest.extra["counts"] == {"clamped_box": 1}


def test_refcoco_plus_mdetr_json(tmp_path, env):
    write_image(str(tmp_path / "train2014/COCO_train2014_000000000009.jpg"))
    images = [{"file_name": "COCO_train2014_000000000009.jpg", "height": 100, "width": 200, "id": 1,
               "original_id": 9, "caption": "left red bowl", "dataset_name": "refcoco+"},
              {"file_name": "COCO_train2014_000000000009.jpg", "height": 100, "width": 200, "id": 2,
               "original_id": 9, "caption": "  ", "dataset_name": "refcoco+"}]
    anns = [{"image_id": 1, "id": 1, "bbox": [20, 10, 50, 40]}, {"image_id": 2, "id": 2, "bbox": [0, 0, 5, 5]}]
    path = write_json(str(tmp_path / "finetune_refcoco+_train.json"), {"images": images, "annotations": anns})
    samples, manifest = env(tmp_path, "refcoco+", {"mdetr": path, "images": str(tmp_path / "train2014")})
    [sample] = samples
    check(env, sample, REGION + "<bbox>[0.100, 0.100][0.350, 0.500]</bbox>", "left red bowl")
    assert manifest.skipped == {"empty_text": 1}


def test_refcoco_refs_pickle_and_instances(tmp_path, env):
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
    samples, _ = env(tmp_path, "refcoco", paths)
    assert ids_of(samples) == ["5-1", "5-2"]
    check(env, samples[0], REGION + "<bbox>[0.100, 0.100][0.300, 0.600]</bbox>", "left man")
    check(env, samples[1], REGION + "<bbox>[0.100, 0.100][0.300, 0.600]</bbox>", "guy")


def test_malicious_refs_pickle_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    paths = {"refs": write_malicious_pickle(str(tmp_path / "refs(unc).p"), str(marker)),
             "instances": write_json(str(tmp_path / "instances.json"), {"images": [], "annotations": []}),
             "images": str(tmp_path)}
    with pytest.raises(UnsafePickleError, match=r"refs\(unc\)\.p.*refusing to load .*system"):
        list(get_sft_source("refcoco+").parse(paths))
    assert not marker.exists()


def test_visual_genome_released_folders_regions_clamped_and_counted(tmp_path, env):
    write_image(str(tmp_path / "VG/VG_100K/1.jpg"), "blue")           # the two folders as released
    write_image(str(tmp_path / "VG/VG_100K_2/2.jpg"), "green")
    image_data = [{"image_id": 1, "url": "https://cs.stanford.edu/people/rak248/VG_100K/1.jpg", "width": 800,
                   "height": 600, "coco_id": None, "flickr_id": None},
                  {"id": 2, "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/2.jpg", "width": 100,
                   "height": 100, "coco_id": 5, "flickr_id": None},
                  {"image_id": 3, "url": "u", "width": 10, "height": 10, "coco_id": None, "flickr_id": None}]
    regions = [{"id": 1, "regions": [
                   {"region_id": 1382, "image_id": 1, "phrase": "the clock is green", "x": 400, "y": 60,
                    "width": 80, "height": 120},
                   {"region_id": 1383, "image_id": 1, "phrase": "sky", "x": 700, "y": 0, "width": 200, "height": 90}]},
               {"id": 2, "regions": [{"id": 7, "image_id": 2, "phrase": "", "x": 0, "y": 0, "width": 5, "height": 5},
                                     {"id": 8, "image_id": 2, "phrase": "dog", "x": 0, "y": 0, "height": 5},
                                     {"id": 9, "image_id": 2, "phrase": "a dog", "x": 10, "y": 20, "width": 30,
                                      "height": 40}]},
               {"id": 3, "regions": [{"id": 10, "image_id": 3, "phrase": "cat", "x": 0, "y": 0, "width": 5,
                                      "height": 5}]}]                                 # image in neither folder
    paths = {"regions": write_json(str(tmp_path / "region_descriptions.json"), regions),
             "image_data": write_json(str(tmp_path / "image_data.json"), image_data), "images": str(tmp_path / "VG")}
    samples, manifest = env(tmp_path, "vg", paths)
    assert ids_of(samples) == ["1-1382", "1-1383", "2-9"]
    check(env, samples[0], REGION + "<bbox>[0.500, 0.100][0.600, 0.300]</bbox>", "the clock is green")
    check(env, samples[1], REGION + "<bbox>[0.875, 0.000][1.000, 0.150]</bbox>", "sky")
    check(env, samples[2], REGION + "<bbox>[0.100, 0.200][0.400, 0.600]</bbox>", "a dog")
    assert channel_argmax(samples[0]) == 2 and channel_argmax(samples[2]) == 1   # VG_100K's blue, VG_100K_2's green
    assert manifest.skipped == {"empty_text": 1, "malformed_record": 1, "missing_image": 1}
    assert manifest.extra["counts"] == {"clamped_box": 1}


def channel_argmax(sample) -> int:
    return int(sample["pixel_values"][0].mean(dim=(1, 2)).argmax())


def llava_fixture(tmp_path):
    write_image(str(tmp_path / "coco/000000033471.jpg"))
    records = [{"id": "000000033471", "image": "000000033471.jpg", "conversations": [
                   {"from": "human", "value": "<image>\nWhat are the colors of the bus?"},
                   {"from": "gpt", "value": "White and red."},
                   {"from": "human", "value": "What is on the back?"},
                   {"from": "gpt", "value": "An advertisement."}]},
               {"id": "2", "image": "000000033471.jpg", "conversations": [
                   {"from": "human", "value": "Describe it.\n<image>"}, {"from": "gpt", "value": "A bus."}]},
               {"id": "3", "image": "000000033471.jpg", "conversations": [{"from": "human", "value": "Hi"}]},
               {"id": "4", "conversations": [                                              # text-only
                   {"from": "human", "value": "Say hi in French."}, {"from": "gpt", "value": "Salut, ça va ?"}]}]
    return {"annotations": write_json(str(tmp_path / "llava_instruct_150k.json"), records),
            "images": str(tmp_path / "coco")}


def test_llava_one_sample_per_turn(tmp_path, env):
    samples, manifest = env(tmp_path, "llava150k", llava_fixture(tmp_path))
    assert ids_of(samples) == ["000000033471-0", "000000033471-1", "2-0", "4-0"]
    check(env, samples[0], "What are the colors of the bus?", "White and red.")
    check(env, samples[1], "What is on the back?", "An advertisement.")
    check(env, samples[2], "Describe it.", "A bus.")
    check(env, samples[3], "Say hi in French.", "Salut, ça va ?", images=0)
    assert manifest.skipped == {"malformed_record": 1}


def test_llava_whole_conversations(tmp_path, env):
    """Whole conversations need a multi-turn layout: Phi-3 chat, whose answers end with <|end|>."""
    samples, _ = env(tmp_path, "llava150k", llava_fixture(tmp_path), SftOptions(whole_conversations=True),
                     text_layout="phi3_chat")
    pieces = [(TEXT_INPUT, f"<s><|system|>\n{SYSTEM_MESSAGE}<|end|>\n<|user|>\n<image>\n"
                           "What are the colors of the bus?<|end|>\n<|assistant|>\n"),
              (TEXT_TARGET, "White and red.<|end|>"),
              (TEXT_INPUT, "\n<|user|>\nWhat is on the back?<|end|>\n<|assistant|>\n"),
              (TEXT_TARGET, "An advertisement.<|end|>")]
    ids, mods = expected_tokens(env.tokenizer, pieces)
    assert samples[0]["input_ids"].tolist() == ids and samples[0]["modality_ids"].tolist() == mods


def test_over_length_prompt_is_counted_not_fatal(tmp_path, env):
    write_image(str(tmp_path / "images/a.jpg"))
    qs = {"1": {"imageId": "a", "question": "how many " * 400 + "?", "answer": "2"},
          "2": {"imageId": "a", "question": "Is it red?", "answer": "yes"}}
    samples, manifest = env(tmp_path, "gqa", {"questions": write_json(str(tmp_path / "q.json"), qs),
                                              "images": str(tmp_path / "images")})
    assert ids_of(samples) == ["2"] and manifest.skipped == {"over_length": 1}


def test_missing_path_key_or_file_names_the_source_and_file(tmp_path):
    with pytest.raises(ValueError, match="vqav2 needs paths for `annotations`"):
        list(get_sft_source("vqav2").parse({"questions": "q.json", "images": str(tmp_path)}))
    with pytest.raises(FileNotFoundError, match=r"source gqa: `questions` \(train_balanced_questions.json\) "
                                                r"not found at .*nope.json"):
        list(get_sft_source("gqa").parse({"questions": str(tmp_path / "nope.json"), "images": str(tmp_path)}))
