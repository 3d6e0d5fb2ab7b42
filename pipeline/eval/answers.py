"""Turning a model's free-form output into a benchmark answer: an option letter or yes/no.

Multiple choice (:func:`extract_choice`) tries explicit patterns in a fixed order — the registry
``CHOICE_PATTERNS`` — then falls back to matching the option texts:

1. the whole output is a letter, possibly in parentheses or with punctuation: ``B``, ``(b)``, ``B.``;
2. the output starts with a marked letter: ``B) three``, ``(B) three``, ``B. three``, ``B: three``;
3. a phrase names the letter: ``The answer is B``, ``Answer: (C)``, ``option D``;
4. the output equals one option's text (case, spacing and end punctuation ignored);
5. the output mentions exactly one option's text as a whole phrase.

A letter is accepted only when it names one of the given options, and a bare capital followed by a
space is never read as a letter: ``A red circle`` is an article, not option A. Nothing found → ``None``
(scored as wrong).

Strict (:func:`strict_letter`, CV-Bench's official script): the whole output, trimmed, is the letter
itself — ``B`` or ``(B)``, a final period allowed — and nothing else counts.

Yes/no (:func:`extract_yes_no`, POPE): the first ``yes``/``no`` word of the first sentence decides;
otherwise a negation (``not``, ``no``, ``none``) in it means ``no``; otherwise ``None``.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

from pipeline.templates import LETTERS

# Characters stripped around an answer before matching: whitespace, end punctuation, markdown emphasis,
# quotes.
_TRIM = " \t\r\n.,;:!?*_`'\"“”‘’"


def option_letters(n_choices: int) -> str:
    """The letters of ``n_choices`` options: ``ABCD`` for four."""
    if not 1 <= n_choices <= len(LETTERS):
        raise ValueError(f"a multiple-choice question needs 1 to {len(LETTERS)} options, got {n_choices}")
    return LETTERS[:n_choices]


def _normalise(text: str) -> str:
    """Lower-case, collapse whitespace and strip surrounding punctuation."""
    return re.sub(r"\s+", " ", text).strip(_TRIM).lower()


# Each pattern captures the letter in group "l". Order matters: the first pattern that matches a valid
# letter wins.
CHOICE_PATTERNS: dict[str, re.Pattern[str]] = {
    # "B", "b", "(B)", "B.", "[B]", "**B**"
    "letter_alone": re.compile(r"^[\(\[]?(?P<l>[A-Za-z])[\)\]]?$"),
    # "B) three", "(B) three", "B. three", "B: three", "b) three"
    "letter_marked_first": re.compile(r"^(?:\((?P<l1>[A-Za-z])\)|(?P<l2>[A-Za-z])[\).:])(?:\s|$)"),
    # "The answer is B", "answer: (C)", "Option D", "the correct choice is b." — the letter must be a capital
    # or be marked ("(b)", "b."), so "the answer is a red circle" is not option A.
    "named_letter": re.compile(
        r"\b(?i:answer|option|choice)\s*(?i:is|:|=|would be|should be)?\s*(?i:option\s+)?"
        r"(?:\((?P<l1>[A-Za-z])\)|(?P<l2>[A-Z])(?![A-Za-z0-9])|(?P<l3>[a-z])(?=[\).:,;!?]?$|[\).:]))"),
}


def _letter(match: re.Match[str]) -> str:
    return next(v for k, v in match.groupdict().items() if v is not None).upper()


def _match_letter(text: str, letters: str) -> str | None:
    body = text.strip().strip("*_`'\"“”‘’ ")
    whole = body.rstrip(_TRIM) or body
    for name, pattern in CHOICE_PATTERNS.items():
        target = whole if name == "letter_alone" else body
        search = pattern.match if name != "named_letter" else pattern.search
        m = search(target)
        if m and _letter(m) in letters:
            return _letter(m)
    return None


def _match_option_text(text: str, choices: Sequence[str]) -> str | None:
    norm = _normalise(text)
    options = [_normalise(str(c)) for c in choices]
    exact = [i for i, c in enumerate(options) if c and c == norm]
    if len(exact) == 1:
        return LETTERS[exact[0]]
    # Whole-phrase mentions; an option contained in a longer mentioned option ("3" in "30") does not count.
    found = [i for i, c in enumerate(options)
             if c and re.search(rf"(?<![\w]){re.escape(c)}(?![\w])", norm)]
    found = [i for i in found if not any(j != i and options[i] in options[j] for j in found)]
    return LETTERS[found[0]] if len(found) == 1 else None


CHOICE_EXTRACTORS: dict[str, Callable[[str, Sequence[str], str], str | None]] = {
    "letter": lambda text, choices, letters: _match_letter(text, letters),
    "option_text": lambda text, choices, letters: _match_option_text(text, choices),
}


def extract_choice(output: str, choices: Sequence[str]) -> str | None:
    """The option letter (``"A"``…) that ``output`` picks among ``choices``, or ``None``."""
    letters = option_letters(len(choices))
    if not output or not output.strip():
        return None
    for extractor in CHOICE_EXTRACTORS.values():
        letter = extractor(output, choices, letters)
        if letter is not None:
            return letter
    return None


_STRICT_LETTER = re.compile(r"\(?([A-Z])\)?\.?")


def strict_letter(output: str, choices: Sequence[str]) -> str | None:
    """The letter when ``output`` is exactly an option letter (``B``, ``(B)``, ``B.``), else ``None``."""
    m = _STRICT_LETTER.fullmatch((output or "").strip())
    return m.group(1) if m and m.group(1) in option_letters(len(choices)) else None


def answer_letter(answer: str) -> str:
    """The letter of a CV-Bench ground truth: ``"(B)"`` → ``"B"`` (a bare ``"B"`` is accepted too)."""
    m = re.fullmatch(r"\s*\(?\s*([A-Za-z])\s*\)?\s*", str(answer))
    if not m:
        raise ValueError(f"answer {answer!r} is not an option letter like '(A)'")
    return m.group(1).upper()


_NEGATIONS = {"no", "not", "none", "nope"}


def extract_yes_no(output: str) -> str | None:
    """``"yes"``, ``"no"`` or ``None`` for a yes/no question's answer (POPE)."""
    if not output:
        return None
    first_sentence = re.split(r"(?<=[.!?])\s|\n", output.strip(), maxsplit=1)[0]
    words = re.findall(r"[a-z']+", first_sentence.lower())
    for word in words:
        if word in ("yes", "no"):
            return word
    if any(w in _NEGATIONS or w.endswith("n't") for w in words):
        return "no"
    return None


__all__ = ["CHOICE_PATTERNS", "CHOICE_EXTRACTORS", "answer_letter", "extract_choice", "extract_yes_no",
           "option_letters", "strict_letter"]
