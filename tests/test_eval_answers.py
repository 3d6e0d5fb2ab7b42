"""Answer extraction on awkward model outputs: option letters in every common form, option text, yes/no."""
from __future__ import annotations

import pytest

from pipeline.eval.answers import answer_letter, extract_choice, extract_yes_no

CHOICES = ["two", "three", "four", "five"]


@pytest.mark.parametrize("output, expected", [
    ("B", "B"),
    ("b", "B"),
    ("(B)", "B"),
    ("(b)", "B"),
    ("B.", "B"),
    ("B)", "B"),
    ("[C]", "C"),
    ("**D**", "D"),
    ("  C \n", "C"),
    ("B.  ", "B"),
    ("B) three", "B"),
    ("(B) three", "B"),
    ("B. three", "B"),
    ("B: three", "B"),
    ("The answer is B", "B"),
    ("The answer is B.", "B"),
    ("the answer is (c).", "C"),
    ("Answer: D", "D"),
    ("Answer:B", "B"),
    ("ANSWER IS C", "C"),
    ("I choose option d", "D"),
    ("The correct option is B.", "B"),
    ("I think the answer is C, three.", "C"),
    ("three", "B"),
    ("THREE.", "B"),
    ("  Five!  ", "D"),
    ("There are three chairs in the picture.", "B"),
])
def test_extracts_the_intended_option(output, expected):
    assert extract_choice(output, CHOICES) == expected


@pytest.mark.parametrize("output", [
    "",
    "   ",
    "A red circle",                      # article, not option A
    "The answer is a red circle",        # article after "answer is"
    "E",                                 # not one of four options
    "(F)",
    "I am not sure.",
    "two or three",                      # two options mentioned: ambiguous
    "seven",
])
def test_no_recognisable_option_gives_none(output):
    assert extract_choice(output, CHOICES) is None


def test_article_a_is_not_read_as_a_letter_but_a_marked_a_is():
    choices = ["red circle", "blue square"]
    assert extract_choice("A red circle", choices) == "A"     # via the option text, not the article
    assert extract_choice("A blue square", choices) == "B"
    assert extract_choice("A.", choices) == "A"
    assert extract_choice("a", choices) == "A"


def test_option_text_inside_a_longer_option_is_not_ambiguous():
    assert extract_choice("There are 30 of them", ["3", "30", "300"]) == "B"
    assert extract_choice("3", ["3", "30", "300"]) == "A"
    assert extract_choice("left of", ["left", "left of"]) == "B"


def test_letter_wins_over_option_text():
    # Option texts that look like letters: the explicit letter pattern decides first.
    assert extract_choice("B", ["B", "A"]) == "B"
    assert extract_choice("(A)", ["B", "A"]) == "A"


def test_too_few_or_too_many_choices_is_a_clear_error():
    with pytest.raises(ValueError, match="1 to 26 options"):
        extract_choice("A", [])


@pytest.mark.parametrize("answer, letter", [("(A)", "A"), ("(d)", "D"), ("B", "B"), (" (C) ", "C")])
def test_ground_truth_letter(answer, letter):
    assert answer_letter(answer) == letter


def test_ground_truth_that_is_not_a_letter_is_refused():
    with pytest.raises(ValueError, match="not an option letter"):
        answer_letter("(AB)")


@pytest.mark.parametrize("output, expected", [
    ("Yes", "yes"),
    ("yes.", "yes"),
    ("YES", "yes"),
    ("no", "no"),
    ("No, there is not.", "no"),
    ("Yes, there is a dog in the image.", "yes"),
    ("There is no dog.", "no"),
    ("There is not a dog.", "no"),
    ("I don't see a dog.", "no"),
    ("Yes. No other animals are visible.", "yes"),   # first sentence decides
    ("There is a dog.", None),
    ("", None),
    ("nothing", None),
])
def test_yes_no(output, expected):
    assert extract_yes_no(output) == expected
