"""What an evaluation writes: the record of one policy's run on one problem, the names of the
files in an evaluation folder, and readers for its records and traces.

The runner writes these records and the report summarises them; both import them from here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from collab_agent.core.trace import Trace
from collab_agent.errors import ConfigError
from collab_agent.evaluation.datasets import Problem
from collab_agent.evaluation.grading import grade
from collab_agent.policies.trigreason import confident_share

RECORDS_FILE = "records.jsonl"
TRACES_FILE = "traces.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"
PLOT_FILE = "accuracy_vs_small_share.png"

OVERCONFIDENT_TAU = 1.05
OVERCONFIDENT_RHO = 0.85
"""TrigReason's cognitive-offload cut (Sec. 3.3), used to count overconfident small-model steps
in every trace whatever policy wrote it, to compare right and wrong answers."""


@dataclass
class ProblemRecord:
    """One policy's run on one problem (one sample), as written to ``records.jsonl``.

    Attributes:
        policy: the policy's name.
        problem_id: the problem's id.
        sample: the sample index (0 .. samples-1).
        reference: the reference answer.
        answer: the answer the collaboration gave.
        predicted: the answer as the grader read it (``None`` when it found none).
        correct: whether it matches the reference.
        steps_by_author: accepted reasoning steps per model.
        tokens_by_author: accepted reasoning tokens per model.
        small_token_share: share of reasoning tokens the small model wrote.
        small_step_share: share of reasoning steps the small model wrote.
        triggers: how often each trigger fired.
        firings: each firing (``step_index``, ``trigger``, ``action``, ``detail``).
        last_trigger: the last trigger that fired before the answer (``None`` if none did).
        usage: per model: calls, prompt / cached / completion tokens, seconds, cost.
        answer_author: who wrote the answer.
        stop_reason: why the reasoning ended.
        small_steps: accepted small-model steps with logprobs.
        overconfident_small_steps: of those, how many TrigReason's cognitive offload would call
            overconfident (tau 1.05, rho 0.85).
        latency_s: wall time of the whole collaboration.
        cost: price of all calls.
        judge_scores: scores a judge trigger (SpecReason's) gave this run's small-model steps,
            in step order (``None`` where it wrote no digit).
        error: the error that stopped the run (the record then counts as not done).
    """

    policy: str
    problem_id: str
    sample: int
    reference: str
    answer: str = ""
    predicted: str | None = None
    correct: bool = False
    steps_by_author: dict[str, int] = field(default_factory=dict)
    tokens_by_author: dict[str, int] = field(default_factory=dict)
    small_token_share: float = 0.0
    small_step_share: float = 0.0
    triggers: dict[str, int] = field(default_factory=dict)
    firings: list[dict[str, Any]] = field(default_factory=list)
    last_trigger: str | None = None
    usage: dict[str, dict[str, float]] = field(default_factory=dict)
    answer_author: str | None = None
    stop_reason: str | None = None
    small_steps: int = 0
    overconfident_small_steps: int = 0
    latency_s: float = 0.0
    cost: float = 0.0
    judge_scores: list[float | None] = field(default_factory=list)
    error: str | None = None

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.policy, self.problem_id, self.sample)

    @classmethod
    def from_trace(cls, policy: str, problem: Problem, sample: int, trace: Trace) -> ProblemRecord:
        graded_text = trace.answer or (trace.steps[-1].text if trace.steps else "")
        verdict = grade(graded_text, problem.answer)
        summary = trace.summary()
        small = [s for s in trace.steps if s.author == "small" and s.logprobs]
        return cls(
            policy=policy,
            problem_id=problem.id,
            sample=sample,
            reference=problem.answer,
            answer=trace.answer,
            predicted=verdict.predicted,
            correct=verdict.correct,
            steps_by_author=summary["steps_by_author"],
            tokens_by_author=summary["tokens_by_author"],
            small_token_share=trace.small_token_share,
            small_step_share=trace.small_step_share,
            triggers=trace.trigger_counts,
            firings=[asdict(f) for f in trace.firings],
            last_trigger=trace.firings[-1].trigger if trace.firings else None,
            usage={role: asdict(u) for role, u in trace.usage.items()},
            answer_author=trace.answer_author,
            stop_reason=trace.stop_reason,
            small_steps=len(small),
            overconfident_small_steps=sum(
                confident_share(s.logprobs or [], OVERCONFIDENT_TAU) > OVERCONFIDENT_RHO
                for s in small
            ),
            latency_s=trace.seconds,
            cost=trace.cost,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProblemRecord:
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})


# ---------------------------------------------------------------------------- resume files
def json_lines(path: Path) -> Iterator[Any]:
    """The JSON values of the JSON Lines file ``path`` in order (none when it is absent); blank
    lines and a last line cut short by an interruption are skipped."""
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short when the run was killed


def append_json_line(path: Path, data: Mapping[str, Any]) -> None:
    """Add ``data`` to the JSON Lines file ``path`` as one line, flushed at once."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(data) + "\n")
        f.flush()


def check_settings(out: Path, config: Mapping[str, Any], argument: str, remedy: str) -> None:
    """Refuse to resume in ``out`` when its ``config.json`` holds another value for any key of
    ``config`` (a `ConfigError` naming ``argument``, the keys and ``remedy``)."""
    path = out / CONFIG_FILE
    if not path.exists():
        return
    previous = json.loads(path.read_text(encoding="utf-8"))
    changed = sorted(k for k in config if k in previous and previous[k] != config[k])
    if changed:
        details = "; ".join(f"{k}: {previous[k]!r} -> {config[k]!r}" for k in changed)
        raise ConfigError(
            argument, f"{out} holds results of another configuration ({details}); {remedy}"
        )


def read_records(out: str | os.PathLike[str]) -> list[ProblemRecord]:
    """The records in ``OUT/records.jsonl``; a last line cut short by an interruption is
    ignored."""
    records = []
    for data in json_lines(Path(out) / RECORDS_FILE):
        try:
            records.append(ProblemRecord.from_dict(data))
        except TypeError:
            continue  # a line cut short when the run was killed
    return records


def read_traces(out: str | os.PathLike[str]) -> dict[tuple[str, str, int], Trace]:
    """The traces in ``OUT/traces.jsonl`` by ``(policy, problem_id, sample)``; a last line cut
    short by an interruption is ignored."""
    traces: dict[tuple[str, str, int], Trace] = {}
    for data in json_lines(Path(out) / TRACES_FILE):
        try:
            key = (str(data["policy"]), str(data["problem_id"]), int(data.get("sample", 0)))
            traces[key] = Trace.from_dict(data["trace"])
        except (KeyError, TypeError):
            continue  # a line cut short when the run was killed
    return traces


__all__ = [
    "CONFIG_FILE",
    "OVERCONFIDENT_RHO",
    "OVERCONFIDENT_TAU",
    "PLOT_FILE",
    "RECORDS_FILE",
    "SUMMARY_FILE",
    "TRACES_FILE",
    "ProblemRecord",
    "append_json_line",
    "check_settings",
    "json_lines",
    "read_records",
    "read_traces",
]
