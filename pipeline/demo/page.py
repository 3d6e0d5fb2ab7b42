"""The Gradio page: a layout over :mod:`pipeline.demo.inputs` and :mod:`pipeline.demo.models`.

One "Ask" runs :func:`check_question` and :func:`check_sampling` once (a refused request raises ``gr.Error``:
a message on the page, and the server goes on serving); when it passes, every model's column answers in its
own event.
Each model has its own queue (``concurrency_id``), one generation at a time, so two models answer side by
side while a second visitor waits; the waiting column shows its place in that queue. The queue as a whole
holds at most ``max_queue`` requests.
"""
from __future__ import annotations

import functools
from typing import Iterator, Sequence

import gradio as gr

from pipeline.demo.inputs import InputError, Limits, Question, Sampling, check_question, check_sampling
from pipeline.demo.models import DemoModel, mask_picture, question_share, share_picture, stream_answer

INTRO = ("Upload one or more images, type a question and press **Ask**. Each model answers in its column "
         "(greedy unless you change the sampling settings), then shows the attention mask of this very prompt "
         "(row = query, column = key; token roles along the axes) and how much of the image tokens' attention "
         "goes to the question in each layer (0 under causal by construction).")


def _share_text(dm: DemoModel, per_layer: list[float] | None) -> str:
    if per_layer is None:
        return "No image in the prompt: no image → question attention to measure."
    values = ", ".join(f"{v:.3f}" for v in per_layer)
    return (f"Image → question attention share per layer ({dm.model.attention_mode}): {values} "
            f"(mean {sum(per_layer) / len(per_layer):.3f})")


def respond(dm: DemoModel, request: tuple[Question, Sampling] | None) -> Iterator[tuple]:
    """One model's column for a checked request: the mask, the streamed answer, then the attention share."""
    if request is None:
        raise gr.Error("no checked question: press Ask again")
    question, sampling = request
    try:
        mask = mask_picture(dm, question)
        yield "", mask, None, ""
        text = ""
        for text in stream_answer(dm, question, sampling):
            yield text, mask, None, ""
        per_layer = question_share(dm, question)
        plot = None if per_layer is None else share_picture(dm, per_layer)
        yield text, mask, plot, _share_text(dm, per_layer)
    except (ValueError, RuntimeError) as err:
        raise gr.Error(f"{dm.label}: {err}") from err


def build_page(models: Sequence[DemoModel], limits: Limits = Limits(), defaults: Sampling = Sampling(),
               max_queue: int = 16) -> gr.Blocks:
    """The page for ``models`` (one column each), queued; launch it with ``.launch()``."""
    def check(files: list[str] | None, text: str, max_new_tokens: float, temperature: float, top_p: float,
              seed: float) -> tuple[Question, Sampling]:
        try:
            return (check_question(text, files, limits),
                    check_sampling(max_new_tokens, temperature, top_p, seed, limits))
        except InputError as err:
            raise gr.Error(str(err)) from None

    with gr.Blocks(title="AKI demo", analytics_enabled=False, delete_cache=(3600, 3600)) as page:
        gr.Markdown("## AKI demo\n" + INTRO)
        with gr.Row():
            files = gr.File(label=f"Images (up to {limits.max_images}, {limits.max_image_mb:g} MiB each)",
                            file_count="multiple", file_types=["image"], elem_id="images")
            with gr.Column():
                question = gr.Textbox(label=f"Question (up to {limits.max_question_chars} characters)", lines=3,
                                      placeholder="What is shown in the image?", elem_id="question")
                with gr.Accordion("Sampling", open=False):
                    max_new_tokens = gr.Slider(1, limits.max_new_tokens, value=defaults.max_new_tokens, step=1,
                                               label="max new tokens")
                    temperature = gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05,
                                            label="temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="top p")
                    seed = gr.Number(value=defaults.seed, precision=0, label="seed")
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
        request = gr.State()
        with gr.Row(equal_height=False):
            columns = []
            for i, dm in enumerate(models):
                with gr.Column():
                    gr.Markdown(f"### {dm.label}\n{dm.describe()}")
                    columns.append((dm, [
                        gr.Textbox(label="Answer", lines=3, interactive=False, elem_id=f"answer-{i}"),
                        gr.Image(label="Attention mask of this prompt", show_label=False, type="pil",
                                 interactive=False, elem_id=f"mask-{i}"),
                        gr.Image(label="Image → question attention share", show_label=False, type="pil",
                                 interactive=False, elem_id=f"share-plot-{i}"),
                        gr.Markdown(elem_id=f"share-{i}"),
                    ]))
        checked = gr.on([ask.click, question.submit], check, [files, question, max_new_tokens, temperature, top_p,
                                                               seed], request, api_name="check", concurrency_limit=None)
        for i, (dm, outputs) in enumerate(columns):
            checked.success(functools.partial(respond, dm), request, outputs, api_name=f"answer_{i}",
                            concurrency_limit=1, concurrency_id=f"model-{i}")
    return page.queue(max_size=max_queue, default_concurrency_limit=1)


__all__ = ["build_page", "respond"]
