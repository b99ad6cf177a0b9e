"""What of a step or an answer being decoded may be shown yet.

A streamed delta may end inside an answer marker (``"Final ans"``) or the close tag, or in
whitespace that the finished text will not keep. `StepReveal` and `AnswerReveal` hold such tails
back, so the shown deltas joined are always a prefix of the finished text: a chat UI never shows
reasoning the trace then cuts off.
"""

from __future__ import annotations

from collab_agent.backends.detokenize import stop_holdback
from collab_agent.core.formats import ReasoningFormat


class StepReveal:
    """The part of a step's text that may be shown: up to the end of reasoning (an answer
    marker or the close tag), without a trailing tail that could start one, nor trailing
    whitespace."""

    def __init__(self, fmt: ReasoningFormat) -> None:
        self._fmt = fmt
        self._ends = tuple(m.lower() for m in (*fmt.answer_markers, fmt.close) if m)
        self.text = ""
        self.shown = ""

    def feed(self, delta: str) -> str:
        """Add ``delta`` to the text; return the newly showable text (often ``""``)."""
        self.text += delta
        end = self._fmt.end_of_reasoning(self.text)
        if end is not None:
            safe = self.text[:end].rstrip()
        else:
            safe = self.text.rstrip()
            safe = safe[: len(safe) - stop_holdback(safe.lower(), self._ends)].rstrip()
        if len(safe) <= len(self.shown) or not safe.startswith(self.shown):
            return ""
        new, self.shown = safe[len(self.shown) :], safe
        return new


class AnswerReveal:
    """The part of an answer that may be shown: without leading or trailing whitespace (the
    finished answer is stripped)."""

    def __init__(self) -> None:
        self.text = ""
        self.shown = ""

    def feed(self, delta: str) -> str:
        self.text += delta
        safe = self.text.strip()
        if len(safe) <= len(self.shown):
            return ""
        new, self.shown = safe[len(self.shown) :], safe
        return new
