"""The models behind the demo page: streamed answers and the two pictures of one prompt.

Each export folder becomes a :class:`DemoModel`, loaded as the benchmark commands and
``python -m pipeline.generate`` load it (``sdpa``; bf16 on a GPU, float32 on a CPU). For a checked
:class:`~pipeline.demo.inputs.Question`:

* :func:`stream_answer` yields the answer as it grows: :func:`pipeline.generate.answer` runs in a thread
  and hands each new token to transformers' ``TextIteratorStreamer``; the last text yielded is the string
  ``answer`` returned, so the page shows exactly what the command line prints;
* :func:`mask_picture` draws the prompt's attention mask in the model's mode (:mod:`pipeline.inspect.masks`);
* :func:`question_share` reads, per LLM layer, the share of the image tokens' attention on the question
  from the model's own forward with the ``eager`` backend (:mod:`pipeline.inspect.share`), switched on for
  that one forward; :func:`share_picture` plots it.

The prompt of both pictures is laid out by :func:`pipeline.inspect.samples.question_sample`, the chat
template generation prefills (the system message, the images, the question, the answer's start).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import threading
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from transformers import TextIteratorStreamer

from pipeline.demo.inputs import Question, Sampling
from pipeline.generate import answer
from pipeline.inspect.masks import draw_mask_picture
from pipeline.inspect.roles import Role, token_roles
from pipeline.inspect.samples import Sample, question_sample
from pipeline.inspect.share import image_question_share, plot_shares
from pipeline.model.aki import AKIModel
from pipeline.model.backends import get_backend
from pipeline.model.tokenizer import role_tag_ids

COLLAPSE_ABOVE = 16   # images of more slots are drawn as one cell each (python -m pipeline.inspect masks's default)
_PYPLOT = threading.Lock()   # the pictures are drawn with matplotlib's pyplot, whose state is not thread-safe


@dataclasses.dataclass
class DemoModel:
    """One loaded export, where it came from, and the lock that keeps it to one forward pass at a time (a
    generation left running by a closed page must end before the next one, or the share's backend switch,
    starts)."""

    folder: str
    model: AKIModel
    device: str
    busy: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    @property
    def label(self) -> str:
        return f"{self.model.attention_mode} · {self.model.size.name}"

    def describe(self) -> str:
        """One markdown line: attention mode, size, visual tokens, text layout, device, folder."""
        m = self.model
        return (f"attention **{m.attention_mode}** · size **{m.size.name}** · N = {m.num_visual_tokens} visual "
                f"tokens per image · layout `{m.text_layout}` · {self.device} · `{self.folder}`")


def load_demo_model(folder: str, device: str) -> DemoModel:
    """An export folder loaded for answering (its attention mode comes from the folder)."""
    from pipeline.eval.runner import load_model

    model, _ = load_model(folder, device)
    return DemoModel(os.path.abspath(folder), model, device)


def stream_answer(dm: DemoModel, question: Question, sampling: Sampling = Sampling()) -> Iterator[str]:
    """The answer as it grows, token by token; the last text is :func:`pipeline.generate.answer`'s result."""
    streamer = TextIteratorStreamer(dm.model.tokenizer, skip_special_tokens=True)
    generator = torch.Generator(device=dm.device).manual_seed(int(sampling.seed))
    outcome: dict = {}

    def run() -> None:
        try:
            with dm.busy:
                outcome["answer"] = answer(dm.model, question.text, list(question.images),
                                           max_new_tokens=int(sampling.max_new_tokens),
                                           temperature=float(sampling.temperature), top_p=float(sampling.top_p),
                                           generator=generator, streamer=streamer)
        except BaseException as err:   # raised again in the caller's thread below
            outcome["error"] = err
            streamer.end()

    thread = threading.Thread(target=run, name="demo-generate", daemon=True)
    thread.start()
    text = ""
    for piece in streamer:   # empty while the streamer holds back an unfinished word
        if piece:
            text += piece
            yield text.strip()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    yield outcome["answer"]


def prompt_sample(dm: DemoModel, question: Question) -> tuple[Sample, np.ndarray]:
    """The prompt generation prefills, as an inspection sample, and its token roles."""
    sample = question_sample(dm.model.tokenizer, question.text, question.images, dm.model.num_visual_tokens,
                             dm.model.text_layout)
    return sample, token_roles(sample.input_ids, sample.modality_ids, role_tag_ids(dm.model.tokenizer))


def _read_back(path: str) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return img.copy()


def mask_picture(dm: DemoModel, question: Question) -> Image.Image:
    """The prompt's attention mask in the model's mode, beside its difference from causal."""
    sample, roles = prompt_sample(dm, question)
    n = dm.model.num_visual_tokens
    title = (f"{dm.label}: {len(sample.input_ids)} prompt tokens, {len(sample.images)} image(s) of N={n} slots"
             + (" (one cell each)" if n > COLLAPSE_ABOVE else ""))
    with tempfile.TemporaryDirectory(prefix="aki-demo-") as folder, _PYPLOT:
        path = os.path.join(folder, "mask.png")
        draw_mask_picture(path, sample.modality_ids, roles, dm.model.attention_mode, n, None, n > COLLAPSE_ABOVE,
                          title)
        return _read_back(path)


@contextlib.contextmanager
def attention_backend(model: AKIModel, name: str) -> Iterator[AKIModel]:
    """``model`` running the attention backend ``name`` within the block (the same weights), then its own."""
    own = model.attn_implementation
    model.backend, previous = get_backend(name), model.backend
    model.llm.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.backend = previous
        model.llm.set_attn_implementation(own)


def question_share(dm: DemoModel, question: Question) -> list[float] | None:
    """Per LLM layer, the mean share of the image tokens' attention on the question (None without images)."""
    sample, roles = prompt_sample(dm, question)
    if not (roles == Role.IMAGE).any():
        return None
    with dm.busy, attention_backend(dm.model, "eager") as model:
        share = image_question_share(model, sample, roles)
    return share.mean(dim=1).tolist()


def share_picture(dm: DemoModel, per_layer: list[float]) -> Image.Image:
    """The per-layer share as :func:`pipeline.inspect.share.plot_shares` draws it."""
    with tempfile.TemporaryDirectory(prefix="aki-demo-") as folder, _PYPLOT:
        path = os.path.join(folder, "share.png")
        plot_shares({dm.label: {"per_layer": per_layer, "mean": sum(per_layer) / len(per_layer)}}, path)
        return _read_back(path)


__all__ = ["DemoModel", "Sampling", "attention_backend", "load_demo_model", "mask_picture", "prompt_sample",
           "question_share", "share_picture", "stream_answer"]
