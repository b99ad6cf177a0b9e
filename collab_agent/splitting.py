"""Where one reasoning step ends: the step splitter, part of the reasoning format.

TrigReason and SpecReason end a step at a blank line (``"\\n\\n"``), which ``<think>`` models
write between paragraphs. Instruct models often write a whole solution with single line breaks
and no blank line, so a blank-line split gives one huge step and the large model's priming step
swallows the whole answer. `LINE` ends a step at a line break instead, and merges a step shorter
than ``min_tokens`` with the lines after it, so list markers, headings and one-line fragments do
not each become a step (and do not each cost the triggers a decision).

A step is generated up to ``delimiter``; while it holds fewer than ``min_tokens`` tokens and
ended at the delimiter, the same model continues it past the delimiter (`needs_more`,
`merge`). Strategic priming, the budget and the step cap all count these merged steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from collab_agent.errors import ConfigError
from collab_agent.types import Generation


@dataclass(frozen=True)
class StepSplitter:
    """How reasoning is cut into steps.

    Attributes:
        name: short name (``"blank-line"``, ``"line"``), recorded in the trace.
        delimiter: the stop string that ends a step (``"\\n\\n"`` or ``"\\n"``).
        min_tokens: a step that ended at the delimiter with fewer tokens than this is continued
            by the same model and merged with what follows (0: never merge).
    """

    name: str
    delimiter: str
    min_tokens: int = 0

    def __post_init__(self) -> None:
        if not self.delimiter:
            raise ConfigError("delimiter", "must be a non-empty stop string, got ''")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int):
            raise ConfigError("min_tokens", f"must be an integer >= 0, got {self.min_tokens!r}")
        if self.min_tokens < 0:
            raise ConfigError("min_tokens", f"must be >= 0, got {self.min_tokens}")

    def needs_more(self, generation: Generation) -> bool:
        """Whether a step so far is too short and ended at the delimiter, so it continues."""
        return generation.stop_reason == "step" and generation.completion_tokens < self.min_tokens


BLANK_LINE = StepSplitter("blank-line", "\n\n")
"""The papers' split: a step ends at a blank line. The default for ``<think>`` models."""

LINE = StepSplitter("line", "\n", min_tokens=20)
"""A step ends at a line break once it holds at least 20 tokens (about one sentence of
arithmetic); shorter lines merge with the next. The default for instruct models."""

SPLITTERS: dict[str, StepSplitter] = {s.name: s for s in (BLANK_LINE, LINE)}
"""The named splitters (``Reasoner(splitter=...)``, ``CollabChatModel(splitter=...)``,
``--splitter``)."""


def resolve_splitter(value: StepSplitter | str, argument: str = "splitter") -> StepSplitter:
    """The splitter ``value`` names (or ``value`` itself).

    Raises:
        ConfigError: an unknown name or a value that is not a splitter.
    """
    if isinstance(value, StepSplitter):
        return value
    if isinstance(value, str) and value in SPLITTERS:
        return SPLITTERS[value]
    raise ConfigError(
        argument, f"must be one of {sorted(SPLITTERS)} or a StepSplitter, got {value!r}"
    )


def splitter_for_pair(small_name: str, large_name: str, default: StepSplitter) -> StepSplitter:
    """The splitter the bundled model metadata gives a pair whose names both name a bundled
    model (``llamacpp:qwen2.5-coder-0.5b-instruct``, ``bundled:...``) that agree on one, else
    ``default`` (the reasoning format's). ``<think>`` formats keep ``default``."""
    from collab_agent.backends.bundled import BUNDLED

    chosen = set()
    for name in (small_name.lower(), large_name.lower()):
        found = [m.splitter for m in BUNDLED.values() if m.name in name]
        if not found:
            return default
        chosen.update(found)
    return SPLITTERS[chosen.pop()] if len(chosen) == 1 else default


def choose_splitter(
    splitter: StepSplitter | str | None,
    small_name: str,
    large_name: str,
    fmt_splitter: StepSplitter,
    *,
    think: bool,
) -> StepSplitter:
    """The splitter a collaboration uses: ``splitter`` when given; else, for a ``<think>``
    format, the format's; else the pair's (`splitter_for_pair`)."""
    if splitter is not None:
        return resolve_splitter(splitter)
    if think:
        return fmt_splitter
    return splitter_for_pair(small_name, large_name, fmt_splitter)


def merge(first: Generation, rest: Generation, delimiter: str) -> Generation:
    """One generation from a step and its continuation past ``delimiter``: texts joined by the
    delimiter, tokens, logprobs, time and cost added; the continuation's stop reason."""
    logprobs = None
    if first.logprobs is not None and rest.logprobs is not None:
        logprobs = first.logprobs + rest.logprobs
    top = None
    if first.top_logprobs is not None and rest.top_logprobs is not None:
        top = first.top_logprobs + rest.top_logprobs
    return Generation(
        text=first.text + delimiter + rest.text,
        stop_reason=rest.stop_reason,
        logprobs=logprobs,
        top_logprobs=top,
        prompt_tokens=first.prompt_tokens + rest.prompt_tokens,
        cached_tokens=first.cached_tokens + rest.cached_tokens,
        completion_tokens=first.completion_tokens + rest.completion_tokens,
        seconds=first.seconds + rest.seconds,
        cost=first.cost + rest.cost,
        tool_calls=first.tool_calls + rest.tool_calls,
        reasoning_text=first.reasoning_text + rest.reasoning_text,
        stop_string=rest.stop_string,
        degraded=first.degraded or rest.degraded,
    )
