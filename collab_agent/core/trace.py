"""What happened in one collaboration: steps, who wrote them and why, usage and cost.

Plain dataclasses that serialise to JSON (`Trace.to_dict` / `Trace.from_dict`).
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from collab_agent.types import Generation, Role

TraceStop = Literal["answer", "eos", "budget", "max_steps", "length"]
"""Why reasoning ended: an answer marker or end of reasoning, the model's end of turn, the
token budget, the step cap, or a step that hit its token limit with no budget left."""


@dataclass
class Usage:
    """Tokens, time and cost one model spent in a collaboration."""

    calls: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    cost: float = 0.0

    def add(self, generation: Generation) -> None:
        self.calls += 1
        self.prompt_tokens += generation.prompt_tokens
        self.cached_tokens += generation.cached_tokens
        self.completion_tokens += generation.completion_tokens
        self.seconds += generation.seconds
        self.cost += generation.cost

    @property
    def input_tokens(self) -> int:
        """Prompt tokens that had to be processed (not served from a cache)."""
        return self.prompt_tokens - self.cached_tokens


@dataclass
class Step:
    """One reasoning step.

    Attributes:
        index: position in the trace, from 0.
        author: ``"small"`` or ``"large"``.
        text: the step's text, without the delimiter.
        tokens: tokens generated for it.
        logprobs: chosen-token logprobs, when the backend gave them.
        trigger: the trigger that made the large model write it (``None`` for default steps).
        rejected_text: the small model's text this step replaced, if it was rejected.
        rejected_tokens: tokens of the rejected text.
        seconds: wall time, rejected attempt included.
        stop_reason: why its generation ended (``"step"`` means it ended at the delimiter).
        degraded: the step was written by the small model because the large one was unreachable.
        degraded_reason: why it was degraded (the large model's error, an open circuit breaker,
            or too little time left), ``None`` when it was not.
    """

    index: int
    author: Role
    text: str
    tokens: int = 0
    logprobs: list[float] | None = None
    trigger: str | None = None
    rejected_text: str | None = None
    rejected_tokens: int = 0
    seconds: float = 0.0
    stop_reason: str = "step"
    degraded: bool = False
    degraded_reason: str | None = None


@dataclass
class Firing:
    """A trigger that fired: before a step (handoff) or after one (reject)."""

    step_index: int
    trigger: str
    action: Literal["handoff", "reject"]
    detail: str = ""


@dataclass
class Trace:
    """The record of one collaboration, from the first step to the answer."""

    conversation_id: str
    policy: str = ""
    splitter: str = ""
    """The step splitter's name (``"blank-line"``, ``"line"``): how the steps were cut."""
    steps: list[Step] = field(default_factory=list)
    answer: str = ""
    answer_author: Role | None = None
    stop_reason: TraceStop | None = None
    firings: list[Firing] = field(default_factory=list)
    usage: dict[str, Usage] = field(default_factory=lambda: {"small": Usage(), "large": Usage()})
    seconds: float = 0.0
    degraded_steps: int = 0
    answer_degraded_reason: str | None = None
    """Why the small model wrote the answer the large one should have (``None``: it did not)."""
    answer_truncated: bool = False

    @property
    def session(self) -> None:
        """Deprecated, always ``None``: the trace is plain data. A trigger hook that calls a
        model declares a ``context`` parameter and gets the `StepContext` from the reasoner."""
        warnings.warn(
            "Trace.session is gone (always None); declare a 'context' parameter on the trigger "
            "hook to get the StepContext",
            DeprecationWarning,
            stacklevel=2,
        )
        return None

    # ----------------------------------------------------------------- derived figures
    def tokens_by(self, author: Role) -> int:
        """Reasoning tokens of accepted steps written by ``author``."""
        return sum(s.tokens for s in self.steps if s.author == author)

    @property
    def reasoning_tokens(self) -> int:
        return sum(s.tokens for s in self.steps)

    @property
    def small_token_share(self) -> float:
        """Share of accepted reasoning tokens the small model wrote (0 when there are none)."""
        total = self.reasoning_tokens
        return self.tokens_by("small") / total if total else 0.0

    @property
    def small_step_share(self) -> float:
        """Share of accepted reasoning steps the small model wrote."""
        if not self.steps:
            return 0.0
        return sum(s.author == "small" for s in self.steps) / len(self.steps)

    @property
    def trigger_counts(self) -> dict[str, int]:
        """How often each trigger fired."""
        return dict(Counter(f.trigger for f in self.firings))

    @property
    def rejected_steps(self) -> int:
        return sum(s.rejected_text is not None for s in self.steps)

    @property
    def cost(self) -> float:
        return sum(u.cost for u in self.usage.values())

    def record(self, role: Role, generation: Generation) -> None:
        """Account one backend call (steps, answers and a policy's own judge calls alike)."""
        self.usage[role].add(generation)

    def summary(self) -> dict[str, Any]:
        """Compact figures for logs and ``response_metadata['collab']``."""
        return {
            "policy": self.policy,
            "splitter": self.splitter,
            "steps": [
                {
                    "index": s.index,
                    "author": s.author,
                    "tokens": s.tokens,
                    "trigger": s.trigger,
                    "rejected": s.rejected_text is not None,
                    "degraded": s.degraded,
                    "degraded_reason": s.degraded_reason,
                }
                for s in self.steps
            ],
            "steps_by_author": {
                role: sum(s.author == role for s in self.steps) for role in ("small", "large")
            },
            "tokens_by_author": {role: self.tokens_by(role) for role in ("small", "large")},
            "small_token_share": self.small_token_share,
            "small_step_share": self.small_step_share,
            "triggers": self.trigger_counts,
            "rejected_steps": self.rejected_steps,
            "degraded_steps": self.degraded_steps,
            "answer_degraded_reason": self.answer_degraded_reason,
            "usage": {role: asdict(u) for role, u in self.usage.items()},
            "answer_author": self.answer_author,
            "stop_reason": self.stop_reason,
            "latency_s": self.seconds,
            "cost": self.cost,
        }

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("steps", "firings"):
                value = [asdict(v) for v in value]
            elif f.name == "usage":
                value = {k: asdict(v) for k, v in value.items()}
            out[f.name] = value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trace:
        data = dict(data)
        data["steps"] = [Step(**s) for s in data.get("steps", [])]
        data["firings"] = [Firing(**f) for f in data.get("firings", [])]
        data["usage"] = {k: Usage(**v) for k, v in data.get("usage", {}).items()}
        return cls(**data)
