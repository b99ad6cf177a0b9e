"""The settings of a collaboration's reasoning, in one frozen object.

`Reasoner`, `CollabChatModel`, ``evaluate`` and the command line each used to declare the same
settings; they now build one `ReasoningConfig` and hand it on, so a setting added here reaches
every entry point. Defaults come from `collab_agent.defaults`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from collab_agent import _checks, defaults
from collab_agent.core.formats import (
    FORMATS,
    STEPWISE,
    ReasoningFormat,
    StepSplitter,
    resolve_splitter,
)
from collab_agent.errors import ConfigError
from collab_agent.types import Sampling

__all__ = ["ReasoningConfig"]


@dataclass(frozen=True)
class ReasoningConfig:
    """How a collaboration reasons: layout, sampling and limits.

    Attributes:
        format: how reasoning is laid out (`STEPWISE` for instruct models, `THINK` for
            ``<think>``; a name from ``FORMATS`` works too). Default `STEPWISE`.
        splitter: where a step ends (``"blank-line"``, ``"line"`` or a `StepSplitter`; a name
            is resolved here). ``None`` (default): the one the bundled model metadata gives the
            pair unless the format is ``<think>``, else the format's.
        temperature: sampling temperature of every call; 0 is greedy (default
            `defaults.TEMPERATURE`, 0; paper: 0.6).
        top_p: nucleus sampling mass (default `defaults.TOP_P`, 0.95).
        seed: sampling seed, for backends that honour one (default ``None``).
        budget: most reasoning tokens of accepted steps. ``None`` (default):
            `defaults.REASONING_BUDGET`, capped to what each model's context leaves after the
            prompt and the answer; an explicit budget that cannot fit raises
            `ContextLengthError` before any model runs (paper: 8192).
        max_steps: most reasoning steps (default `defaults.MAX_STEPS`, 256).
        step_max_tokens: most tokens of one step; a longer step continues in the next (default
            `defaults.STEP_MAX_TOKENS`, 512).
        answer_max_tokens: most tokens of the answer (default `defaults.ANSWER_MAX_TOKENS`,
            1024).

    Raises:
        ConfigError: a setting out of range or of the wrong kind, named.
    """

    format: ReasoningFormat = STEPWISE
    splitter: StepSplitter | str | None = None
    temperature: float = defaults.TEMPERATURE
    top_p: float = defaults.TOP_P
    seed: int | None = None
    budget: int | None = None
    max_steps: int = defaults.MAX_STEPS
    step_max_tokens: int = defaults.STEP_MAX_TOKENS
    answer_max_tokens: int = defaults.ANSWER_MAX_TOKENS

    def __post_init__(self) -> None:
        if isinstance(self.format, str):
            if self.format not in FORMATS:
                raise ConfigError(
                    "format",
                    f"must be one of {sorted(FORMATS)} or a ReasoningFormat, got {self.format!r}",
                )
            object.__setattr__(self, "format", FORMATS[self.format])
        if not isinstance(self.format, ReasoningFormat):
            raise ConfigError("format", f"must be a ReasoningFormat or a name, got {self.format!r}")
        if self.splitter is not None:
            object.__setattr__(self, "splitter", resolve_splitter(self.splitter))
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise ConfigError("seed", f"must be an integer or None, got {self.seed!r}")
        Sampling(temperature=self.temperature, top_p=self.top_p)  # checks their ranges
        if self.budget is not None:
            _checks.positive_int("budget", self.budget)
        for name in ("max_steps", "step_max_tokens", "answer_max_tokens"):
            _checks.positive_int(name, getattr(self, name))

    @property
    def sampling(self) -> Sampling:
        """The sampling settings of every call."""
        return Sampling(temperature=self.temperature, top_p=self.top_p, seed=self.seed)

    def override(self, *, sampling: Sampling | None = None, **settings: Any) -> ReasoningConfig:
        """A copy with the given settings replaced; ``None`` values leave a setting as it is.

        ``sampling`` replaces ``temperature``, ``top_p`` and ``seed`` together; a ``seed`` given
        beside it wins.

        Raises:
            ConfigError: a name that is not a setting of `ReasoningConfig`.
        """
        known = {f.name for f in fields(self)}
        for name in settings:
            if name not in known:
                raise ConfigError(name, f"is not a reasoning setting; use one of {sorted(known)}")
        changes: dict[str, Any] = {}
        if sampling is not None:
            changes.update(temperature=sampling.temperature, top_p=sampling.top_p)
            changes["seed"] = sampling.seed
        changes.update((name, value) for name, value in settings.items() if value is not None)
        return replace(self, **changes) if changes else self
