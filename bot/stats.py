"""Per-model figures from the audit log: `python -m bot stats` and `/stats`.

The database aggregates (storage.audit_queries.stats): nothing is loaded row
by row, and the event loop only formats a few lines.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bot.store import Store


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    # Rank ceil(n * q) in integers, as the SQL does: floats differ at some n.
    k = max(1, (len(values) * round(q * 100) + 99) // 100)
    return values[k - 1]


def compute_stats(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Exchanges, error rate, latency p50/p95, time to first token, tokens in/out."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["provider"], r["model"]), []).append(r)
    out = []
    for (provider, model), rs in sorted(groups.items()):
        ok = [r for r in rs if r["status"] == "ok"]
        latency = [r["response_time"] for r in ok if r["response_time"] is not None]
        ttft = [r["first_token_time"] for r in ok if r["first_token_time"] is not None]
        errors = sum(1 for r in rs if r["status"] == "error")
        out.append({
            "provider": provider,
            "model": model,
            "exchanges": len(rs),
            "errors": errors,
            "error_rate": errors / len(rs) if rs else 0.0,
            "latency_p50": _percentile(latency, 0.5),
            "latency_p95": _percentile(latency, 0.95),
            "ttft_p50": _percentile(ttft, 0.5),
            "ttft_p95": _percentile(ttft, 0.95),
            # None where no row had a count: unknown, not 0.
            "tokens_in": _known_sum(r["prompt_tokens"] for r in rs),
            "tokens_out": _known_sum(r["completion_tokens"] for r in rs),
            "tokens_unknown": sum(1 for r in rs if r["prompt_tokens"] is None),
            # The bot's own estimates for the rows the server sent no counts for.
            "est_tokens_in": _known_sum(r.get("est_prompt_tokens") for r in rs
                                        if r["prompt_tokens"] is None),
            "est_tokens_out": _known_sum(r.get("est_completion_tokens") for r in rs
                                         if r["completion_tokens"] is None),
        })
    return out


def _known_sum(values: Iterable[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _tokens(known: int | None, estimate: int | None, unknown: int) -> str:
    """`1234`, `unknown`, `~120 (est.)` or `1234 + ~120 (est.)`."""
    est = f"~{estimate} (est.)" if estimate is not None else ""
    if known is None:
        return est or "unknown"
    if unknown and est:
        return f"{known} + {est}"
    return str(known) + (" + unknown" if unknown else "")


async def store_stats(store: Store, since: str | None = None) -> list[dict[str, Any]]:
    """The same figures as compute_stats (to the millisecond), aggregated by the database:
    counts per model, and how many replies took each millisecond."""
    groups, histogram = await store.audit_stats(since)
    buckets: dict[tuple[str, str, str], list[tuple[int, int]]] = {}
    for h in histogram:
        buckets.setdefault((h["provider"], h["model"], h["metric"]), []).append(
            (int(h["ms"]), int(h["n"])))
    out = []
    for row in groups:
        exchanges, errors = int(row["exchanges"]), int(row["errors"])
        figures = {
            "provider": row["provider"], "model": row["model"],
            "exchanges": exchanges, "errors": errors,
            "error_rate": errors / exchanges if exchanges else 0.0,
        }
        for metric in ("latency", "ttft"):
            counts = buckets.get((row["provider"], row["model"], metric), [])
            for pct in (50, 95):
                figures[f"{metric}_p{pct}"] = _histogram_percentile(counts, pct)
        # None where no row had a count: unknown, not 0.
        figures["tokens_in"] = _int(row["tokens_in"])
        figures["tokens_out"] = _int(row["tokens_out"])
        figures["tokens_unknown"] = int(row["tokens_unknown"] or 0)
        # The bot's own estimates for the rows the server sent no counts for.
        figures["est_tokens_in"] = _int(row["est_tokens_in"])
        figures["est_tokens_out"] = _int(row["est_tokens_out"])
        out.append(figures)
    return out


def _histogram_percentile(counts: list[tuple[int, int]], pct: int) -> float | None:
    """The value at rank ceil(n * pct / 100) of (milliseconds, how many), in order."""
    total = sum(n for _, n in counts)
    if not total:
        return None
    rank = max(1, (total * pct + 99) // 100)
    seen = 0
    for ms, n in counts:
        seen += n
        if seen >= rank:
            return ms / 1000
    return counts[-1][0] / 1000


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


async def stats_report(store: Store, retention_days: int = 0) -> str:
    """The stats table, model time (replies beside summaries), then how far back the
    audit log reaches."""
    table = format_stats(await store_stats(store))
    model_time = format_model_time(await store.model_time())
    if model_time:
        table += "\n\n" + model_time
    return table + "\n" + reach_line(*await store.audit_span(), retention_days)


def reach_line(oldest: str | None, records: int, retention_days: int) -> str:
    kept = (f"records older than {retention_days} days are deleted daily"
            if retention_days else "kept without limit (AUDIT_RETENTION_DAYS=0)")
    if oldest is None:
        return f"Audit log: empty; {kept}."
    return f"Audit log: {records:,} records since {oldest}; {kept}."


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}s"


def format_stats(stats: list[dict[str, Any]]) -> str:
    """A plain table (monospace), one model a line."""
    if not stats:
        return "No exchanges yet."
    header = ("model", "exchanges", "error rate", "p50", "p95", "ttft p50", "tokens in",
              "tokens out")
    rows = [header] + [
        (
            f"{s['provider']}/{s['model']}", str(s["exchanges"]),
            f"{s['error_rate'] * 100:.1f}%", _s(s["latency_p50"]), _s(s["latency_p95"]),
            _s(s["ttft_p50"]),
            _tokens(s["tokens_in"], s["est_tokens_in"], s["tokens_unknown"]),
            _tokens(s["tokens_out"], s["est_tokens_out"], s["tokens_unknown"]),
        )
        for s in stats
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def format_model_time(rows: Iterable[dict[str, Any]]) -> str:
    """Model time per model, replies beside summaries: what the memory costs.

    `rows`: provider, model, kind, calls, seconds (Store.model_time).
    """
    table: dict[str, dict[str, tuple[int, float]]] = {}
    for r in rows:
        name = f"{r['provider']}/{r['model']}"
        table.setdefault(name, {})[r["kind"]] = (int(r["calls"]), float(r["seconds"] or 0.0))
    if not table:
        return ""

    def cell(kind_calls: tuple[int, float] | None) -> str:
        return "-" if kind_calls is None else f"{kind_calls[1]:.1f}s ({kind_calls[0]} calls)"

    out = [("model time", "replies", "summaries")] + [
        (name, cell(kinds.get("chat")), cell(kinds.get("summary")))
        for name, kinds in sorted(table.items())
    ]
    widths = [max(len(r[i]) for r in out) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in out)


def with_model_time(figures: list[dict[str, Any]],
                    rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The figures with reply_seconds, summary_seconds and summary_calls per model."""
    by_model = {(f["provider"], f["model"]): f for f in figures}
    for f in figures:
        f.update(reply_seconds=0.0, summary_seconds=0.0, summary_calls=0)
    for r in rows:
        f = by_model.get((r["provider"], r["model"]))
        if f is None:
            continue
        if r["kind"] == "summary":
            f["summary_seconds"] += float(r["seconds"] or 0.0)
            f["summary_calls"] += int(r["calls"])
        else:
            f["reply_seconds"] += float(r["seconds"] or 0.0)
    return figures
