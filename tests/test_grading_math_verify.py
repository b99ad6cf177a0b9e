"""math-verify grades what the project's own rules miss; its verdict never overrides them."""

from __future__ import annotations

import threading

import pytest

from collab_agent.evaluation.grading import grade


@pytest.mark.parametrize(
    ("predicted", "reference"),
    [
        ("\\{2, 1\\}", "\\{1, 2\\}"),  # a set in another order
        ("x \\in [1,2]", "[1,2]"),  # membership written out
        ("(-\\infty, 2]", "x \\le 2"),  # an interval against the inequality it solves
    ],
)
def test_math_verify_accepts_equal_answers_the_rules_miss(predicted: str, reference: str) -> None:
    verdict = grade(predicted, reference, kind="math")
    assert verdict.correct and verdict.method == "math-verify"


@pytest.mark.parametrize(
    ("predicted", "reference"),
    [("\\{1, 3\\}", "\\{1, 2\\}"), ("(-\\infty, 2)", "x \\le 2"), ("x \\in [1,3]", "[1,2]")],
)
def test_math_verify_rejects_different_ones(predicted: str, reference: str) -> None:
    assert not grade(predicted, reference, kind="math").correct


def test_it_grades_in_a_worker_thread_where_no_alarm_signal_can_be_set() -> None:
    verdicts: list[bool] = []
    worker = threading.Thread(
        target=lambda: verdicts.append(grade("\\{2, 1\\}", "\\{1, 2\\}", kind="math").correct)
    )
    worker.start()
    worker.join(timeout=60)
    assert verdicts == [True]
