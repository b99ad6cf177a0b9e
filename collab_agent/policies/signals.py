"""Triggers beyond the TrigReason paper: per-step signals that the small model is going wrong.

TrigReason's cognitive offload (Sec. 3.3) treats an *overconfident* small-model step as a warning
sign; on the bundled Qwen2.5-Coder pair that signal is weak (a step's confident share averages
0.70 in right and wrong solutions alike). Each trigger here measures one number per small-model
step and rejects the step (the large model rewrites it from the same prefix) when the number is
above ``threshold``:

- `LargeSurprise`: how surprised the large model is by the step (mean negative log-likelihood of
  its tokens under the LRM, or the share of tokens the LRM gives a probability below
  ``low_prob``). The LRM reads every small-model step anyway to stay ready to take over, so with
  prefix KV reuse this costs one prefill of the step, not a generation.
- `SmallUncertainty`: the small model's own uncertainty (mean NLL of its chosen tokens): the
  opposite reading of cognitive offload, free since the logprobs come with the step.
- `Repetition`: share of the step's character n-grams already written in earlier steps; a loop
  detector that needs no hesitation lexicon, so it works in any language.

All three share `StepSignal`: ``measure(trace, step)`` returns the number (or ``None`` when it
cannot be measured), which `collab_agent.calibration` records per step to choose ``threshold``
for a model pair.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from collab_agent import _checks
from collab_agent.errors import CapabilityError, ConfigError
from collab_agent.policies.base import (
    BaseTrigger,
    Handoff,
    Policy,
    Reject,
    StepContext,
    Trigger,
    call_hook,
)
from collab_agent.policies.trigreason import StrategicPriming
from collab_agent.types import Role

if TYPE_CHECKING:
    from collab_agent.backends.base import Backend
    from collab_agent.core.trace import Step, Trace

Statistic = Literal["mean_nll", "max_nll", "low_prob_share"]
"""How a step's token logprobs become one number: their mean negative log-likelihood (nats), the
largest one (the step's least likely token: under greedy decoding, its least confident choice),
or the share of tokens with probability below a cut."""

ESCALATED_STEPS = 1 << 30
"""The handoff length of an escalation: every remaining step (the reasoner's step and token
budgets end it first)."""


def surprise(
    logprobs: Sequence[float], statistic: Statistic = "mean_nll", low_prob: float = 0.1
) -> float:
    """One number from token logprobs: ``"mean_nll"`` is ``-mean(logprobs)`` in nats,
    ``"max_nll"`` is ``-min(logprobs)``; ``"low_prob_share"`` is the share of tokens with
    ``p < low_prob``. 0 for no tokens."""
    if not logprobs:
        return 0.0
    if statistic == "mean_nll":
        return -sum(logprobs) / len(logprobs)
    if statistic == "max_nll":
        return -min(logprobs)
    cut = math.log(low_prob)
    return sum(lp < cut for lp in logprobs) / len(logprobs)


def _check_statistic(statistic: str, low_prob: float) -> None:
    if statistic not in ("mean_nll", "max_nll", "low_prob_share"):
        raise ConfigError(
            "statistic",
            f"must be 'mean_nll', 'max_nll' or 'low_prob_share', got {statistic!r}",
        )
    _checks.in_range("low_prob", low_prob, 0.0, 1.0, low_open=True, high_open=True)


@dataclass
class StepSignal(BaseTrigger):
    """Base of the threshold triggers: reject a small-model step whose `measure` is above
    ``threshold``. Subclasses implement ``measure``; steps shorter than ``min_tokens`` are never
    measured nor rejected.

    With ``escalate=True`` a rejection is final for the conversation: the large model rewrites
    the step and then writes every later one. A small model that has lost its way once tends to
    stay lost (on the bundled pair every GSM8K problem the 0.5B model solved alone, the 1.5B
    solved too), so handing back after one rewritten step buys little accuracy for its tokens.
    The trigger stays stateless: it finds its own rejection in ``trace.firings``.

    Attributes:
        threshold: a step whose signal is strictly above this is rejected.
        min_tokens: steps with fewer generated tokens are never rejected.
        escalate: after a rejection, the large model writes the rest of the reasoning.
    """

    threshold: float = 1.0
    min_tokens: int = 1
    escalate: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise ConfigError("threshold", f"must be a number, got {self.threshold!r}")
        if not math.isfinite(self.threshold):
            raise ConfigError("threshold", f"must be finite, got {self.threshold!r}")
        _checks.non_negative_int("min_tokens", self.min_tokens)
        if not isinstance(self.escalate, bool):
            raise ConfigError("escalate", f"must be True or False, got {self.escalate!r}")

    async def before_step(self, trace: Trace) -> Handoff | None:
        if self.escalate and any(
            f.trigger == self.name and f.action == "reject" for f in trace.firings
        ):
            return Handoff(self.name, steps=ESCALATED_STEPS, detail="escalated after a rejection")
        return None

    async def measure(self, trace: Trace, step: Step) -> float | None:
        """The step's signal; ``None`` when it cannot be measured (the step is then kept). A
        signal that calls a model declares ``context: StepContext | None = None`` too."""
        raise NotImplementedError

    async def signal(self, trace: Trace, step: Step, context: StepContext | None) -> float | None:
        """`measure`, given the context when it declares one."""
        return await call_hook(self.measure, context, trace, step)

    async def after_step(
        self, trace: Trace, step: Step, context: StepContext | None = None
    ) -> Reject | None:
        if step.author != "small" or step.tokens < self.min_tokens:
            return None
        value = await self.signal(trace, step, context)
        if value is not None and value > self.threshold:
            return Reject(self.name, detail=f"{value:.3g} > threshold {self.threshold:.3g}")
        return None


@dataclass
class LargeSurprise(StepSignal):
    """Large-model surprise (beyond TrigReason): reject a small-model step that the
    large model finds unlikely, and let the large model rewrite it.

    The step's text (and the step delimiter after it) is scored under the LRM with one prefill
    after the reasoning so far (`TransformersBackend.score`, which reuses the conversation's KV
    cache, so the LRM's cache is then ready for its next step). The call is recorded in the trace
    as a large-model call (prompt and cached tokens, seconds) with ``purpose="score"``.

    Policies are built before backends, so the capability is checked at the first use: a large
    backend without ``score`` (an OpenAI-compatible server) raises `CapabilityError` then, or at
    once when `check` is called with the pair.

    Attributes:
        threshold: reject when the statistic is strictly above this (default 1.0 nats of mean
            NLL; calibrate per pair with ``collab-agent calibrate``).
        statistic: ``"mean_nll"`` (nats per token), ``"max_nll"`` (nats, the step's least
            likely token) or ``"low_prob_share"`` (share of tokens with ``p < low_prob``,
            threshold then in [0, 1]).
        low_prob: probability cut of ``"low_prob_share"`` (default 0.1).
        min_tokens: steps with fewer generated tokens are never scored (default 4).
    """

    threshold: float = 1.0
    statistic: Statistic = "mean_nll"
    low_prob: float = 0.1
    min_tokens: int = 4
    name: str = "large_surprise"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_statistic(self.statistic, self.low_prob)

    def check(self, small: Backend, large: Backend) -> None:
        from collab_agent.backends.capabilities import can_score

        if not can_score(large):
            raise CapabilityError(
                f"{self.name}: the large backend {large.name!r} "
                f"({type(large).__name__}) cannot score a given text (no async "
                "score(request, continuation), or a server that returns no prompt logprobs, "
                "like llama.cpp's own); use a local large model (bundled:NAME, hf:PATH), a vLLM "
                "or llama-cpp-python (--logits_all true) server, or drop this trigger"
            )

    async def measure(
        self, trace: Trace, step: Step, context: StepContext | None = None
    ) -> float | None:
        logprobs = await self.large_logprobs(step, context)
        return surprise(logprobs, self.statistic, self.low_prob) if logprobs else None

    async def large_logprobs(self, step: Step, context: StepContext | None) -> list[float]:
        """The LRM's logprob of each token of ``step`` after the reasoning before it, the call
        recorded in the trace as a large-model call."""
        if context is None:
            raise ConfigError(
                "context",
                f"{self.name} calls the large model through the StepContext a Reasoner passes "
                "its hooks; run it inside a Reasoner",
            )
        return await context.score(step)


@dataclass
class SmallUncertainty(StepSignal):
    """Small-model uncertainty (beyond TrigReason): reject a small-model step whose own
    token logprobs are low, the opposite reading of cognitive offload (Sec. 3.3), at no extra
    cost. Needs the SRM's chosen-token logprobs; a step without them is kept.

    Attributes:
        threshold: reject when the statistic is strictly above this (default 0.5 nats of mean
            NLL; calibrate per pair).
        statistic: ``"mean_nll"``, ``"max_nll"`` (the step's least confident token; on the
            bundled pair its step AUROC for a wrong answer was 0.59 against 0.55 for the mean)
            or ``"low_prob_share"`` (share of tokens with ``p < low_prob``).
        low_prob: probability cut of ``"low_prob_share"`` (default 0.1).
        min_tokens: steps with fewer generated tokens are never rejected (default 4).
    """

    threshold: float = 0.5
    statistic: Statistic = "mean_nll"
    low_prob: float = 0.1
    min_tokens: int = 4
    name: str = "small_uncertainty"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_statistic(self.statistic, self.low_prob)

    async def measure(self, trace: Trace, step: Step) -> float | None:
        if not step.logprobs:
            return None
        return surprise(step.logprobs, self.statistic, self.low_prob)


_SPACE = re.compile(r"\s+")


def char_ngrams(text: str, n: int) -> set[str]:
    """The set of character ``n``-grams of ``text`` after lower-casing and collapsing
    whitespace (language-independent: no word splitting)."""
    normal = _SPACE.sub(" ", text.lower()).strip()
    return {normal[i : i + n] for i in range(len(normal) - n + 1)}


def repeated_share(text: str, earlier: Sequence[str], n: int) -> float | None:
    """Share of ``text``'s character ``n``-grams that occur in ``earlier`` texts; ``None`` when
    ``text`` is shorter than ``n`` characters or there is nothing earlier."""
    grams = char_ngrams(text, n)
    if not grams or not earlier:
        return None
    seen: set[str] = set()
    for previous in earlier:
        seen |= char_ngrams(previous, n)
    return len(grams & seen) / len(grams)


@dataclass
class Repetition(StepSignal):
    """Repetition (beyond TrigReason): reject a small-model step that mostly repeats
    earlier steps, measured as the share of its character n-grams already written. Replaces the
    English hesitation lexicon of the intervention request (Sec. 3.4) as a loop detector: it
    needs no word list and works in any script.

    Attributes:
        threshold: reject when the repeated share is strictly above this, in [0, 1) (default
            0.8).
        n: n-gram length in characters (default 12).
        window: compare with at most this many preceding steps (``None``: all of them).
        min_tokens: steps with fewer generated tokens are never rejected (default 4).
    """

    threshold: float = 0.8
    n: int = 12
    window: int | None = None
    min_tokens: int = 4
    name: str = "repetition"

    def __post_init__(self) -> None:
        super().__post_init__()
        _checks.positive_int("n", self.n)
        if self.window is not None:
            _checks.positive_int("window", self.window)

    async def measure(self, trace: Trace, step: Step) -> float | None:
        earlier = [s.text for s in trace.steps]
        if self.window is not None:
            earlier = earlier[-self.window :]
        return repeated_share(step.text, earlier, self.n)


class SurpriseReason(Policy):
    """The large model primes the first steps (TrigReason Sec. 3.2), then rewrites every
    small-model step it finds surprising (`LargeSurprise`) or that repeats earlier steps
    (`Repetition`, unless ``repetition`` is ``None``). Thresholds are per pair: calibrate them
    with ``collab-agent calibrate``."""

    def __init__(
        self,
        *,
        priming_steps: int = 1,
        threshold: float = 1.0,
        statistic: Statistic = "mean_nll",
        low_prob: float = 0.1,
        min_tokens: int = 4,
        repetition: float | None = 0.8,
        answer_by: Role | None = None,
        name: str = "surprise",
    ) -> None:
        surprise = LargeSurprise(
            threshold=threshold, statistic=statistic, low_prob=low_prob, min_tokens=min_tokens
        )
        loops = () if repetition is None else (Repetition(threshold=repetition),)
        super().__init__(_primed(priming_steps, surprise, *loops), name=name, answer_by=answer_by)


class Escalation(Policy):
    """The large model primes the first steps (TrigReason Sec. 3.2); the small model writes on
    until it is unsure of a step (`SmallUncertainty`, by default its least likely token below
    ``exp(-threshold)``, p < 0.30); the large model then rewrites that step and writes the rest
    of the reasoning (``escalate=True``). No extra model call: the signal is the small model's own
    logprobs. Calibrate ``threshold`` per pair (``collab-agent calibrate --signals
    escalation``)."""

    def __init__(
        self,
        *,
        priming_steps: int = 1,
        threshold: float = 1.2,
        statistic: Statistic = "max_nll",
        low_prob: float = 0.1,
        min_tokens: int = 4,
        answer_by: Role | None = None,
        name: str = "escalation",
    ) -> None:
        uncertainty = SmallUncertainty(
            threshold=threshold,
            statistic=statistic,
            low_prob=low_prob,
            min_tokens=min_tokens,
            escalate=True,
        )
        super().__init__(_primed(priming_steps, uncertainty), name=name, answer_by=answer_by)


def _primed(priming_steps: int, *triggers: Trigger) -> tuple[Trigger, ...]:
    """`StrategicPriming` of ``priming_steps`` (none when 0), then ``triggers``."""
    return ((StrategicPriming(steps=priming_steps),) if priming_steps else ()) + triggers


def __getattr__(name: str) -> Any:
    """``ScoringBackend``: the `Scoring` capability of `collab_agent.backends.capabilities`
    under its older name, loaded on first use so policies load without the backends."""
    if name == "ScoringBackend":
        from collab_agent.backends.capabilities import Scoring

        return Scoring
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ESCALATED_STEPS",
    "Escalation",
    "LargeSurprise",
    "Repetition",
    "SmallUncertainty",
    "Statistic",
    "StepSignal",
    "SurpriseReason",
    "char_ngrams",
    "repeated_share",
    "surprise",
]
