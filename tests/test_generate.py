"""Generation: cached batched decoding equals a teacher-forced forward, stop tokens, sampling, CLI."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.chat import chat_segments, encode
from pipeline.generate import answer, generate, generate_ids, main
from pipeline.tokens import IMAGE, TEXT_TARGET

QUESTIONS = ["What color is the circle?", "How many squares are there? Answer with a single word or phrase.",
             "Is there a red circle on the left and a blue square on the right?"]


def prompts_for(model, num_images=(1, 0, 2)):
    """Chat prompts of different lengths, with 1, 0 and 2 images."""
    prompts = []
    for question, k in zip(QUESTIONS, num_images):
        enc = encode(model.tokenizer, chat_segments([(question, None)], num_images=k), model.num_visual_tokens)
        prompts.append((enc.input_ids, enc.modality_ids))
    gen = torch.Generator().manual_seed(1)
    pixels = torch.rand(sum(num_images), 3, model.image_size, model.image_size, generator=gen) * 2 - 1
    return prompts, pixels


@pytest.mark.parametrize("mode,backend", [("causal", "sdpa"), ("mma", "sdpa"), ("mma_general", "sdpa"),
                                          ("cca", "sdpa"), ("mma", "flex_attention_eager")])
def test_cached_greedy_equals_teacher_forced_argmax(mode, backend, tiny_model_factory):
    model = tiny_model_factory(mode, backend)
    prompts, pixels = prompts_for(model)
    steps = 6 if backend == "sdpa" else 3   # uncompiled FlexAttention is slow on CPU
    outputs = generate_ids(model, prompts, pixels, max_new_tokens=steps, stop_token_ids=[])
    assert [len(o) for o in outputs] == [steps] * 3
    image_start = 0
    for (ids, mods), out in zip(prompts, outputs):
        n_img = int((mods == IMAGE).sum()) // model.num_visual_tokens
        full_ids = torch.tensor(np.concatenate([ids, out]))[None].long()
        full_mods = torch.tensor(np.concatenate([mods, [TEXT_TARGET] * len(out)]))[None].long()
        with torch.no_grad():
            logits = model(full_ids, full_mods, pixels[image_start:image_start + n_img]).logits[0]
        image_start += n_img
        assert logits[len(ids) - 1:-1].argmax(-1).tolist() == out


def test_generation_stops_at_stop_tokens(tiny_model_factory):
    model = tiny_model_factory()
    prompts, pixels = prompts_for(model)
    free = generate_ids(model, prompts, pixels, max_new_tokens=5, stop_token_ids=[])
    stop = free[0][2]
    stopped = generate_ids(model, prompts, pixels, max_new_tokens=5, stop_token_ids=[stop])
    for row_free, row_stopped in zip(free, stopped):
        cut = row_free.index(stop) if stop in row_free else len(row_free)
        assert row_stopped == row_free[:cut]


def test_sampling_is_seeded_and_top_p_zero_is_greedy(tiny_model_factory):
    model = tiny_model_factory()
    prompts, pixels = prompts_for(model)

    def sample(seed, **kw):
        return generate_ids(model, prompts, pixels, max_new_tokens=5, stop_token_ids=[],
                            generator=torch.Generator().manual_seed(seed), **kw)

    assert sample(3, temperature=1.0) == sample(3, temperature=1.0)
    assert sample(3, temperature=5.0) != sample(4, temperature=5.0)
    greedy = generate_ids(model, prompts, pixels, max_new_tokens=5, stop_token_ids=[])
    assert sample(3, temperature=1.0, top_p=1e-6) == greedy
    with pytest.raises(ValueError, match="0 < top_p <= 1"):
        sample(3, temperature=1.0, top_p=0.0)


def jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), color).save(buf, format="JPEG")
    return buf.getvalue()


def test_text_api_and_cli_answer_from_an_export_folder(tiny_model_factory, tmp_path, capsys):
    model = tiny_model_factory("mma")
    model.save_pretrained(tmp_path / "export")
    (tmp_path / "img.jpg").write_bytes(jpeg((255, 0, 0)))
    question = QUESTIONS[0]
    texts = generate(model, model.tokenizer, [chat_segments([(question, None)]), chat_segments([(question, None)],
                     num_images=0)], [[jpeg((255, 0, 0))], []], max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert answer(model, question, [tmp_path / "img.jpg"], max_new_tokens=4) == texts[0]

    main(["--checkpoint", str(tmp_path / "export"), "--image", str(tmp_path / "img.jpg"),
          "--question", question, "--max-new-tokens", "4"])
    assert capsys.readouterr().out == texts[0] + "\n"


def test_bad_prompts_are_clear_errors(tiny_model_factory):
    model = tiny_model_factory()
    prompts, pixels = prompts_for(model)
    with pytest.raises(ValueError, match="pixel_values has 2 images but the batch has 3"):
        generate_ids(model, prompts, pixels[:2])
    ids, mods = prompts[1]
    with pytest.raises(ValueError, match="must not contain PAD"):
        generate_ids(model, [(ids, np.where(np.arange(len(mods)) == 3, 0, mods))])
    with pytest.raises(ValueError, match="prompt 0 has 1 image slots but 0 images"):
        generate(model, None, [chat_segments([("hi", None)])], [[]])
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate_ids(model, prompts, pixels, max_new_tokens=0)
