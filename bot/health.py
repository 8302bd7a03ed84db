"""The operator's HTTP port: Prometheus /metrics and a /healthz for supervisors.

Healthy means the bot can take turns: the database answers and at least one
adapter is connected. A model server that is down is reported, not unhealthy:
the bot still answers, with a clear error. No model is called; the answer is
cached for a moment so a busy prober costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from bot.metrics import Metrics

if TYPE_CHECKING:  # aiohttp is imported only when METRICS_PORT is set
    from aiohttp import web

    from adapters.base import Adapter
    from bot.service import ChatService
    from bot.settings import Settings

log = logging.getLogger(__name__)

CACHE_SECONDS = 1.5
CHECK_TIMEOUT = 2.0  # seconds each check may take before it counts as failed

Check = Callable[[], Awaitable[object]]


class Health:
    """Runs the checks at most once per CACHE_SECONDS; concurrent probes share a run."""

    def __init__(self, database: Check, model_server: Check,
                 adapters: Callable[[], dict[str, bool]], *,
                 cache_seconds: float = CACHE_SECONDS, metrics: Metrics | None = None) -> None:
        self._cache_seconds = cache_seconds
        self._metrics = metrics
        self._database = database
        self._model_server = model_server
        self._adapters = adapters
        self._cached: tuple[float, int, dict[str, Any]] | None = None
        self._lock = asyncio.Lock()

    async def report(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body)."""
        async with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] >= self._cache_seconds:
                code, body = await self._check()
                self._cached = (time.monotonic(), code, body)
            return self._cached[1], self._cached[2]

    async def _check(self) -> tuple[int, dict[str, Any]]:
        database, model = await asyncio.gather(_probe(self._database),
                                               _probe(self._model_server))
        adapters = self._adapters()
        if self._metrics is not None:
            self._metrics.database_up.set(database is None)
            self._metrics.model_server_up.set(model is None)
        healthy = database is None and any(adapters.values())
        body = {
            "status": "ok" if healthy else "unhealthy",
            "database": "ok" if database is None else f"error: {database}",
            "model_server": "ok" if model is None else "unreachable",
            "adapters": {name: "connected" if up else "disconnected"
                         for name, up in adapters.items()},
        }
        return (200 if healthy else 503), body


async def _probe(check: Check) -> str | None:
    """None when the check passed, else a short reason."""
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            await check()
    except TimeoutError:
        return f"no answer within {CHECK_TIMEOUT:g} s"
    except Exception as exc:
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    return None


def make_app(metrics: Metrics, health: Health) -> web.Application:
    from aiohttp import web
    from prometheus_client.aiohttp import make_aiohttp_handler

    async def healthz(request: web.Request) -> web.Response:
        code, body = await health.report()
        return web.Response(status=code, text=json.dumps(body), content_type="application/json")

    exposition = make_aiohttp_handler(metrics.registry)

    async def scrape(request: web.Request) -> web.StreamResponse:
        await health.report()  # the *_up gauges are as fresh as the health check
        return await exposition(request)

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    app.router.add_get("/healthz", healthz)
    return app


@contextlib.asynccontextmanager
async def serve(metrics: Metrics, health: Health, host: str, port: int) -> AsyncIterator[int]:
    """Serve /metrics and /healthz on host:port until the block ends; yields the port."""
    from aiohttp import web

    runner = web.AppRunner(make_app(metrics, health), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = int(runner.addresses[0][1])
        log.info("metrics and health on http://%s:%d/metrics and /healthz", host, bound)
        yield bound
    finally:
        await runner.cleanup()


def adapter_states(tasks: dict[asyncio.Task[None], Adapter]
                   ) -> Callable[[], dict[str, bool]]:
    """Connected: the adapter says so (Adapter.connected) and still runs."""
    def states() -> dict[str, bool]:
        return {adapter.name: adapter.connected and not task.done()
                for task, adapter in tasks.items()}
    return states


@contextlib.asynccontextmanager
async def operations(settings: Settings, service: ChatService,
                     tasks: dict[asyncio.Task[None], Adapter]) -> AsyncIterator[None]:
    """What runs beside the adapters: retention, and /metrics + /healthz if asked for."""
    from bot.retention import running_retention

    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(
            running_retention(service.store, settings.AUDIT_RETENTION_DAYS))
        if settings.METRICS_PORT:
            health = Health(service.store.applied_migrations, service.provider.list_models,
                            adapter_states(tasks), metrics=service.metrics)
            await stack.enter_async_context(
                serve(service.metrics, health, settings.METRICS_LISTEN, settings.METRICS_PORT))
        yield
