"""Which models a user may pick, and which one each user has."""

from __future__ import annotations

import logging
import time

from bot.providers.base import Provider, ProviderError
from bot.settings import Settings
from bot.store import Store

log = logging.getLogger(__name__)


def _norm(name: str) -> str:
    return name.removesuffix(":latest")


class ModelCatalog:
    """LLM_MODELS, or what the provider lists (cached for a minute)."""

    def __init__(self, settings: Settings, provider: Provider, store: Store,
                 ttl: float = 60.0) -> None:
        self._settings = settings
        self._provider = provider
        self._store = store
        self._ttl = ttl
        self._cached: tuple[str, ...] = ()
        self._cached_at = float("-inf")

    @property
    def default(self) -> str:
        return self._settings.LLM_MODEL

    async def available(self) -> tuple[str, ...]:
        if self._settings.models:
            return self._settings.models
        if time.monotonic() - self._cached_at < self._ttl and self._cached:
            return self._cached
        try:
            listed = await self._provider.list_models()
        except ProviderError as exc:
            log.warning("cannot list models: %s", exc.detail)
            return self._cached or (self.default,)
        self._cached = tuple(dict.fromkeys(_norm(n) for n in listed if n)) or (self.default,)
        self._cached_at = time.monotonic()
        return self._cached

    async def resolve(self, name: str) -> str | None:
        """The catalog's spelling of `name`, or None if it may not be picked."""
        wanted = _norm(name.strip())
        for candidate in await self.available():
            if _norm(candidate) == wanted:
                return candidate
        lowered = wanted.lower()
        for candidate in await self.available():
            if _norm(candidate).lower() == lowered:
                return candidate
        return None

    async def current(self, platform: str, user_id: str) -> str:
        return self.choose(await self._store.user_model(platform, user_id))

    def choose(self, chosen: str | None) -> str:
        """The user's pick while LLM_MODELS still offers it, else the default."""
        if chosen and (not self._settings.models or chosen in self._settings.models):
            return chosen
        return self.default
