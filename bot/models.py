"""Which models a user may pick, which one each user has, and each model's own window."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from bot.i18n import Translator
from bot.providers.base import ModelInfo, Provider, ProviderError
from bot.settings import Settings
from bot.store import Store
from bot.tokens import CJK_DEFAULT, Calibration, TokenFactors

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


@dataclass(frozen=True, slots=True)
class Window:
    """One model's limits for a call: num_ctx, the reply limit and the prompt budget."""

    num_ctx: int
    reply: int
    budget: int
    info: ModelInfo


class ModelWindows:
    """Each model's real window and token correction, asked once and remembered.

    The window is the smallest of CONTEXT_TOKENS, what the server reports
    (Ollama /api/show, vLLM /v1/models, llama.cpp /props) and what a
    too-long refusal taught (kept in the database across restarts, as is
    the per-model token correction).
    """

    def __init__(self, settings: Settings, provider: Provider, store: Store,
                 calibration: Calibration) -> None:
        self._settings = settings
        self._provider = provider
        self._store = store
        self.calibration = calibration
        self._info: dict[str, ModelInfo] = {}
        self._learned: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._saved: dict[str, TokenFactors] = {}  # what the database has
        self._saved_at: dict[str, float] = {}
        self._writes: set[asyncio.Task[None]] = set()
        self.save_every = 10.0  # seconds

    async def _load(self, model: str) -> ModelInfo:
        if model in self._info:
            return self._info[model]
        lock = self._locks.setdefault(model, asyncio.Lock())
        async with lock:  # one look-up per model, however many turns wait
            if model in self._info:
                return self._info[model]
            # The database and the server are asked at once: this is on the
            # first turn's path.
            row, info = await asyncio.gather(self._stored(model),
                                             self._provider.model_info(model))
            if row:
                if row.get("learned_window"):
                    self._learned[model] = int(row["learned_window"])
                if row.get("token_factor") and not self.calibration.known(model):
                    stored = TokenFactors(float(row["token_factor"]),
                                          float(row.get("cjk_factor") or CJK_DEFAULT))
                    self.calibration.set(model, stored)
                    self._saved[model] = stored
            if len(self._info) < 1000:
                self._info[model] = info
            if info.context_length and (not row or row.get("context_length")
                                        != info.context_length):
                self._save_later(model, context_length=info.context_length)
            return info

    async def _stored(self, model: str) -> dict[str, Any] | None:
        try:
            return await self._store.model_info(model)
        except Exception:
            log.warning("cannot read what is known about %s", model, exc_info=True)
            return None

    def _save_later(self, model: str, **fields: float | int | None) -> None:
        """Write beside the turn, not in its way (a cache: losing one write is harmless)."""
        task = asyncio.create_task(self._save(model, **fields))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def flush(self) -> None:
        """Wait for the writes in flight (before the store closes)."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    async def window(self, model: str) -> Window:
        info = await self._load(model)
        s = self._settings
        n = min(x for x in (s.CONTEXT_TOKENS, info.context_length, self._learned.get(model))
                if x)
        # A small window keeps at least three quarters for the prompt.
        reply = min(s.REPLY_TOKENS, max(16, n // 4)) if s.REPLY_TOKENS > n // 2 \
            else s.REPLY_TOKENS
        return Window(num_ctx=n, reply=reply, budget=n - reply, info=info)

    async def factors(self, model: str) -> TokenFactors:
        await self._load(model)
        return self.calibration.factors(model)

    async def learn_window(self, model: str, window: int) -> None:
        """The server refused a prompt as too long for `window` tokens: remember it."""
        if window <= 0 or self._learned.get(model) == window:
            return
        self._learned[model] = window
        log.warning("model %s: its real window is %d tokens; prompts are fitted to it",
                    model, window)
        await self._save(model, learned_window=window)

    async def observe(self, model: str, messages: list[dict[str, str]],
                      reported: int | None,
                      measured: tuple[int, float] | None = None) -> None:
        """Correct the token estimate from the server's count, and keep it
        (`measured`: the prompt's own measure, Prompt.measured, if known)."""
        moved = self.calibration.observe(model, messages, reported, measured)
        if moved is None:
            return
        # Written when it moved by more than 2% since the last write, and at
        # most every SAVE_EVERY seconds: a turn's own writes come first.
        saved = self._saved.get(model)
        if saved is not None and abs(moved.factor - saved.factor) <= 0.02 * saved.factor \
                and abs(moved.cjk - saved.cjk) <= 0.02 * saved.cjk:
            return
        now = time.monotonic()
        if now - self._saved_at.get(model, float("-inf")) < self.save_every:
            return
        self._saved[model], self._saved_at[model] = moved, now
        self._save_later(model, token_factor=moved.factor, cjk_factor=moved.cjk)

    async def _save(self, model: str, **fields: float | int | None) -> None:
        try:
            await self._store.save_model_info(model, **fields)
        except Exception:
            log.warning("cannot store what was learned about %s", model, exc_info=True)

    async def describe(self, model: str, tr: Translator | None = None) -> str:
        """`window 8,192 tokens, 3.2B, Q4_K_M` as far as the server says (in `tr`'s words)."""
        w = await self.window(model)
        window = tr.gettext("window {tokens:,} tokens", tokens=w.num_ctx) if tr is not None \
            else f"window {w.num_ctx:,} tokens"
        parts = [window]
        if w.info.parameter_size:
            parts.append(w.info.parameter_size)
        if w.info.quantization:
            parts.append(w.info.quantization)
        return ", ".join(parts)
