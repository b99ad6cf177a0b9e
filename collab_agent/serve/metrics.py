"""Prometheus metrics of one server (its own registry, so two apps in a process never clash)."""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from collab_agent.serve.limits import Admission

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_SHARE_BUCKETS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


class ServeMetrics:
    """Requests by status, in flight, queued, latency, time to first token, tokens by model,
    triggers fired, degraded steps and the small model's share of reasoning tokens."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, admission: Admission) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "collab_requests", "Chat completion requests by HTTP status.", ["status"], registry=r
        )
        in_flight = Gauge("collab_in_flight", "Conversations reasoning now.", registry=r)
        in_flight.set_function(lambda: admission.in_flight)
        queued = Gauge("collab_queue_length", "Requests waiting for a slot.", registry=r)
        queued.set_function(lambda: admission.queued)
        self.latency = Histogram(
            "collab_request_latency_seconds",
            "Whole request time.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "collab_time_to_first_token_seconds",
            "Time to the first streamed reasoning or answer text.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "collab_generated_tokens", "Generated tokens by model role.", ["model"], registry=r
        )
        self.triggers = Counter(
            "collab_triggers_fired", "Trigger firings by trigger.", ["trigger"], registry=r
        )
        self.degraded = Counter(
            "collab_degraded_steps",
            "Steps the small model wrote for an unreachable large one.",
            registry=r,
        )
        self.small_share = Histogram(
            "collab_small_token_share",
            "Share of reasoning tokens the small model wrote, per request.",
            buckets=_SHARE_BUCKETS,
            registry=r,
        )

    def record_trace(self, summary: dict[str, Any]) -> None:
        """Account a finished collaboration from its `Trace.summary`."""
        for role, usage in summary.get("usage", {}).items():
            self.tokens.labels(model=role).inc(usage.get("completion_tokens", 0))
        for trigger, count in summary.get("triggers", {}).items():
            self.triggers.labels(trigger=trigger).inc(count)
        self.degraded.inc(summary.get("degraded_steps", 0))
        self.small_share.observe(summary.get("small_token_share", 0.0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
