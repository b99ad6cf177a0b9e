"""SpecReason (Pan et al., 2025, "SpecReason: Fast and Accurate Inference-Time Compute via
Speculative Reasoning", arXiv:2504.07891): the large model judges every small-model step.

After each step the small model writes, the large model reads the question, the reasoning so far
and the new step, and scores the step 0-9 with a single token (Sec. 3). A step scored below the
threshold (paper: 7) is thrown away and the large model rewrites it from the same prefix. The
score is the greedy token, or the expectation over the digits' probabilities in that token's top
logprobs (``score="expected"``). Judge calls go through the `StepContext` the reasoner passes, so
their tokens, time and cost are counted in the trace like every step.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from collab_agent import _checks
from collab_agent.errors import ConfigError
from collab_agent.policies.base import BaseTrigger, Policy, Reject, StepContext
from collab_agent.types import GREEDY, GenerateRequest, Generation, Role

if TYPE_CHECKING:
    from collab_agent.core.trace import Step, Trace

JUDGE_INSTRUCTION = (
    "Evaluate the last reasoning step solely based on factual correctness and logical validity. "
    "Ignore style, phrasing, or overall usefulness; only judge whether the step is objectively "
    "correct and logically follows from prior steps. Assign a score from 0 to 9."
)
"""SpecReason's judge prompt (its reference implementation), sent as a user turn after the
reasoning."""

JUDGE_LEAD = "I think the quality score is: "
"""The judge's answer is forced to start with this, so its next token is the score."""

ScoreMethod = Literal["greedy", "expected"]


@dataclass
class StepJudge(BaseTrigger):
    """SpecReason's judge (Pan et al. 2025, Sec. 3): the large model scores each small-model step
    0-9 with one token; a step scored below ``threshold`` is rejected and rewritten by the large
    model.

    Attributes:
        threshold: steps scoring below this are rejected (paper: 7), in [0, 9].
        score: ``"greedy"`` reads the digit the judge writes; ``"expected"`` takes the mean digit
            weighted by the probabilities in the judge token's top logprobs (needs a backend
            that returns top logprobs; falls back to greedy otherwise).
        top_logprobs: how many alternatives to ask for when ``score="expected"``.
        instruction: the judge prompt (a user turn after the reasoning).
        lead: the start of the judge's reply, after which it writes the score.
        reject_unscored: whether a step is rejected when the judge writes no digit (SpecReason
            accepts a step only on a valid score at or above the threshold).
        score_counts: how often each score was given, across every conversation this trigger
            served (rounded to one decimal; ``None`` for no digit), for reports.
        scores: the scores given in each conversation, by conversation id, in step order (the
            most recent ``KEEP_CONVERSATIONS`` conversations); `pop_scores` takes them out.
    """

    KEEP_CONVERSATIONS: ClassVar[int] = 4096

    threshold: float = 7.0
    score: ScoreMethod = "greedy"
    top_logprobs: int = 10
    instruction: str = JUDGE_INSTRUCTION
    lead: str = JUDGE_LEAD
    reject_unscored: bool = True
    name: str = "step_judge"
    score_counts: Counter[float | None] = field(default_factory=Counter, repr=False)
    scores: OrderedDict[str, list[float | None]] = field(default_factory=OrderedDict, repr=False)

    def __post_init__(self) -> None:
        _checks.in_range("threshold", self.threshold, 0.0, 9.0)
        if self.score not in ("greedy", "expected"):
            raise ConfigError("score", f"must be 'greedy' or 'expected', got {self.score!r}")
        _checks.positive_int("top_logprobs", self.top_logprobs)

    async def after_step(
        self, trace: Trace, step: Step, context: StepContext | None = None
    ) -> Reject | None:
        if context is None:
            raise ConfigError(
                "context",
                "SpecReason's judge calls the large model through the StepContext a Reasoner "
                "passes its hooks; run it inside a Reasoner",
            )
        generation = await context.generate("large", self.request(context, step))
        value = self.score_of(generation)
        self._note(trace.conversation_id, value)
        if value is None:
            if self.reject_unscored:
                return Reject(self.name, detail=f"no score in {generation.text!r}")
            return None
        if value < self.threshold:
            return Reject(self.name, detail=f"score {value:.2f} < {self.threshold:g}")
        return None

    def _note(self, conversation_id: str, value: float | None) -> None:
        self.score_counts[None if value is None else round(value, 1)] += 1
        self.scores.setdefault(conversation_id, []).append(value)
        self.scores.move_to_end(conversation_id)
        while len(self.scores) > self.KEEP_CONVERSATIONS:
            self.scores.popitem(last=False)

    def pop_scores(self, conversation_id: str) -> list[float | None]:
        """The scores given in one conversation (step order), forgotten afterwards."""
        return self.scores.pop(conversation_id, [])

    def request(self, context: StepContext, step: Step) -> GenerateRequest:
        """The judge's request: the conversation, the reasoning with the new step as an assistant
        turn, the judge instruction, and the reply forced to start with ``lead``."""
        messages: list[dict[str, Any]] = [
            *context.messages,
            {"role": "assistant", "content": context.prefix(then=step)},
            {"role": "user", "content": self.instruction},
        ]
        request = context.request(
            context.format.open + self.lead,
            stop=(),
            max_tokens=1,
            logprobs=True,
            purpose="judge",
            sampling=GREEDY,
            messages=messages,
        )
        if self.score == "expected":
            request = dataclasses.replace(request, top_logprobs=self.top_logprobs)
        return request

    def score_of(self, generation: Generation) -> float | None:
        """The score in a judge generation: the expected digit when asked for and available,
        else the digit written; ``None`` when the judge wrote no digit."""
        if self.score == "expected":
            top = generation.top_logprobs
            if top:
                value = expected_score(top[0])
                if value is not None:
                    return value
        return greedy_score(generation.text)


def greedy_score(text: str) -> float | None:
    """The digit the judge wrote (its first non-space character), or ``None``."""
    stripped = text.strip()
    if stripped and stripped[0].isdigit() and stripped[0].isascii():
        return float(stripped[0])
    return None


def expected_score(top: dict[str, float]) -> float | None:
    """Mean digit weighted by probability over the digit tokens among ``top`` (token -> logprob),
    renormalised over the digits; ``None`` when no digit is among them."""
    mass: dict[int, float] = {}
    for token, logprob in top.items():
        t = token.strip()
        if len(t) == 1 and t.isdigit() and t.isascii():
            mass[int(t)] = mass.get(int(t), 0.0) + math.exp(logprob)
    total = sum(mass.values())
    if total <= 0:
        return None
    return sum(d * p for d, p in mass.items()) / total


class SpecReason(Policy):
    """SpecReason with the paper's defaults: the small model writes every step, the large model
    scores each one 0-9 and rewrites those scored below ``threshold`` (7)."""

    def __init__(
        self,
        threshold: float = 7.0,
        score: ScoreMethod = "greedy",
        *,
        top_logprobs: int = 10,
        reject_unscored: bool = True,
        answer_by: Role | None = None,
        name: str = "specreason",
    ) -> None:
        judge = StepJudge(
            threshold, score, top_logprobs=top_logprobs, reject_unscored=reject_unscored
        )
        super().__init__((judge,), name=name, answer_by=answer_by)
