"""Answer grading: numbers as numbers, LaTeX after normalisation, sympy as the last resort."""

from __future__ import annotations

import pytest

from collab_agent.evaluation.grading import (
    extract_answer,
    grade,
    is_correct,
    last_boxed,
    normalize_latex,
    parse_number,
)


@pytest.mark.parametrize(
    ("predicted", "reference"),
    [
        ("18", "18"),
        ("$18", "18"),
        ("$18.00", "18"),
        ("18 dollars", "18"),
        ("1,234", "1234"),
        ("\\boxed{2,125}", "2125"),
        ("Janet makes 9 * 2 = 18 dollars.\n\nFinal answer: $18", "18"),
        ("Final answer: 5 + 13 = 18", "18"),
        ("The answer is 42.", "42"),
        ("Final answer: -3", "-3"),
        ("Final answer: 50%", "50"),
        ("Final answer: 0.5", ".5"),
        ("Final answer: \\frac{7}{2}", "3.5"),
        ("Final answer: 7/2 hours", "3.5"),
        ("final answer: **160** miles", "160"),
        ("She walks 3 km, then 4 km, 7 in total", "7"),
        ("Final answer: $\\boxed{70}$", "70"),
        ("Final answer: 1{,}000", "1000"),
    ],
)
def test_numeric_answers_match_as_numbers(predicted: str, reference: str) -> None:
    assert is_correct(predicted, reference), grade(predicted, reference)


@pytest.mark.parametrize(
    ("predicted", "reference"),
    [
        ("17", "18"),
        ("Final answer: 180", "18"),
        ("1.8", "18"),
        ("", "18"),
        ("I do not know.", "18"),
        ("Final answer: 18.5", "18"),
    ],
)
def test_wrong_numeric_answers_are_wrong(predicted: str, reference: str) -> None:
    assert not is_correct(predicted, reference)


def test_the_answer_line_wins_over_later_numbers() -> None:
    text = "Final answer: 18\n\nCheck: 16 - 3 - 4 = 9 eggs, 9 * 2 = 18, in 2 steps."
    assert grade(text, "18").correct


def test_no_number_in_answer_line_falls_back_to_last_number() -> None:
    text = "So she earns 18 dollars.\nFinal answer: eighteen dollars"
    assert grade(text, "18").correct


@pytest.mark.parametrize(
    ("predicted", "reference"),
    [
        ("\\dfrac{14}{3}", "\\frac{14}{3}"),
        ("\\frac14", "\\frac{1}{4}"),
        ("0.25", "\\frac{1}{4}"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("(3,\\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("90^\\circ", "90"),
        ("90", "90^\\circ"),
        ("\\text{Evelyn}", "\\text{Evelyn}"),
        ("Evelyn", "\\text{Evelyn}"),
        ("x = 5", "5"),
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}"),
        ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}"),
        ("2\\sqrt{2}", "\\sqrt{8}"),
        ("[-2, 7)", "[-2,7)"),
        ("3, 5", "3,5"),
        ("10\\%", "10"),
        ("5\\text{ cm}", "5"),
        ("\\$32", "32"),
        ("x^2+2x+1", "(x+1)^2"),
        ("\\pi/2", "\\frac{\\pi}{2}"),
        ("Final answer: \\frac{3}{4}", "\\frac34"),
    ],
)
def test_math_answers_match_after_normalisation(predicted: str, reference: str) -> None:
    assert grade(predicted, reference, kind="math").correct, grade(
        predicted, reference, kind="math"
    )


@pytest.mark.parametrize(
    ("predicted", "reference"),
    [
        ("\\frac{14}{5}", "\\frac{14}{3}"),
        ("(3, \\pi)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("(-2, 7)", "[-2,7)"),
        ("x^2+1", "(x+1)^2"),
        ("\\text{Bob}", "\\text{Evelyn}"),
        ("3,5,7", "3,5"),
    ],
)
def test_different_math_answers_are_wrong(predicted: str, reference: str) -> None:
    assert not grade(predicted, reference, kind="math").correct


def test_auto_kind_uses_numbers_for_numeric_references() -> None:
    assert grade("Final answer: 1,000", "1000").method == "number"
    assert grade("\\frac{1}{2}", "\\frac{1}{2}").method == "string"


def test_sympy_is_only_the_fallback() -> None:
    assert grade("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}").method == "sympy"


def test_unbalanced_box_is_not_an_answer() -> None:
    assert last_boxed("so \\boxed{\\frac{1}{2}") is None
    assert last_boxed("first \\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"


def test_extract_answer_order() -> None:
    assert extract_answer("Final answer: 12\nmore text 99") == "12"
    assert extract_answer("numbers 3 and 4") == "4"
    assert extract_answer("no digits here") is None
    assert extract_answer("\\frac{\\pi}{2}", fallback="last_line") == "\\frac{\\pi}{2}"


def test_parse_number_edge_cases() -> None:
    assert parse_number("−7") == -7
    assert parse_number("12,345,678") == 12345678
    assert parse_number("x = 4.50 dollars") == 4.5
    assert parse_number("none") is None


def test_normalize_latex_strips_decoration() -> None:
    assert normalize_latex("\\left[ \\dfrac12, 3 \\right]") == "[\\frac{1}{2},3]"
    assert normalize_latex("$5^{\\circ}$.") == "5"


@pytest.mark.parametrize("record", ["math500", "gsm8k"])
def test_every_reference_answer_grades_itself(record: str) -> None:
    """Every reference answer of the bundled data, given as a model's boxed answer, is right."""
    from collab_agent.evaluation.datasets import load_dataset

    try:
        problems = load_dataset(f"{record}_test" if record == "gsm8k" else record)
    except FileNotFoundError:
        pytest.skip("shared data folder not present")
    wrong = [
        p.id
        for p in problems
        if not grade(f"Final answer: \\boxed{{{p.answer}}}", p.answer).correct
    ]
    assert wrong == []


def test_a_fraction_is_not_graded_by_its_denominator() -> None:
    assert not is_correct("\\frac{3}{2}", "2")
    assert is_correct("\\frac{4}{2}", "2")
    assert normalize_latex("\\$1.50") == "1.5"
