"""Who writes the next step: triggers, their decisions, and their ordered composition.

A trigger is a small object with two async hooks, both optional (`BaseTrigger` does nothing
in either), and a capability check:

- ``before_step(trace)`` may return a `Handoff`: the large model writes the next ``steps`` steps;
- ``after_step(trace, step)`` sees each step the small model wrote and may return a `Reject`:
  the step is thrown away and the large model rewrites it from the same prefix;
- ``check(small, large)`` raises `CapabilityError` when the model pair cannot serve the trigger,
  so a `Reasoner` fails at construction, before any model runs.

A hook that calls a model (SpecReason's judge, the large model's surprise) declares a keyword
parameter ``context``: the reasoner then passes the `StepContext` of the running collaboration,
through which calls are made and counted in the trace. The trace itself is plain data.

Triggers are stateless: whatever they need (the last ``k`` steps, the step count) they read from
the trace, so one policy object serves any number of concurrent conversations.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from collab_agent import _checks
from collab_agent.errors import ConfigError
from collab_agent.types import Role

if TYPE_CHECKING:
    from collab_agent.backends.base import Backend
    from collab_agent.core.formats import ReasoningFormat
    from collab_agent.core.trace import Step, Trace
    from collab_agent.types import GenerateRequest, Generation

T = TypeVar("T")


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


class StepContext(Protocol):
    """The running collaboration as a hook sees it: the trace so far, the conversation, and
    model calls that are recorded in the trace (`collab_agent.core.session.Session` is the one the
    reasoner passes)."""

    @property
    def trace(self) -> Trace: ...

    @property
    def format(self) -> ReasoningFormat: ...

    @property
    def messages(self) -> list[dict[str, Any]]: ...

    def prefix(self, then: Step | None = None) -> str:
        """The reasoning written so far, then ``then`` as a finished step."""
        ...

    def request(self, reasoning: str, *args: Any, **options: Any) -> GenerateRequest:
        """A request that continues ``reasoning`` in this conversation; ``options`` as
        `collab_agent.core.session.Session.request` takes them (``max_tokens``, ``stop``,
        ``logprobs``, ``purpose``, ``sampling``, ``messages``)."""
        ...

    async def generate(self, role: Role, request: GenerateRequest) -> Generation:
        """Call the ``role`` model, the call recorded in the trace."""
        ...

    async def score(self, step: Step) -> list[float]:
        """The large model's logprob of each token of ``step`` after the reasoning so far."""
        ...


@functools.lru_cache(maxsize=1024)
def _declares_context(function: Callable[..., Any]) -> bool:
    try:
        return "context" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


async def call_hook(
    hook: Callable[..., Awaitable[T]], context: StepContext | None, *args: Any
) -> T:
    """``hook(*args)``, with ``context=context`` when the hook declares that parameter."""
    function = hook.__func__ if isinstance(hook, types.MethodType) else hook
    if _declares_context(function):
        return await hook(*args, context=context)
    return await hook(*args)


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

    async def before_step(self, trace: Trace, context: StepContext | None = None) -> Handoff | None:
        """The first handoff any trigger asks for before the next step, if any."""
        for trigger in self.triggers:
            decision = await call_hook(trigger.before_step, context, trace)
            if decision is not None:
                return decision
        return None

    @property
    def can_reject(self) -> bool:
        """Whether any trigger may reject a small-model step (a `BaseTrigger` that keeps the
        default ``after_step`` cannot), so a small step may be shown before it is judged."""
        return any(type(t).after_step is not BaseTrigger.after_step for t in self.triggers)

    async def after_step(
        self, trace: Trace, step: Step, context: StepContext | None = None
    ) -> Reject | None:
        """The first rejection any trigger makes of a small-model step, if any."""
        for trigger in self.triggers:
            decision = await call_hook(trigger.after_step, context, trace, step)
            if decision is not None:
                return decision
        return None
