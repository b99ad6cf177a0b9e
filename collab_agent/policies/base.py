"""Who writes the next step: triggers, their decisions, and their ordered composition.

A trigger is a small object with two async hooks, both optional (`BaseTrigger` does nothing
in either), and a capability check:

- ``before_step(trace)`` may return a `Handoff`: the large model writes the next ``steps`` steps;
- ``after_step(trace, step)`` sees each step the small model wrote and may return a `Reject`:
  the step is thrown away and the large model rewrites it from the same prefix;
- ``check(small, large)`` raises `CapabilityError` when the model pair cannot serve the trigger,
  so a `Reasoner` fails at construction, before any model runs.

Triggers are stateless: whatever they need (the last ``k`` steps, the step count) they read from
the trace, so one policy object serves any number of concurrent conversations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from collab_agent import _checks
from collab_agent.errors import ConfigError
from collab_agent.types import Role

if TYPE_CHECKING:
    from collab_agent.backends.base import Backend
    from collab_agent.trace import Step, Trace


@dataclass(frozen=True)
class Handoff:
    """Before a step: the large model writes the next ``steps`` steps."""

    trigger: str
    steps: int = 1
    detail: str = ""

    def __post_init__(self) -> None:
        _checks.positive_int("steps", self.steps)


@dataclass(frozen=True)
class Reject:
    """After a small-model step: discard it; the large model rewrites it from the same prefix."""

    trigger: str
    detail: str = ""


@runtime_checkable
class Trigger(Protocol):
    """A rule that can hand steps to the large model. ``name`` appears in traces."""

    name: str

    async def before_step(self, trace: Trace) -> Handoff | None: ...

    async def after_step(self, trace: Trace, step: Step) -> Reject | None: ...

    def check(self, small: Backend, large: Backend) -> None: ...


class BaseTrigger:
    """Convenience base: both hooks do nothing; override the one you need.

    The trigger's ``name`` defaults to its class name.
    """

    name: str = ""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("name"):
            cls.name = cls.__name__

    async def before_step(self, trace: Trace) -> Handoff | None:
        return None

    async def after_step(self, trace: Trace, step: Step) -> Reject | None:
        return None

    def check(self, small: Backend, large: Backend) -> None:
        """Raise `CapabilityError` when ``small`` and ``large`` cannot serve this trigger
        (nothing to check here)."""


@dataclass
class Policy:
    """An ordered composition of triggers: the first that fires decides.

    Attributes:
        triggers: consulted in order; evaluation stops at the first that fires, and every firing
            is recorded in the trace.
        name: the policy's name in traces and reports.
        default_author: who writes a step when no trigger fires (``"small"`` for collaboration,
            ``"large"`` for the large-only baseline).
        answer_by: who writes the final answer when the reasoning did not already contain it;
            ``None`` means whoever wrote the last reasoning step.
    """

    triggers: Sequence[Trigger] = ()
    name: str = "policy"
    default_author: Role = "small"
    answer_by: Role | None = None

    def __post_init__(self) -> None:
        if self.default_author not in ("small", "large"):
            raise ConfigError(
                "default_author", f"must be 'small' or 'large', got {self.default_author!r}"
            )
        if self.answer_by not in (None, "small", "large"):
            raise ConfigError(
                "answer_by", f"must be None, 'small' or 'large', got {self.answer_by!r}"
            )
        for i, trigger in enumerate(self.triggers):
            if not isinstance(trigger, Trigger):
                raise ConfigError(
                    f"triggers[{i}]",
                    "must have a 'name', async before_step(trace) / after_step(trace, step) "
                    "and check(small, large) methods (subclass "
                    f"collab_agent.policies.BaseTrigger), got {type(trigger).__name__}",
                )
        self.triggers = tuple(self.triggers)

    def __eq__(self, other: object) -> bool:
        """Same triggers and settings, whichever class built them (a `TrigReason` equals the
        `Policy` its policy file loads back as)."""
        if not isinstance(other, Policy):
            return NotImplemented
        return (self.triggers, self.name, self.default_author, self.answer_by) == (
            other.triggers,
            other.name,
            other.default_author,
            other.answer_by,
        )

    async def before_step(self, trace: Trace) -> Handoff | None:
        """The first handoff any trigger asks for before the next step, if any."""
        for trigger in self.triggers:
            decision = await trigger.before_step(trace)
            if decision is not None:
                return decision
        return None

    @property
    def can_reject(self) -> bool:
        """Whether any trigger may reject a small-model step (a `BaseTrigger` that keeps the
        default ``after_step`` cannot), so a small step may be shown before it is judged."""
        return any(type(t).after_step is not BaseTrigger.after_step for t in self.triggers)

    async def after_step(self, trace: Trace, step: Step) -> Reject | None:
        """The first rejection any trigger makes of a small-model step, if any."""
        for trigger in self.triggers:
            decision = await trigger.after_step(trace, step)
            if decision is not None:
                return decision
        return None
