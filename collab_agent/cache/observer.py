"""The observer layer: a full cache whose layers record the attention they compute.

SmallKV's assistant (SRM) runs with an `ObservedCache`: its attention output is exact, and each
layer keeps what SmallKV ranks the large model's tokens by (accumulated attention, the sum over a
recent window of queries, the calibration block that head matching reads, the last call's rows).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from collab_agent.cache.attention import attend_next, attention_probs, probs_in_chunks

if TYPE_CHECKING:
    from torch import nn

LAST_ROWS = 64
"""An observed (SRM) layer keeps its last call's attention rows for calls up to this many tokens;
for longer calls it keeps the queries instead and the rows a method needs are recomputed from
them (memory: the rows of every head would be ``q x L`` floats each)."""


def calibration_rows(q: int, tokens: int) -> slice:
    """The query rows of a ``q``-token call that enter the calibration block: its last
    ``tokens`` (the most recent text, the part of the context that the coming tokens continue,
    rather than the chat template at the start)."""
    return slice(max(0, q - tokens), q)


def calibration_start(
    previous: torch.Tensor | None, q: int, tokens: int, like: torch.Tensor
) -> torch.Tensor:
    """The calibration block, shaped as ``like`` ``(B, H, n)``, that a ``q``-token call adds to: a
    fresh one when the call alone fills the block (its last ``tokens`` rows), else ``previous``
    (rows of shorter calls add up) widened to the call's ``n`` keys."""
    if previous is None or q >= tokens or previous.shape[:2] != like.shape[:2]:
        return torch.zeros_like(like)
    return torch.nn.functional.pad(previous, (0, like.shape[-1] - previous.shape[-1]))


class ObservedLayer(DynamicLayer):
    """A full-cache layer that records attention: accumulated per key, the last call's rows (or,
    for a call longer than `LAST_ROWS`, its queries), the sum of the last ``window`` query rows
    (``window_sum``), and the calibration block (see `calibration_update`).

    Used for the assistant (SRM) of SmallKV; the attention output itself is exact.
    """

    def __init__(
        self, layer_idx: int, calibration_tokens: int, keep_last: bool, window: int = 32
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.calibration_tokens = calibration_tokens
        self.keep_last = keep_last
        self.window = window
        # the last `window` query rows, row of position p in slot p % window (a ring, so a step
        # writes one row instead of shifting them all), and their running sum over the rows
        self.ring: torch.Tensor | None = None  # (B, H, window, capacity) float32
        self.window_sum: torch.Tensor | None = None  # (B, H, L) float32
        self.accumulated: torch.Tensor | None = None  # (B, H, L) float32
        self.calibration: torch.Tensor | None = None  # (B, H, L') float32
        self.last: torch.Tensor | None = None  # (B, H, q, L) float32, last call's probabilities
        self.last_query: torch.Tensor | None = None  # (B, H, q, D), when `last` would be too big
        self.last_q_pos: torch.Tensor | None = None
        self.scaling = 1.0
        self.calibrating = True  # a method that has used the calibration block turns this off
        self.seen = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states)
        self._q_pos = torch.arange(
            self.seen, self.seen + key_states.shape[-2], device=key_states.device
        )
        self.seen += key_states.shape[-2]
        attend_next(self)
        return keys, values

    def attend(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        scaling: float,
        kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, None]:
        b, h, q, _ = query.shape
        n = key.shape[-2]
        if q == 1 and n == self.seen and not self.calibrating:
            self._record_step(query, key, scaling)
            return sdpa_attention_forward(
                module, query, key, value, mask, scaling=scaling, **kwargs
            )
        k_pos = torch.arange(n, device=key.device).expand(b, key.shape[1], n)
        acc = torch.zeros(b, h, n, dtype=torch.float32, device=key.device)
        if self.accumulated is not None:
            acc[..., : self.accumulated.shape[-1]] = self.accumulated
        calib_rows = calibration_rows(q, self.calibration_tokens)
        calib = (
            calibration_start(self.calibration, q, self.calibration_tokens, acc)
            if self.calibrating
            else None
        )
        lasts: list[torch.Tensor] = []
        recent: list[torch.Tensor] = []
        recent_pos: list[torch.Tensor] = []
        first_calib = self.seen - q + calib_rows.start

        def sink(probs: torch.Tensor, qp: torch.Tensor) -> None:
            flat = probs.flatten(1, 2)  # (B, H, rows, L)
            acc.add_(flat.sum(2))
            in_window = qp >= self.seen - self.window
            if bool(in_window.any()):
                recent.append(flat[:, :, in_window])
                recent_pos.append(qp[in_window])
            rows = qp >= first_calib
            if calib is not None and bool(rows.any()):
                calib.add_(flat[:, :, rows].sum(2))
            if self.keep_last and q <= LAST_ROWS:
                lasts.append(flat)

        probs_in_chunks(query, key, self._q_pos, k_pos, scaling, slice(0, q), sink)
        self.accumulated = acc
        if calib is not None:
            self.calibration = calib
        self.last = torch.cat(lasts, dim=2) if lasts else None
        keep_query = self.keep_last and q > LAST_ROWS
        self.last_query = query if keep_query else None
        self.last_q_pos = self._q_pos if keep_query else None
        self.scaling = scaling
        self._enter_window(torch.cat(recent, dim=2), torch.cat(recent_pos), n)
        out = sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, **kwargs)
        return out

    def _record_step(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """`attend`'s statistics of a one-token decode step once calibration is over, in fewer
        operations, with the same values: the query comes after every key (no mask), is one row
        of the window, and the only row of ``last``."""
        n = key.shape[-2]
        probs = attention_probs(query, key, self._q_pos, None, scaling, causal=False)
        row = probs.flatten(1, 2)  # (B, H, 1, n)
        if self.accumulated is None:
            acc = torch.zeros(row.shape[0], row.shape[1], n, dtype=torch.float32, device=key.device)
        else:
            acc = torch.nn.functional.pad(self.accumulated, (0, n - self.accumulated.shape[-1]))
        acc.add_(row.sum(2))
        self.accumulated = acc
        self.last = row if self.keep_last else None
        self.last_query = self.last_q_pos = None
        self.scaling = scaling
        position = self.seen - 1
        if self.window_sum is None or self.ring is None or self.ring.shape[-1] < n:
            self._enter_window(row, self._q_pos, n)
            return
        total = torch.nn.functional.pad(self.window_sum, (0, n - self.window_sum.shape[-1]))
        slot = position % self.window
        total -= self.ring[:, :, slot, :n]  # the row leaving the window
        self.ring[:, :, slot, :n] = row[:, :, 0]
        self.ring[:, :, slot, n:] = 0.0
        total += row[:, :, 0]
        if slot == self.window - 1:
            total = self.ring[..., :n].sum(2)
        self.window_sum = total

    def crop_to(self, keep: int) -> None:
        """Forget every token from position ``keep`` on: keys, values and statistics. The
        attention that forgotten queries paid to kept keys stays in ``accumulated`` (the sum
        cannot be taken apart); the window loses the forgotten rows and refills as tokens come."""
        if keep >= self.seen:
            return
        if keep <= 0:
            self.__init__(  # type: ignore[misc]
                self.layer_idx, self.calibration_tokens, self.keep_last, self.window
            )
            return
        super().crop(keep - self.seen)
        old = self.seen
        self.seen = keep
        for name in ("accumulated", "calibration"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t[..., :keep].contiguous())
        self.last = self.last_query = self.last_q_pos = None
        if self.ring is not None:
            # out of place: a rollback may come outside the inference mode the rows were made in
            gone = torch.arange(max(keep, old - self.window), old, device=self.ring.device)
            ring = self.ring.index_fill(2, gone % self.window, 0.0)
            later = torch.arange(ring.shape[-1], device=ring.device) >= keep
            self.ring = ring.masked_fill(later, 0.0)
            self.window_sum = self.ring[..., :keep].sum(2)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat keys, values and every recorded statistic along the batch."""
        super().batch_repeat_interleave(repeats)
        for name in ("accumulated", "calibration", "last", "last_query", "ring", "window_sum"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.repeat_interleave(repeats, dim=0))

    def _enter_window(self, rows: torch.Tensor, positions: torch.Tensor, n: int) -> None:
        """Put the query rows ``(B, H, r, n)`` at ``positions`` into the window: each takes the
        slot of the row ``window`` positions before it, whose attention leaves the sum. Every
        ``window`` positions the sum is recomputed from the ring (no drift from the updates)."""
        b, h, _, _ = rows.shape
        if self.ring is None or self.ring.shape[-1] < n:
            cap = max(n + 256, n * 5 // 4)
            ring = rows.new_zeros(b, h, self.window, cap)
            if self.ring is not None:
                ring[..., : self.ring.shape[-1]] = self.ring
            self.ring = ring
        total = rows.new_zeros(b, h, n)
        if self.window_sum is not None:
            total[..., : self.window_sum.shape[-1]] = self.window_sum
        slots = positions % self.window
        total -= self.ring[:, :, slots, :n].sum(2)
        self.ring[:, :, slots, :n] = rows
        self.ring[:, :, slots, n:] = 0.0
        total += rows.sum(2)
        if int(positions[-1]) % self.window == self.window - 1:
            total = self.ring[..., :n].sum(2)
        self.window_sum = total


class ObservedCache(DynamicCache):
    """A full `DynamicCache` whose layers record attention (see `ObservedLayer`)."""

    layers: list[ObservedLayer]  # type: ignore[assignment]

    def __init__(
        self, calibration_tokens: int = 128, keep_last: bool = True, window: int = 32
    ) -> None:
        super().__init__()
        self.calibration_tokens = calibration_tokens
        self.keep_last = keep_last
        self.window = window
        self.layer_class_to_replicate = None  # layers are made here, with their index

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.layers) <= layer_idx:
            self.layers.append(
                ObservedLayer(
                    len(self.layers), self.calibration_tokens, self.keep_last, self.window
                )
            )
        return self.layers[layer_idx].update(key_states, value_states)

    def crop_to(self, keep: int) -> None:
        """Forget every token from position ``keep`` on (see `ObservedLayer.crop_to`)."""
        for layer in self.layers:
            layer.crop_to(keep)

    def crop(self, max_length: int) -> None:
        """transformers' crop (``-n`` removes ``n`` tokens), statistics cut too."""
        seen = self.get_seq_length()
        self.crop_to(seen + max_length if max_length < 0 else max_length)

    def reset(self) -> None:
        self.layers = []
