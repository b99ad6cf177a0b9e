"""How well a signal predicts a wrong small-only answer: AUROC over steps and over problems."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collab_agent.calibration.recording import StepRecord


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve of ``scores`` for predicting ``labels`` (ties count half);
    ``None`` when one class is empty."""
    positives = [s for s, y in zip(scores, labels, strict=True) if y]
    negatives = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not positives or not negatives:
        return None
    ranked = sorted(scores)
    # average ranks (1-based) with ties
    rank: dict[float, float] = {}
    i = 0
    while i < len(ranked):
        j = i
        while j + 1 < len(ranked) and ranked[j + 1] == ranked[i]:
            j += 1
        rank[ranked[i]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(rank[s] for s in positives)
    n_pos, n_neg = len(positives), len(negatives)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def signal_quality(
    records: Mapping[str, list[StepRecord]], wrong: Mapping[str, bool], name: str
) -> dict[str, Any]:
    """How well a signal predicts a wrong small-only answer: AUROC over steps (each step labelled
    by its problem's outcome) and over problems (the problem's largest step value)."""
    step_scores: list[float] = []
    step_labels: list[bool] = []
    problem_scores: list[float] = []
    problem_labels: list[bool] = []
    for conversation, steps in records.items():
        values = [r.values.get(name) for r in steps]
        measured = [v for v in values if v is not None]
        label = wrong[conversation]
        step_scores += measured
        step_labels += [label] * len(measured)
        if measured:
            problem_scores.append(max(measured))
            problem_labels.append(label)
    mean = {
        outcome: (sum(s for s, y in zip(step_scores, step_labels, strict=True) if y == flag) / n)
        if (n := sum(y == flag for y in step_labels))
        else None
        for outcome, flag in (("wrong", True), ("right", False))
    }
    return {
        "step_auroc": auroc(step_scores, step_labels),
        "problem_auroc": auroc(problem_scores, problem_labels),
        "measured_steps": len(step_scores),
        "mean_in_wrong": mean["wrong"],
        "mean_in_right": mean["right"],
    }


__all__ = ["auroc", "signal_quality"]
