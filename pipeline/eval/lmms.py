"""AKI as an lmms-eval model: ``lmms-eval --model aki --model_args pretrained=EXPORT[,...]``.

Registered through the ``lmms_eval.models`` entry point (:mod:`pipeline.eval.lmms_plugin`). Model
arguments (lmms-eval's ``key=value,...`` string):

* ``pretrained`` — the export folder (``AKIModel.save_pretrained``; converted official checkpoints too);
* ``attention_mode`` — override the folder's mode (default: the one it was trained with);
* ``batch_size`` — prompts per generation batch (given here it wins over the CLI's ``--batch_size``);
* ``max_new_tokens`` — an upper bound on the task's own ``max_new_tokens`` (default: the task's);
* ``device`` — ``cpu`` or ``cuda[:i]`` (default: this rank's GPU when there is one);
* ``attn_implementation`` — the attention kernel (default ``sdpa``; the mode stays the folder's).

``generate_until`` builds each prompt as training does: the task's text as the user turn of a
:class:`pipeline.chat.Chat` in the model's text layout, its images — one, several or none — at the start
of that turn (an ``<image>`` placeholder in the task's text is dropped), and answers in batches with the cached generation of :mod:`pipeline.generate` (prefill with the
model's attention mode, causal decoding). Decoding is greedy unless the task asks for sampling
(``do_sample`` with ``temperature`` > 0); it stops at the tokenizer's stop tokens, at the task's
``until`` strings (the answer is cut before the first one) or after ``max_new_tokens``. Under
``accelerate launch`` / ``torchrun`` every rank loads the model on its own GPU and lmms-eval gives each
rank its shard of the documents.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from accelerate import Accelerator
from loguru import logger
from lmms_eval import utils as lmms_utils
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

from pipeline.chat import Chat
from pipeline.generate import generate
from pipeline.model.tokenizer import IMAGE_TOKEN

DEFAULT_MAX_NEW_TOKENS = 128     # when a task names none


def _int_arg(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"model argument {name}={value!r} is not an integer; pass e.g. {name}=8") from None
    if number < 1:
        raise ValueError(f"model argument {name}={number} must be at least 1")
    return number


def _images(visuals: Sequence[Any] | None, where: str) -> list:
    """The images of one document; anything else (video, audio) is an error naming the task."""
    images = []
    for visual in visuals or []:
        if isinstance(visual, (Image.Image, str, os.PathLike, bytes)):
            images.append(visual)
        else:
            raise ValueError(f"{where}: the AKI model reads images only, got a {type(visual).__name__} "
                             "visual; evaluate it on image tasks")
    return images


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string (empty strings ignored)."""
    cuts = [text.find(stop) for stop in until if stop]
    cuts = [c for c in cuts if c >= 0]
    return text[:min(cuts)] if cuts else text


def sampling_args(gen_kwargs: dict, max_new_tokens_cap: int | None) -> tuple[dict, list[str]]:
    """pipeline.generate keyword arguments and the stop strings for one task's ``generation_kwargs``."""
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    max_new = int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
    if max_new_tokens_cap is not None:
        max_new = min(max_new, max_new_tokens_cap)
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    if not gen_kwargs.get("do_sample", False) or temperature <= 0:
        return {"max_new_tokens": max_new, "temperature": 0.0}, until      # greedy
    top_p = gen_kwargs.get("top_p")
    top_p = 1.0 if top_p in (None, 0) else float(top_p)
    return {"max_new_tokens": max_new, "temperature": temperature, "top_p": top_p}, until


class AKI(lmms):
    """An exported AKI model answering lmms-eval requests (see the module docstring for the arguments)."""

    is_simple = True

    def __init__(self, pretrained: str, attention_mode: str | None = None, batch_size: int | str = 8,
                 max_new_tokens: int | str | None = None, device: str | None = None,
                 attn_implementation: str = "sdpa", **kwargs: Any) -> None:
        super().__init__()
        ignored = {k: v for k, v in kwargs.items() if v is not None and k != "max_batch_size"}
        if ignored:
            logger.warning(f"aki: ignoring model arguments {sorted(ignored)}")
        from pipeline.model.aki import AKIModel

        self.accelerator = Accelerator()
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        if device is None or (self._world_size > 1 and str(device).startswith("cuda")):
            device = (f"cuda:{self.accelerator.local_process_index}" if torch.cuda.is_available() else "cpu")
        self._device = torch.device(device)
        dtype = torch.bfloat16 if self._device.type == "cuda" else None
        self.model = AKIModel.from_pretrained(pretrained, attn_implementation=attn_implementation,
                                              attention_mode=attention_mode, dtype=dtype).to(self._device)
        if self.model.tokenizer is None:
            raise ValueError(f"export folder {pretrained} holds no tokenizer; export it with "
                             "AKIModel.save_pretrained after set_tokenizer (pipeline.export does)")
        self.batch_size_per_device = _int_arg("batch_size", batch_size)
        self.max_new_tokens = None if max_new_tokens in (None, "") else _int_arg("max_new_tokens",
                                                                                 max_new_tokens)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "AKI":
        """As lmms-eval's, except that an argument in ``--model_args`` wins over the CLI's default
        (lmms-eval always passes ``batch_size``, so ``batch_size=`` in the model arguments would clash)."""
        args = lmms_utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_device

    @property
    def device(self) -> torch.device:
        return self._device

    def _document_images(self, request: Instance) -> list:
        _, _, doc_to_visual, doc_id, task, split = request.args
        return _images(doc_to_visual(self.task_dict[task][split][doc_id]), f"task {task} document {doc_id}")

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers in request order; batches of equal generation settings, longest prompts first."""
        collator = lmms_utils.Collator(requests, lambda r: -len(r.args[0]), group_fn=lambda r: r.args[1],
                                       grouping=True)
        answers: list[str] = []
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="aki generate")
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            batch = list(chunk)
            kwargs, until = sampling_args(dict(batch[0].args[1]), self.max_new_tokens)
            images = [self._document_images(r) for r in batch]
            prompts = [Chat(((r.args[0].replace(IMAGE_TOKEN, "").strip(), None),)) for r in batch]
            texts = generate(self.model, None, prompts, images, **kwargs)
            answers.extend(cut_at_stops(t, until) for t in texts)
            bar.update(len(batch))
        bar.close()
        return collator.get_original(answers)

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("the aki model answers generate_until tasks only (all twelve benchmarks of "
                                  "pipeline.eval.paper are); pick the generation variant of this task")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the aki model answers single-round generate_until tasks only")


__all__ = ["AKI", "cut_at_stops", "sampling_args"]
