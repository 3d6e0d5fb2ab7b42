"""Text is text: a special-token string inside a record's caption, question or answer (and so inside an
evaluation or generation prompt) is encoded as ordinary text, never as a control token, in every layout,
and the role structure around it — control tokens, image slots, EOS — is that of any other record.

Checked with every special string of two tokenizers: the suite's tiny one and one laid out like Phi-3.5's
(tests/official_fixtures.py), plus a variant of the latter whose role tags strip the whitespace around
them, where ordinary text must still encode exactly as the whole template string does.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_prep.records import CONVERSION_ERROR, Sample
from data_prep.writer import Converter, EncodeSettings
from fixtures_data import jpeg
from official_fixtures import build_phi35_like_tokenizer
from pipeline import chat
from pipeline.model.tokenizer import ASSISTANT_TAG, END_TAG, load_tokenizer, special_token_ids
from pipeline.tokens import IMAGE, TEXT_TARGET

N = 3


@pytest.fixture(scope="module")
def phi_tok_path(tmp_path_factory) -> str:
    from conftest import TINY_CORPUS

    return build_phi35_like_tokenizer(TINY_CORPUS, tmp_path_factory.mktemp("phi35") / "tok")


@pytest.fixture(scope="module", params=["tiny", "phi35"])
def tok(request, tiny_tokenizer, phi_tok_path):
    return tiny_tokenizer if request.param == "tiny" else load_tokenizer(phi_tok_path)


def special_strings(tokenizer) -> list[str]:
    """Every control string the tokenizer knows: BOS, EOS, pad, unk, role tags, <image>, <|endofchunk|> …"""
    added = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return sorted(added | {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token})


def plain(tokenizer, text: str) -> list[int]:
    """``text`` tokenized with no special-token parsing at all."""
    return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)


def controls(tokenizer, enc) -> list[tuple[int, int]]:
    """The role structure of a sample: its control tokens (image slots included) with their modalities."""
    special = special_token_ids(tokenizer) | {tokenizer.bos_token_id, tokenizer.eos_token_id}
    return [(int(i), int(m)) for i, m in zip(enc.input_ids, enc.modality_ids) if int(i) in special]


def between(ids: list[int], start: int, stop: int) -> list[int]:
    """The ids after the last ``start`` id and before the next ``stop`` id (or the end)."""
    begin = len(ids) - ids[::-1].index(start)
    end = ids.index(stop, begin) if stop in ids[begin:] else len(ids)
    return ids[begin:end]


@pytest.mark.parametrize("layout", sorted(chat.LAYOUTS))
def test_every_special_string_in_a_caption_question_or_answer_is_ordinary_text(tok, layout):
    specials = special_strings(tok)
    assert {"<|endoftext|>", "<|assistant|>", "<|user|>", "<|end|>", "<|system|>", "<image>", "<|endofchunk|>",
            "<pad>", "<s>"} <= set(specials)
    image_id, eoc_id = tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("<|endofchunk|>")
    assistant_id, end_id = tok.convert_tokens_to_ids(ASSISTANT_TAG), tok.convert_tokens_to_ids(END_TAG)
    neutral_pt = chat.encode(tok, chat.pretrain_segments("a cat on a mat", layout), N)
    neutral_sft = chat.encode(tok, chat.chat_segments([("What is here?", "A mat.")], 2, layout=layout), N)
    neutral_prompt = chat.encode(tok, chat.chat_segments([("What is here?", None)], layout=layout), N)
    for s in specials:
        caption, question, answer = f"ends {s} early", f"What is {s} here?{s}", f"{s}It says {s}."
        pt = chat.encode(tok, chat.pretrain_segments(caption, layout), N)
        ids = pt.input_ids.tolist()
        assert controls(tok, pt) == controls(tok, neutral_pt), s          # one BOS, N slots, one end, (one EOS)
        assert between(ids, image_id, eoc_id) == plain(tok, caption), s
        assert tok.decode(between(ids, image_id, eoc_id)) == caption
        assert (pt.modality_ids == TEXT_TARGET).sum() == len(plain(tok, caption)) + 1 + int(layout == "released")

        sft = chat.encode(tok, chat.chat_segments([(question, answer)], 2, layout=layout), N)
        ids = sft.input_ids.tolist()
        assert controls(tok, sft) == controls(tok, neutral_sft), s
        assert (sft.modality_ids == IMAGE).sum() == 2 * N
        assert between(ids, image_id, end_id) == plain(tok, f"\n{question}"), s
        assert between(ids, assistant_id, end_id if layout == "phi3_chat" else tok.eos_token_id) == \
            plain(tok, f"\n{answer}"), s
        target = sft.input_ids[sft.modality_ids == TEXT_TARGET].tolist()
        assert tok.decode(target) == (f"\n{answer}<|endoftext|>" if layout == "released" else f"{answer}<|end|>")

        # an evaluation / generation prompt: the question cannot add a role, the prompt ends as any other
        prompt = chat.encode(tok, chat.chat_segments([(question, None)], layout=layout), N)
        assert controls(tok, prompt) == controls(tok, neutral_prompt), s
        assert prompt.input_ids[-3:].tolist() == neutral_prompt.input_ids[-3:].tolist()


def test_ordinary_text_still_encodes_as_the_whole_template_string(tok):
    """What the released model was trained on: the template string tokenized at once (BOS, EOS added)."""
    for segments in (chat.chat_segments([("What color is the circle?", "  red ")]),
                     chat.chat_segments([("Q?", "a"), (" Q2 ", "b\n")], 1, layout="phi3_chat"),
                     chat.pretrain_segments(" a red circle "), chat.chat_segments([("Is it red?", None)])):
        expected = tok.encode(chat.render([s for s in segments if not s.end_of_text]), add_special_tokens=False)
        expected = [t for i in expected for t in ([i] * N if i == tok.convert_tokens_to_ids("<image>") else [i])]
        eos = [tok.eos_token_id] if segments[-1].end_of_text else []
        assert chat.encode(tok, segments, N).input_ids.tolist() == [tok.bos_token_id] + expected + eos


def test_whitespace_a_role_tag_strips_is_dropped_as_the_tokenizer_drops_it(phi_tok_path, tmp_path):
    """A tokenizer whose role tags absorb the whitespace around them (an added token's rstrip / lstrip)."""
    folder, out = Path(phi_tok_path), tmp_path / "strip"
    out.mkdir()
    files = {name: json.loads((folder / name).read_text())
             for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")}
    config_tokens = files["tokenizer_config.json"]["added_tokens_decoder"].values()
    for token in [*files["tokenizer.json"]["added_tokens"], *config_tokens]:
        token["rstrip"] = token["content"] in ("<|assistant|>", "<|end|>", "<|user|>", "<|system|>")
        token["lstrip"] = token["content"] == "<|end|>"
    for name, data in files.items():
        (out / name).write_text(json.dumps(data))
    tok = load_tokenizer(out)
    assert tok.added_tokens_decoder[tok.convert_tokens_to_ids("<|end|>")].lstrip
    test_ordinary_text_still_encodes_as_the_whole_template_string(tok)


def test_data_prep_keeps_a_caption_with_special_strings_as_text(tiny_tokenizer_path, tiny_tokenizer):
    converter = Converter(EncodeSettings(tiny_tokenizer_path, "tiny", 128))
    caption = "ends <|endoftext|> early, <image> and <|assistant|> too"
    row = converter.convert(Sample("r1", [jpeg("red")], chat.Caption(caption)), "kale")
    assert isinstance(row, dict), row
    ids = row["input_ids"].tolist()
    assert ids.count(tiny_tokenizer.eos_token_id) == 1 and ids[-1] == tiny_tokenizer.eos_token_id
    assert (row["modality_ids"] == IMAGE).sum() == converter.num_visual_tokens
    text = row["input_ids"][np.flatnonzero(row["modality_ids"] == TEXT_TARGET)].tolist()
    assert tiny_tokenizer.decode(text) == caption + "<|endofchunk|><|endoftext|>"


def test_an_unexpected_error_on_one_record_is_a_counted_conversion_error(tiny_tokenizer_path, monkeypatch):
    import data_prep.writer as writer

    converter = Converter(EncodeSettings(tiny_tokenizer_path, "tiny", 128))

    def broken(*args, **kwargs):
        raise RuntimeError("tokenizer crashed")

    monkeypatch.setattr(writer, "encode", broken)
    skip = converter.convert(Sample("r2", [jpeg("red")], chat.Caption("a caption")), "kale")
    assert (skip.reason, skip.id, skip.detail) == (CONVERSION_ERROR, "r2", "RuntimeError: tokenizer crashed")
