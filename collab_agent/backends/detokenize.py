"""Incremental detokenisation: a generation's text grows by one token's text per step.

Decoding every generated token again after each new one costs time that grows with the text (and,
in a batch, with the rows). `IncrementalText` decodes only a short window instead, the scheme of
vLLM and TGI: the text of ``tokens[prefix:]`` minus the text of ``tokens[prefix:read]``, where
``read`` is how far the text is settled and ``prefix`` a few tokens before it, so that a
tokenizer that drops a leading space or merges across tokens sees the same context as a full
decode. A window that ends inside a multi-byte character (``"\\ufffd"``) waits for the next
token. Stop strings are then searched only where a new one can be: the tail that overlaps the
last text added (`find_stop` with ``checked``).

A tokenizer that rewrites text across tokens after decoding (``clean_up_tokenization_spaces``)
gets the whole text decoded at every step, as before: its windowed text could differ from the
full one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class IncrementalText:
    """The decoded text of the tokens pushed so far, and its length after each token.

    Args:
        tokenizer: a transformers tokenizer (special tokens are kept in the text).
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""
        self.lengths: list[int] = []  # len(text) after each token
        self._prefix = 0  # the window starts here
        self._read = 0  # text is settled up to here
        self._prefix_text = ""  # the text of tokens[prefix:read]
        self._whole = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))

    def _decode(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens, skip_special_tokens=False))

    def push(self, token: int) -> str:
        """Add ``token``; return the text it settled (empty while a character is incomplete)."""
        self.tokens.append(token)
        if self._whole:
            old = len(self.text)
            self.text = self._decode(self.tokens)
            self.lengths.append(len(self.text))
            return self.text[old:]
        window = self._decode(self.tokens[self._prefix :])
        added = ""
        if len(window) > len(self._prefix_text) and not window.endswith("\ufffd"):
            added = window[len(self._prefix_text) :]
            self.text += added
            self._prefix, self._read = self._read, len(self.tokens)
            self._prefix_text = self._decode(self.tokens[self._prefix : self._read])
        self.lengths.append(len(self.text))
        return added

    def final_text(self) -> str:
        """The text of all tokens, an unfinished character included (as a full decode gives)."""
        if self._read == len(self.tokens):
            return self.text
        return self._decode(self.tokens)


def find_stop(text: str, stops: Iterable[str], checked: int = 0) -> tuple[int, str] | None:
    """The earliest stop string in ``text``: ``(position, stop)``, or None. ``checked``: the
    first ``checked`` characters were searched before without a hit, so only a stop that ends
    past them is looked for (the tail a new token's text can complete)."""
    best: tuple[int, str] | None = None
    for stop in stops:
        if not stop:
            continue
        pos = text.find(stop, max(0, checked - len(stop) + 1))
        if pos >= 0 and (best is None or pos < best[0]):
            best = (pos, stop)
    return best


def cut_at_stop(text: str, stops: Iterable[str]) -> tuple[str, str | None]:
    """``text`` up to its earliest stop string, and that stop (``None``: no stop in it)."""
    found = find_stop(text, stops)
    return (text, None) if found is None else (text[: found[0]], found[1])


def stop_holdback(text: str, stops: Iterable[str]) -> int:
    """Length of the longest end of ``text`` that is a proper start of a stop string: the tail
    a streamed delta must hold back, since the next token may complete the stop there."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


__all__ = ["IncrementalText", "find_stop", "stop_holdback"]
