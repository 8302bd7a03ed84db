"""Prometheus metrics of one running bot, in its own CollectorRegistry.

Labels stay bounded: platform, model, status, kind. Never a user, chat or
conversation id (each would make a new time series per user).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from bot.records import AuditRecord

# Seconds: a reply takes from a fraction of a second to a few minutes.
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60, 120, 300)
FIRST_TOKEN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 60, 120)


def refusal_kind(reason: str) -> str:
    """A bounded name for why a message was refused (the audit error is free text)."""
    if reason.startswith("rate limited"):
        return "rate_limited"
    if reason.startswith("not allowed"):
        return "not_allowed"
    if reason.startswith(("input ", "prompt ")):
        return "too_long"
    return "other"


class Metrics:
    """What the service counts; `registry` is served at /metrics."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(f"memorybot_{name}", doc, labels, registry=r)

        def histogram(name: str, doc: str, buckets: tuple[float, ...],
                      *labels: str) -> Histogram:
            return Histogram(f"memorybot_{name}", doc, labels, buckets=buckets, registry=r)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"memorybot_{name}", doc, registry=r)

        self.exchanges = counter("exchanges", "Chat exchanges, by how they ended",
                                 "platform", "model", "status")
        self.reply_seconds = histogram(
            "reply_seconds", "Seconds from a message to its whole stored reply",
            LATENCY_BUCKETS, "model")
        self.first_token_seconds = histogram(
            "first_token_seconds", "Seconds from the model call to its first text",
            FIRST_TOKEN_BUCKETS, "model")
        self.tokens = counter("tokens", "Tokens the model server counted, prompt or completion",
                              "model", "kind")
        self.background_calls = counter(
            "background_calls", "Summary and recall calls to the model server",
            "kind", "model", "status")
        self.background_seconds = histogram(
            "background_call_seconds", "Seconds a summary or recall call took",
            LATENCY_BUCKETS, "kind")
        self.refused = counter("refused_messages", "Messages refused before the model",
                               "platform", "kind")
        self.storage_errors = counter("storage_errors", "Failed database reads or writes")
        self.in_flight = gauge("replies_in_flight", "Turns being answered now")
        self.waiting = gauge("turns_waiting_for_model", "Turns waiting for a model slot")
        # Set by the health check, which every scrape of /metrics runs (cached).
        self.model_server_up = gauge("model_server_up",
                                     "1 if the model server answered its last check")
        self.database_up = gauge("database_up", "1 if the database answered its last check")

    def watch(self, in_flight: Callable[[], float], waiting: Callable[[], float]) -> None:
        """Gauges read at scrape time from the service's own counts."""
        self.in_flight.set_function(in_flight)
        self.waiting.set_function(waiting)

    def record(self, audit: AuditRecord) -> None:
        """Count one audit record as it is written (every turn and call writes one)."""
        model = audit.model or "none"
        if audit.error.startswith("storage:"):
            self.storage_errors.inc()
        if audit.kind != "chat":
            self.observe_call(audit.kind, model, audit.status, audit.response_time)
            self._tokens(audit, model)
            return
        if audit.status == "rejected":
            self.refused.labels(audit.platform, refusal_kind(audit.error)).inc()
        self.exchanges.labels(audit.platform, model, audit.status).inc()
        if audit.status == "ok":
            if audit.response_time is not None:
                self.reply_seconds.labels(model).observe(audit.response_time)
            if audit.first_token_time is not None:
                self.first_token_seconds.labels(model).observe(audit.first_token_time)
        self._tokens(audit, model)

    def observe_call(self, kind: str, model: str, status: str, seconds: float | None) -> None:
        """A summary, recall or embedding call (recall may call this directly)."""
        self.background_calls.labels(kind, model, status).inc()
        if seconds is not None:
            self.background_seconds.labels(kind).observe(seconds)

    def storage_error(self) -> None:
        self.storage_errors.inc()

    def _tokens(self, audit: AuditRecord, model: str) -> None:
        if audit.prompt_tokens:
            self.tokens.labels(model, "prompt").inc(audit.prompt_tokens)
        if audit.completion_tokens:
            self.tokens.labels(model, "completion").inc(audit.completion_tokens)
