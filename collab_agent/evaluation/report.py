"""Summaries, tables and plots of evaluation records.

`summarise` turns per-problem records into one object per policy with the figure keys fixed by
DESIGN.md (``accuracy``, ``relative_accuracy``, ``small_token_share``, ``small_step_share``,
``lrm_calls``, ``lrm_input_tokens``, ``lrm_output_tokens``, ``latency_s``, ``cost``) plus
details: counts, totals, trigger firings, and which trigger preceded the wrong answers.
Per-problem figures (``lrm_*``, ``latency_s``, ``cost``) are means over runs; token shares are
pooled over all runs (total small-model tokens / total reasoning tokens).
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from collab_agent.evaluation.sweep import family_of, pareto_frontier

if TYPE_CHECKING:
    from rich.table import Table

    from collab_agent.core.trace import Trace
    from collab_agent.evaluation.records import ProblemRecord

REFERENCE_POLICY = "large-only"


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else 0.0


def summarise(
    records: Iterable[ProblemRecord],
    *,
    policies: Sequence[str] | None = None,
    complete_only: bool = False,
    judge_thresholds: dict[str, float] | None = None,
) -> dict[str, dict[str, Any]]:
    """One summary per policy (in ``policies`` order, else first-seen order).

    Args:
        records: the records to summarise.
        policies: the policies to report, in order (others seen are appended).
        complete_only: keep only the (problem, sample) pairs every policy finished without
            error, so that an interrupted evaluation still compares policies on the same
            problems.
        judge_thresholds: per policy, the threshold of its judge, to report the share of
            judged steps it accepted (default 7, SpecReason's).
    """
    records = list(records)
    if complete_only:
        names = set(policies or ()) | {r.policy for r in records}
        finished: dict[tuple[str, int], set[str]] = {}
        for r in records:
            if r.error is None:
                finished.setdefault((r.problem_id, r.sample), set()).add(r.policy)
        records = [r for r in records if finished.get((r.problem_id, r.sample)) == names]
    by_policy: dict[str, list[ProblemRecord]] = {name: [] for name in policies or ()}
    for record in records:
        by_policy.setdefault(record.policy, []).append(record)
    summary = {
        name: _summarise_policy(rs, (judge_thresholds or {}).get(name, 7.0))
        for name, rs in by_policy.items()
    }
    reference = summary.get(REFERENCE_POLICY)
    for figures in summary.values():
        if reference is not None and reference["accuracy"] > 0:
            figures["relative_accuracy"] = figures["accuracy"] / reference["accuracy"]
            figures["accuracy_vs_large_only_points"] = 100 * (
                figures["accuracy"] - reference["accuracy"]
            )
        else:
            figures["relative_accuracy"] = None
    frontier = set(pareto_frontier(summary)) if summary else set()
    for name, figures in summary.items():
        figures["pareto"] = name in frontier
    return summary


def _summarise_policy(records: Sequence[ProblemRecord], threshold: float) -> dict[str, Any]:
    ok = [r for r in records if r.error is None]
    errors = [r for r in records if r.error is not None]
    small_tokens = sum(r.tokens_by_author.get("small", 0) for r in ok)
    large_tokens = sum(r.tokens_by_author.get("large", 0) for r in ok)
    small_steps = sum(r.steps_by_author.get("small", 0) for r in ok)
    large_steps = sum(r.steps_by_author.get("large", 0) for r in ok)

    def usage(role: str, key: str) -> list[float]:
        return [float(r.usage.get(role, {}).get(key, 0)) for r in ok]

    lrm_prompt = usage("large", "prompt_tokens")
    lrm_cached = usage("large", "cached_tokens")
    per_problem: dict[str, list[bool]] = {}
    for r in ok:
        per_problem.setdefault(r.problem_id, []).append(r.correct)
    triggers: Counter[str] = Counter()
    for r in ok:
        triggers.update(r.triggers)
    wrong = [r for r in ok if not r.correct]
    right = [r for r in ok if r.correct]
    latencies = sorted(r.latency_s for r in ok)
    judged = [s for r in ok for s in r.judge_scores]
    extra: dict[str, Any] = {}
    if judged:
        counts = Counter("none" if s is None else f"{round(s, 1):g}" for s in judged)
        extra = {
            "judge_scores": dict(sorted(counts.items())),
            "judge_accept_rate": sum(s is not None and s >= threshold for s in judged)
            / len(judged),
            "judge_threshold": threshold,
        }
    return {
        "accuracy": _mean([_mean([float(c) for c in cs]) for cs in per_problem.values()]),
        "relative_accuracy": None,
        "small_token_share": small_tokens / (small_tokens + large_tokens)
        if small_tokens + large_tokens
        else 0.0,
        "small_step_share": small_steps / (small_steps + large_steps)
        if small_steps + large_steps
        else 0.0,
        "lrm_calls": _mean(usage("large", "calls")),
        "lrm_input_tokens": _mean([p - c for p, c in zip(lrm_prompt, lrm_cached, strict=True)]),
        "lrm_output_tokens": _mean(usage("large", "completion_tokens")),
        "latency_s": _mean([r.latency_s for r in ok]),
        "cost": _mean([r.cost for r in ok]),
        "problems": len(per_problem),
        "runs": len(ok),
        "correct": sum(r.correct for r in ok),
        "errors": len(errors),
        "srm_calls": _mean(usage("small", "calls")),
        "srm_output_tokens": _mean(usage("small", "completion_tokens")),
        "lrm_prompt_tokens": _mean(lrm_prompt),
        "reasoning_tokens": {"small": small_tokens, "large": large_tokens},
        "reasoning_steps": {"small": small_steps, "large": large_steps},
        "latency_p50_s": latencies[len(latencies) // 2] if latencies else 0.0,
        "latency_p90_s": latencies[min(len(latencies) - 1, int(0.9 * len(latencies)))]
        if latencies
        else 0.0,
        "triggers": dict(triggers),
        "triggers_per_problem": {k: v / len(ok) for k, v in triggers.items()} if ok else {},
        "answer_by_large": _mean([float(r.answer_author == "large") for r in ok]),
        "wrong_answers": {
            "count": len(wrong),
            "last_trigger_before": dict(Counter(r.last_trigger or "none" for r in wrong)),
            "overconfident_small_step_share": _overconfident_share(wrong),
        },
        "right_answers": {
            "count": len(right),
            "last_trigger_before": dict(Counter(r.last_trigger or "none" for r in right)),
            "overconfident_small_step_share": _overconfident_share(right),
        },
    } | extra


def _overconfident_share(records: Sequence[ProblemRecord]) -> float | None:
    steps = sum(r.small_steps for r in records)
    if not steps:
        return None
    return sum(r.overconfident_small_steps for r in records) / steps


def oracle_router(
    records: Iterable[ProblemRecord], small: str = "small-only", large: str = REFERENCE_POLICY
) -> dict[str, Any] | None:
    """The best a router that sends each whole problem to one model could do, knowing the
    outcomes (RouteLLM's oracle; an upper bound, not a method): a problem goes to the small
    model when its answer is right or both are wrong, else to the large. ``None`` unless both
    single-model policies answered some problem (first sample only, errors left out)."""
    runs: dict[tuple[str, str], ProblemRecord] = {
        (r.policy, r.problem_id): r
        for r in records
        if r.sample == 0 and r.error is None and r.policy in (small, large)
    }
    problems = sorted(
        {p for (policy, p) in runs if policy == small}
        & {p for (policy, p) in runs if policy == large}
    )
    if not problems:
        return None
    correct = small_tokens = large_tokens = to_small = 0
    for problem in problems:
        s, g = runs[(small, problem)], runs[(large, problem)]
        if s.correct or not g.correct:
            to_small += 1
            correct += s.correct
            small_tokens += s.tokens_by_author.get("small", 0)
        else:
            correct += 1
            large_tokens += g.tokens_by_author.get("large", 0)
    return {
        "problems": len(problems),
        "accuracy": correct / len(problems),
        "small_token_share": small_tokens / max(1, small_tokens + large_tokens),
        "to_small": to_small / len(problems),
        "both_right": sum(runs[(small, p)].correct and runs[(large, p)].correct for p in problems),
        "only_small_right": sum(
            runs[(small, p)].correct and not runs[(large, p)].correct for p in problems
        ),
        "only_large_right": sum(
            runs[(large, p)].correct and not runs[(small, p)].correct for p in problems
        ),
    }


def least_likely_token_nll(trace: Trace) -> float:
    """The negative log-likelihood of the least likely token the small model wrote in a whole
    solution (the problem-level form of the `small_min_prob` step signal); 0 without
    logprobs."""
    return max(
        (-min(step.logprobs) for step in trace.steps if step.author == "small" and step.logprobs),
        default=0.0,
    )


def cascade_router(
    records: Iterable[ProblemRecord],
    traces: Mapping[tuple[str, str, int], Trace],
    escalate: Sequence[float] = (0.25, 0.5, 0.75),
    small: str = "small-only",
    large: str = REFERENCE_POLICY,
) -> list[dict[str, Any]]:
    """What a cascade (FrugalGPT, RouteLLM's problem-level routing) would have scored on these
    runs: the small model solves every problem; the ``share`` of problems whose solution has
    the least likely token (`least_likely_token_nll`) are solved again by the large model.

    Computed from the small-only and large-only runs (both greedy runs replay exactly), one point
    per entry of ``escalate``. ``small_token_share`` counts every small-model token, the thrown
    away solutions included; ``large_token_ratio`` is the large model's tokens over large-only's.
    The thresholds are chosen on these same problems, so read the points as a description of
    the signal, not as a tuned policy's result. Empty unless both runs and the small run's
    traces exist.
    """
    runs = {
        (r.policy, r.problem_id): r
        for r in records
        if r.sample == 0 and r.error is None and r.policy in (small, large)
    }
    problems = sorted(
        p
        for (policy, p) in runs
        if policy == small and (large, p) in runs and (small, p, 0) in traces
    )
    if not problems:
        return []
    score = {p: least_likely_token_nll(traces[(small, p, 0)]) for p in problems}
    ranked = sorted(problems, key=lambda p: -score[p])
    small_tokens = sum(runs[(small, p)].tokens_by_author.get("small", 0) for p in problems)
    all_large = sum(runs[(large, p)].tokens_by_author.get("large", 0) for p in problems)
    points = []
    for share in escalate:
        count = round(share * len(problems))
        sent = set(ranked[:count])
        large_tokens = sum(runs[(large, p)].tokens_by_author.get("large", 0) for p in sent)
        correct = sum(runs[(large if p in sent else small, p)].correct for p in problems)
        points.append(
            {
                "escalated": count / len(problems),
                "threshold_nll": score[ranked[count - 1]] if count else None,
                "accuracy": correct / len(problems),
                "small_token_share": small_tokens / max(1, small_tokens + large_tokens),
                "large_token_ratio": large_tokens / max(1, all_large),
                "problems": len(problems),
            }
        )
    return points


# ---------------------------------------------------------------------------- presentation
def summarise_folder(
    out: str | Path,
    *,
    complete_only: bool = True,
    plot: bool = True,
    policies: Sequence[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Summarise the records an evaluation (finished or interrupted) left in ``out``, rewrite
    ``summary.json`` and the plot, and return the summary. By default only the problems every
    policy finished count; ``policies`` limits the summary (and that count) to those named."""
    import json

    from collab_agent.evaluation.records import PLOT_FILE, SUMMARY_FILE, read_records

    out = Path(out)
    records = read_records(out)
    if not records:
        from collab_agent.errors import ConfigError

        raise ConfigError("out", f"{out} holds no evaluation records")
    if policies is not None:
        missing = sorted(set(policies) - {r.policy for r in records})
        if missing:
            from collab_agent.errors import ConfigError

            raise ConfigError("policy", f"{out} holds no records of {missing}")
        records = [r for r in records if r.policy in set(policies)]
    latest = {r.key: r for r in records}  # a retried run replaces its failed record
    names = (
        list(policies) if policies is not None else list(dict.fromkeys(r.policy for r in records))
    )
    summary = summarise(latest.values(), policies=names, complete_only=complete_only)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    if plot:
        plot_summary(summary, out / PLOT_FILE)
    return summary


def summary_table(summary: dict[str, dict[str, Any]], title: str = "Evaluation") -> Table:
    """A rich table of the main figures, one row per policy."""
    from rich.table import Table

    table = Table(title=title)
    columns = (
        ("policy", None),
        ("accuracy", "{:.1%}"),
        ("rel. acc.", "{:.2f}"),
        ("small tok share", "{:.1%}"),
        ("small step share", "{:.1%}"),
        ("LRM calls", "{:.1f}"),
        ("LRM in tok", "{:.0f}"),
        ("LRM out tok", "{:.0f}"),
        ("latency s", "{:.1f}"),
        ("runs", "{}"),
        ("errors", "{}"),
    )
    keys = (
        None,
        "accuracy",
        "relative_accuracy",
        "small_token_share",
        "small_step_share",
        "lrm_calls",
        "lrm_input_tokens",
        "lrm_output_tokens",
        "latency_s",
        "runs",
        "errors",
    )
    for name, _ in columns:
        table.add_column(name, justify="left" if name == "policy" else "right")
    for policy, figures in summary.items():
        row = [policy]
        for (_, fmt), key in zip(columns[1:], keys[1:], strict=True):
            value = figures.get(key)  # type: ignore[arg-type]
            row.append("-" if value is None else fmt.format(value))  # type: ignore[union-attr]
        table.add_row(*row)
    return table


def markdown_table(summary: dict[str, dict[str, Any]]) -> str:
    """The main figures as a Markdown table (for notes and READMEs)."""
    lines = [
        "| policy | accuracy | rel. accuracy | small token share | small step share | LRM calls | LRM in tok | LRM out tok | latency s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for policy, f in summary.items():
        rel = "-" if f.get("relative_accuracy") is None else f"{f['relative_accuracy']:.2f}"
        lines.append(
            f"| {policy} | {f['accuracy']:.1%} | {rel} | {f['small_token_share']:.1%} | "
            f"{f['small_step_share']:.1%} | {f['lrm_calls']:.1f} | {f['lrm_input_tokens']:.0f} | "
            f"{f['lrm_output_tokens']:.0f} | {f['latency_s']:.1f} |"
        )
    return "\n".join(lines)


def plot_summary(summary: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path | None:
    """Accuracy against small-model token share: one curve per policy family (a swept policy's
    settings joined in order of share), single policies as points, and the Pareto frontier
    dashed. Returns the path, or ``None`` when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    families: dict[str, list[tuple[float, float, str]]] = {}
    for name, figures in summary.items():
        x, y = 100 * figures["small_token_share"], 100 * figures["accuracy"]
        families.setdefault(family_of(name), []).append((x, y, name))
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    for family, points in families.items():
        points.sort()
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.plot(xs, ys, marker="o", linestyle="-" if len(points) > 1 else "none", label=family)
        if len(points) > 1:
            for x, y, name in points:
                setting = name[len(family) + 1 : -1]
                ax.annotate(setting, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    frontier = pareto_frontier(summary)
    fx = [100 * summary[n]["small_token_share"] for n in frontier]
    fy = [100 * summary[n]["accuracy"] for n in frontier]
    ax.plot(fx, fy, color="black", linestyle="--", linewidth=1, alpha=0.6, label="Pareto frontier")
    ax.set_xlabel("small-model share of reasoning tokens (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_xlim(-5, 105)
    ax.set_ylim(-5, 105)
    ax.grid(True, alpha=0.3)
    # Outside the axes, right of the data: inside, it hid the points in a corner.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    ax.set_title("Accuracy against offload to the small model")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
