"""A local demo page: ask one or more exported models about images, side by side, and see what the image
tokens read.

    python -m pipeline.demo --model runs/sft_mma/export --model runs/sft_causal/export

The page (Gradio, the ``demo`` extra) takes one or more images and a question; each model's answer streams
in beside the others, followed by two pictures for the very prompt typed: its attention mask drawn by
:mod:`pipeline.inspect.masks` (token roles along the axes) and, per LLM layer, the share of the image tokens'
attention that goes to the question, read from the model's own forward (:mod:`pipeline.inspect.share`).
Answers come from :func:`pipeline.generate.answer`, so they equal ``python -m pipeline.generate``'s.

* :mod:`pipeline.demo.inputs` — the limits on a question (images, their size, the question's length) and
  the check that turns an upload into a :class:`~pipeline.demo.inputs.Question` or a clear error;
* :mod:`pipeline.demo.models` — the loaded models: streamed answers, the mask picture, the attention share;
* :mod:`pipeline.demo.page` — the Gradio page itself, a layout over those functions;
* :mod:`pipeline.demo.__main__` — the command line (binds 127.0.0.1, no public link unless ``--share``).
"""
