"""TrigReason's three triggers (Zhao, Peng, Nguyen et al., 2026) and the policy that joins them.

- `StrategicPriming` (Sec. 3.2): the large model writes the first ``steps`` steps.
- `CognitiveOffload` (Sec. 3.3): a small-model step in which more than a share ``rho`` of tokens
  has perplexity ``1/p < tau`` is overconfident; it is rejected and the large model rewrites it.
- `InterventionRequest` (Sec. 3.4): hesitation words in ``consecutive`` small-model steps in a row
  (or a step repeated verbatim) hand the next ``steps`` steps to the large model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from collab_agent import _checks, defaults
from collab_agent.core.formats import normalise_step
from collab_agent.core.trace import Step, Trace
from collab_agent.errors import ConfigError
from collab_agent.policies.base import BaseTrigger, Handoff, Policy, Reject
from collab_agent.types import Role

HESITATION_WORDS: tuple[str, ...] = (
    "wait",
    "hmm",
    "alternatively",
    "hold on",
    "let me re-check",
    "let me recheck",
    "let me double-check",
    "let me double check",
    "let me reconsider",
    "let me verify",
    "on second thought",
    "i made a mistake",
    "that doesn't seem right",
    "that's not right",
)
"""Default hesitation lexicon of `InterventionRequest` (matched case-insensitively on word
boundaries; "but wait" is covered by "wait")."""


@dataclass
class StrategicPriming(BaseTrigger):
    """Strategic priming (TrigReason Sec. 3.2): the large model writes the opening steps,
    which set the direction of the whole solution.

    Attributes:
        steps: how many opening steps the large model writes (default
            `defaults.PRIMING_STEPS`, 1; paper: 20). 0 disables priming.
    """

    steps: int = defaults.PRIMING_STEPS
    name: str = "strategic_priming"

    def __post_init__(self) -> None:
        _checks.non_negative_int("steps", self.steps)

    async def before_step(self, trace: Trace) -> Handoff | None:
        written = len(trace.steps)
        if written < self.steps:
            return Handoff(
                self.name, steps=self.steps - written, detail=f"opening step {written + 1}"
            )
        return None


def confident_share(logprobs: Sequence[float], tau: float) -> float:
    """Share of tokens whose perplexity ``1/p`` is below ``tau`` (i.e. ``p > 1/tau``)."""
    if not logprobs:
        return 0.0
    cut = -math.log(tau)  # 1/p < tau  <=>  log p > -log tau
    return sum(lp > cut for lp in logprobs) / len(logprobs)


@dataclass
class CognitiveOffload(BaseTrigger):
    """Cognitive offload (TrigReason Sec. 3.3): reject an overconfident small-model step.

    A step is overconfident when the share of its tokens with perplexity ``1/p < tau`` exceeds
    ``rho``; the paper finds most erroneous SRM steps are. Needs the SRM's chosen-token logprobs;
    a step without them never fires.

    Attributes:
        tau: perplexity cut, >= 1 (paper: 1.05, i.e. p > ~0.952).
        rho: share of confident tokens above which the step is rejected, in (0, 1] (paper: 0.85
            for R1-Distill-1.5B, 0.75 for Qwen3-0.6B). ``rho=1`` disables the trigger.
        min_tokens: steps shorter than this are never rejected.
    """

    tau: float = 1.05
    rho: float = 0.85
    min_tokens: int = 1
    name: str = "cognitive_offload"

    def __post_init__(self) -> None:
        if (
            isinstance(self.tau, bool)
            or not isinstance(self.tau, (int, float))
            or not self.tau >= 1.0
        ):
            raise ConfigError("tau", f"is a perplexity cut and must be >= 1, got {self.tau!r}")
        _checks.in_range("rho", self.rho, 0.0, 1.0, low_open=True)
        _checks.positive_int("min_tokens", self.min_tokens)

    async def after_step(self, trace: Trace, step: Step) -> Reject | None:
        if not step.logprobs or len(step.logprobs) < self.min_tokens:
            return None
        share = confident_share(step.logprobs, self.tau)
        if share > self.rho:
            return Reject(
                self.name, detail=f"{share:.0%} of tokens with 1/p < {self.tau} > rho={self.rho}"
            )
        return None


@dataclass
class InterventionRequest(BaseTrigger):
    """Intervention request (TrigReason Sec. 3.4): when the small model hesitates in
    ``consecutive`` steps in a row, or repeats an earlier step verbatim (a loop), the large model
    writes the next ``steps`` steps.

    Attributes:
        words: hesitation lexicon, matched case-insensitively on word boundaries.
        consecutive: how many small-model steps in a row must hesitate (k).
        steps: how many steps the large model then writes (m, paper default 1).
        detect_loops: also fire when the last small-model step repeats an earlier step.
        min_loop_chars: steps shorter than this (after normalising) never count as a loop.
    """

    words: Sequence[str] = HESITATION_WORDS
    consecutive: int = 1
    steps: int = 1
    detect_loops: bool = True
    min_loop_chars: int = 8
    name: str = "intervention_request"
    _pattern: re.Pattern[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _checks.positive_int("consecutive", self.consecutive)
        _checks.positive_int("steps", self.steps)
        if isinstance(self.words, str) or not all(
            isinstance(w, str) and w.strip() for w in self.words
        ):
            raise ConfigError("words", "must be a sequence of non-empty strings")
        self.words = tuple(self.words)
        if self.words:
            alternatives = "|".join(re.escape(w.strip()) for w in self.words)
            self._pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)
        else:
            self._pattern = re.compile(r"(?!x)x")

    def hesitates(self, text: str) -> bool:
        return bool(self._pattern.search(text))

    async def before_step(self, trace: Trace) -> Handoff | None:
        if not trace.steps or trace.steps[-1].author != "small":
            return None
        recent = trace.steps[-self.consecutive :]
        if len(recent) == self.consecutive and all(
            s.author == "small" and self.hesitates(s.text) for s in recent
        ):
            return Handoff(
                self.name, steps=self.steps, detail=f"hesitation in {self.consecutive} step(s)"
            )
        if self.detect_loops:
            last = normalise_step(trace.steps[-1].text)
            if len(last) >= self.min_loop_chars and any(
                normalise_step(s.text) == last for s in trace.steps[:-1]
            ):
                return Handoff(self.name, steps=self.steps, detail="step repeated verbatim")
        return None


class TrigReason(Policy):
    """TrigReason: strategic priming, then cognitive offload and intervention request, the
    small model writing every other step. The paper's thresholds (tau 1.05, rho 0.85); priming
    from `collab_agent.defaults` (1 step for short-step instruct models; the paper primes 20)."""

    def __init__(
        self,
        *,
        priming_steps: int = defaults.PRIMING_STEPS,
        tau: float = 1.05,
        rho: float = 0.85,
        words: Sequence[str] = HESITATION_WORDS,
        consecutive: int = 1,
        intervention_steps: int = 1,
        detect_loops: bool = True,
        answer_by: Role | None = None,
        name: str = "trigreason",
    ) -> None:
        intervention = InterventionRequest(
            words=words,
            consecutive=consecutive,
            steps=intervention_steps,
            detect_loops=detect_loops,
        )
        triggers = (
            StrategicPriming(steps=priming_steps),
            intervention,
            CognitiveOffload(tau=tau, rho=rho),
        )
        super().__init__(triggers, name=name, answer_by=answer_by)
