"""The task inputs of paper Table 5 and the multiple-choice option format, shared by training data and
inference.

Data prep (``data_prep.sft``) writes training samples with these inputs and evaluation
(``pipeline.eval``) asks its questions with the same ones, so a model is evaluated in the form it was
trained on. The chat wrapper around an input (system message, role tags, ``<image>`` slots) is
:mod:`pipeline.chat`'s; only the per-task *input* text lives here, once.
"""
from __future__ import annotations

from typing import Sequence

# Paper Table 5: the user input of each task (the answer is the assistant turn).
TASK_INPUTS: dict[str, str] = {
    "short_answer": "Answer the question using a single word or phrase. {question}",
    "yes_no": "Answer the question using a single word or phrase. {question} Please answer yes or no.",
    "multiple_choice": ("Answer with the option's letter from the given choices directly. {question}\n"
                        "Options:\n{options}\n"),
    "multiple_choice_context": ("Answer with the option's letter from the given choices directly. {question}\n"
                                "Context: {context}\nOptions:\n{options}\n"),
    "region_description": "Provide a short description for this region. {bbox}",
    "instruction": "{question}",
}
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"   # option letters, in order
OPTION_LINE = "{letter}. {choice}"       # one option of a multiple-choice input


def task_input(task: str, **fields: str) -> str:
    """The user input of ``task`` (a :data:`TASK_INPUTS` key) with its fields filled in."""
    try:
        template = TASK_INPUTS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASK_INPUTS)}") from None
    return template.format(**fields)


def format_options(choices: Sequence[str]) -> str:
    """``A. c1\\nB. c2…``: the options block of a multiple-choice input, in the given order."""
    if not 1 <= len(choices) <= len(LETTERS):
        raise ValueError(f"{len(choices)} choices; expected 1 to {len(LETTERS)}")
    return "\n".join(OPTION_LINE.format(letter=LETTERS[i], choice=c) for i, c in enumerate(choices))


__all__ = ["LETTERS", "OPTION_LINE", "TASK_INPUTS", "format_options", "task_input"]
