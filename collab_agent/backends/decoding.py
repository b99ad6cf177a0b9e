"""One sequence's decode state and step, shared by the local and the batching backend.

A backend runs the model; `SequenceDecoder` decides what each sampled token means. Given the
logits after the last forwarded token it samples the next one, ends the sequence at an
end-of-turn token, a stop string (the text is cut before it, and the tokens, logprobs and top
alternatives with it) or ``max_tokens``, hands out the streamed text less a tail that could start
a stop string, and builds the `Generation`. `TransformersBackend` drives one decoder per call in
its own loop, `BatchedTransformersBackend` one per row of its batch, so both follow the same rules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from collab_agent.backends.detokenize import IncrementalText, find_stop, stop_holdback
from collab_agent.types import GenerateRequest, Generation, Sampling, StopReason

if TYPE_CHECKING:
    import torch


def sample_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """The next token: argmax when temperature is 0, else top-p sampling at the temperature."""
    import torch

    if sampling.temperature == 0.0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs[before >= sampling.top_p] = 0.0  # keeps at least the top token
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice].item())
    return int(torch.multinomial(probs, 1, generator=generator).item())


def top_alternatives(logprobs: torch.Tensor, k: int, tokenizer: Any) -> dict[str, float]:
    """The ``k`` most likely next tokens as ``{token text: logprob}`` from one row of log-softmax
    scores (what OpenAI's ``top_logprobs`` returns; tokens decoding to the same text are summed)."""
    import torch

    values, ids = torch.topk(logprobs, k)
    out: dict[str, float] = {}
    for value, token_id in zip(values.tolist(), ids.tolist(), strict=True):
        text = str(tokenizer.decode([token_id], skip_special_tokens=False))
        previous = out.get(text)
        out[text] = value if previous is None else math.log(math.exp(previous) + math.exp(value))
    return out


def tokens_before(prefix_lengths: Sequence[int], position: int) -> int:
    """How many tokens contribute text before ``position``, given the decoded length after each
    token (a token that straddles the position counts: its text starts before it)."""
    count = 0
    start = 0
    for length in prefix_lengths:
        if start >= position:
            break
        count += 1
        start = length
    return count


def seeded_generator(sampling: Sampling, device: Any) -> torch.Generator | None:
    """A generator seeded with ``sampling.seed`` when sampling is random and seeded, else None."""
    if sampling.temperature > 0 and sampling.seed is not None:
        import torch

        return torch.Generator(device=device).manual_seed(sampling.seed)
    return None


@dataclass(eq=False)
class SequenceDecoder:
    """The decode state of one generated sequence: its tokens and text, logprobs, limits and why
    it ended.

    Attributes:
        request: what is generated (stop strings, ``max_tokens``, sampling, logprob options).
        tokenizer: the model's tokenizer (text of the tokens and of top alternatives).
        end_of_turn: token ids that end the sequence with ``stop_reason="eos"`` (not kept).
        generator: the random generator of seeded sampling (`seeded_generator`), or None.
        text: the sampled tokens (an end of turn excepted) and their incrementally decoded text.
        logprobs: the chosen-token logprob of each kept token.
        top: the top alternatives of each kept token (when the request asks for them).
        stop_reason: why the sequence ended; None while it goes on.
        stop_string: the stop string that ended it, if any.
    """

    request: GenerateRequest
    tokenizer: Any
    end_of_turn: frozenset[int]
    generator: torch.Generator | None = None
    text: IncrementalText = field(init=False)
    logprobs: list[float] = field(default_factory=list)
    top: list[dict[str, float]] = field(default_factory=list)
    stop_reason: StopReason | None = None
    stop_string: str | None = None
    _kept: int | None = None  # tokens kept when a stop string cut the text
    _final: str = ""  # the text once ended
    _shown: int = 0  # characters handed out by `take_delta`
    _fresh: bool = False  # the last token added text that `take_delta` has not looked at

    def __post_init__(self) -> None:
        self.text = IncrementalText(self.tokenizer)

    @property
    def done(self) -> bool:
        """Whether the sequence has ended."""
        return self.stop_reason is not None

    @property
    def sampled(self) -> list[int]:
        """Every token sampled, past a stop string too (an end-of-turn token excepted)."""
        return self.text.tokens

    @property
    def tokens(self) -> list[int]:
        """The tokens kept: those before a stop string that ended the sequence."""
        tokens = self.text.tokens
        return tokens if self._kept is None else tokens[: self._kept]

    def advance(self, logits: torch.Tensor, logprobs: torch.Tensor | None = None) -> int | None:
        """Sample the next token from ``logits`` (one row, float32) and apply it: the token to
        forward next, or None when the sequence ended (end of turn, stop string, length).

        ``logprobs``: the log-softmax of ``logits`` when the caller has it (a batch computes every
        row's at once); else it is computed here.
        """
        request = self.request
        self._fresh = False
        token = sample_next(logits, request.sampling, self.generator)
        if token in self.end_of_turn:
            self._end("eos")
            return None
        if logprobs is None:
            import torch

            logprobs = torch.log_softmax(logits.float(), dim=-1)
        self.logprobs.append(float(logprobs[token]))
        if request.top_logprobs:
            self.top.append(top_alternatives(logprobs, request.top_logprobs, self.tokenizer))
        text = self.text
        checked = len(text.text)
        if text.push(token):  # only the tail the new text can complete is searched
            self._fresh = True
            found = find_stop(text.text, request.stop, checked)
            if found is not None:
                position, stop = found
                kept = tokens_before(text.lengths, position)
                self._kept = kept
                del self.logprobs[kept:], self.top[kept:]
                self._end("step", text.text[:position], stop)
                return None
        if len(text.tokens) >= request.max_tokens:
            self._end("length")
            return None
        return token

    def _end(self, reason: StopReason, text: str | None = None, stop: str | None = None) -> None:
        self.stop_reason = reason
        self.stop_string = stop
        self._final = self.text.final_text() if text is None else text

    def take_delta(self) -> str:
        """The text settled since the last call, less a tail that could start a stop string
        (empty once a stop string ended the sequence: what is left is the final text's)."""
        if not self._fresh or self.stop_reason == "step":
            return ""  # no new text (the same tail is held back), or a stop string ended it
        self._fresh = False
        text = self.text.text
        upto = len(text) - stop_holdback(text, self.request.stop)
        if upto <= self._shown:
            return ""
        delta = text[self._shown : upto]
        self._shown = upto
        return delta

    def generation(self, *, prompt_tokens: int, cached_tokens: int, seconds: float) -> Generation:
        """The `Generation` of the ended sequence."""
        assert self.stop_reason is not None, "the sequence has not ended"
        request = self.request
        return Generation(
            text=self._final,
            stop_reason=self.stop_reason,
            logprobs=list(self.logprobs) if request.logprobs else None,
            top_logprobs=list(self.top) if request.top_logprobs else None,
            prompt_tokens=prompt_tokens,
            cached_tokens=cached_tokens,
            completion_tokens=len(self.tokens),
            seconds=seconds,
            stop_string=self.stop_string,
        )


__all__ = [
    "SequenceDecoder",
    "sample_next",
    "seeded_generator",
    "tokens_before",
    "top_alternatives",
]
