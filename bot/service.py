"""The conversation service: the one entry point every adapter drives.

An incoming message goes in; a stream of Markdown deltas comes out. The
service checks access and rate limits, runs commands, keeps each
conversation strictly in order, caps concurrent model calls, trims the
history to the window, streams the model's reply, and stores the exchange
with its audit record in one transaction. A failed turn is never history.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator

from bot.commands import KNOWN, help_text, parse_command
from bot.llm_call import CallCancelled, CallLimits, stream_reply
from bot.logging_setup import RedactSecrets
from bot.memory import Summarizer
from bot.messages import Incoming, ModelChoices
from bot.metrics import Metrics
from bot.models import ModelCatalog
from bot.ordering import ConversationOrder
from bot.prompt import Prompt, TooLong, build_prompt
from bot.providers.base import Provider, ProviderError, Usage
from bot.retention import trim_summary_record
from bot.sanitize import clean_text, is_blank, storable
from bot.settings import Settings
from bot.stats import stats_report
from bot.tokens import Calibration, count_tokens
from storage.base import AuditRecord, ConversationRef, StorageError, Store

log = logging.getLogger(__name__)
exchange_log = logging.getLogger("bot.exchange")

HISTORY_LOAD_LIMIT = 400  # at most this many messages are loaded for one prompt
SHUTDOWN_NOTE = "\n\n_(reply cut off: the bot is restarting)_"


class ChatService:
    """Thin adapters call `handle`; everything else lives below it."""

    def __init__(self, settings: Settings, store: Store, provider: Provider) -> None:
        self.settings = settings
        self.store = store
        self.provider = provider
        self.catalog = ModelCatalog(settings, provider, store)
        self.calibration = Calibration()
        # History is re-counted every turn; a bounded memo makes that cheap.
        self.count_tokens = functools.lru_cache(maxsize=50_000)(count_tokens)
        self._order = ConversationOrder()
        self._slots = asyncio.Semaphore(settings.LLM_CONCURRENCY)
        self._calls: set[asyncio.Task[None]] = set()  # model calls in flight
        self._turns = 0  # turns in flight
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._rate_notified: dict[str, float] = {}  # user → until when told
        self._redact = RedactSecrets(settings.secrets()).redact
        self.memory = Summarizer(settings, store, provider, self._calls, self._audit)
        self._waiting = 0  # turns waiting for a model slot
        self.metrics = Metrics()
        self.metrics.watch(lambda: self._turns, lambda: self._waiting)

    # -- what adapters call
    def conversation_ref(self, msg: Incoming) -> ConversationRef:
        """Platform + user + place (or platform + user with MEMORY_SCOPE=user)."""
        if self.settings.MEMORY_SCOPE == "user":
            place = "*"
        else:
            place = msg.place_id if msg.place_id is not None else "dm"
        key = f"{msg.platform}:{msg.user_id}@{place}"
        return ConversationRef(key=key, platform=msg.platform, user_id=msg.user_id, place=place)

    def help_text(self, model: str | None = None) -> str:
        return help_text(model or self.settings.LLM_MODEL)

    async def model_choices(self, msg: Incoming) -> ModelChoices:
        current = await self.catalog.current(msg.platform, msg.user_id)
        return ModelChoices(current=current, available=await self.catalog.available())

    def is_admin(self, msg: Incoming) -> bool:
        # The console is the operator's own terminal.
        return msg.platform == "console" or msg.user_key in self.settings.admin_users

    async def handle(self, msg: Incoming) -> AsyncIterator[str]:
        """Answer one message: Markdown deltas; no deltas means say nothing."""
        text = clean_text(msg.text)
        if not self._allowed(msg):
            await self._reject(msg, text, "not allowed")
            if msg.is_direct:
                yield "Sorry, this bot is private."
            return
        wait = await self._rate_wait(msg)
        if wait:
            await self._reject(msg, text, "rate limited")
            if self._first_notice(msg.user_key, wait):
                yield (f"You're sending messages too fast. Please try again in "
                       f"{max(1, round(wait))} seconds.")
            return
        command = parse_command(text)
        if command is not None:
            yield await self._command(msg, *command)
            return
        if is_blank(text):
            yield "Send me some text and I'll answer. /help lists what I can do."
            return
        if len(text) > self.settings.MAX_INPUT_CHARS:
            await self._reject(msg, text[:200], f"input {len(text)} chars")
            yield (f"That message is {len(text):,} characters long; the limit is "
                   f"{self.settings.MAX_INPUT_CHARS:,}. Please send something shorter.")
            return
        if self._closing:
            yield "The bot is restarting. Please send that again in a minute."
            return
        async with contextlib.aclosing(self._chat(msg, text)) as deltas:
            async for delta in deltas:
                yield delta

    async def aclose(self) -> None:
        """Stop background work and release the provider's connections."""
        await self.memory.cancel_all()
        with contextlib.suppress(Exception):
            await self.provider.close()

    async def shutdown(self, grace: float) -> None:
        """Let turns in flight finish for `grace` seconds, then stop them."""
        self._closing = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._idle.wait()
        for task in list(self._calls):
            task.cancel()
        await self.memory.cancel_all()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await self._idle.wait()

    # -- checks
    def _allowed(self, msg: Incoming) -> bool:
        s = self.settings
        if s.allowed_users and msg.user_key not in s.allowed_users and not self.is_admin(msg):
            return False
        return not (s.allowed_places and msg.place_id is not None
                    and f"{msg.platform}:{msg.place_id}" not in s.allowed_places)

    async def _rate_wait(self, msg: Incoming) -> float:
        limit = self.settings.RATE_LIMIT_PER_MINUTE
        if not limit or msg.platform == "console":
            return 0.0
        try:
            return await self.store.rate_hit(msg.user_key, limit, 60)
        except Exception:
            # A limiter that can't count must not silence everyone; the turn
            # itself will report a database that is really gone.
            log.warning("rate limit check failed; letting the message through", exc_info=True)
            return 0.0

    def _first_notice(self, user_key: str, wait: float) -> bool:
        """One 'too fast' reply per window, not one per extra message."""
        now = time.monotonic()
        if self._rate_notified.get(user_key, 0.0) > now:
            return False
        if len(self._rate_notified) > 10_000:  # forget windows that are over
            self._rate_notified = {k: v for k, v in self._rate_notified.items() if v > now}
        self._rate_notified[user_key] = now + wait
        return True

    async def _reject(self, msg: Incoming, text: str, reason: str) -> None:
        ref = self.conversation_ref(msg)
        await self._audit(AuditRecord(
            platform=msg.platform, user_id=msg.user_id, chat_id=msg.chat_id,
            conversation=ref.key, user_input=text, status="rejected", error=reason,
            provider=self.provider.name,
        ))

    async def _audit(self, record: AuditRecord) -> None:
        # A model server's error may quote the key it was sent (some proxies
        # do); `python -m bot logs` prints this field, so no secret goes in.
        record.error = self._redact(record.error)
        self._observe(record)
        try:
            await self.store.save_audit(record)
        except Exception:
            self.metrics.storage_error()
            log.exception("could not write the audit record")

    def _observe(self, record: AuditRecord) -> None:
        """Metrics of a record about to be written; summaries keep only a prompt head."""
        trim_summary_record(record)
        self.metrics.record(record)

    @contextlib.asynccontextmanager
    async def _model_slot(self) -> AsyncIterator[None]:
        """One of LLM_CONCURRENCY model slots, counting the turns that wait for one."""
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            yield
        finally:
            self._slots.release()

    # -- commands
    async def _command(self, msg: Incoming, name: str, args: str) -> str:
        if name not in KNOWN:
            return f"I don't know /{name[:32]}. " + self.help_text()
        ref = self.conversation_ref(msg)
        try:
            if name in ("help", "start"):
                return self.help_text(await self.catalog.current(msg.platform, msg.user_id))
            if name == "reset":
                async with self._order.turn(ref.key), \
                        self.store.conversation_lock(ref.key, self.settings.LLM_TIMEOUT):
                    conv = await self.store.conversation_id(ref)
                    removed = await self.store.reset_conversation(conv)
                return (f"Done: I forgot this conversation ({removed} messages). "
                        "New start!")
            if name == "model":
                return await self._model_command(msg, args)
            if name == "memory":
                return await self._memory_report(msg, ref)
            if name == "stats":
                if not self.is_admin(msg):
                    return "Only the bot's admins can see /stats."
                return "```\n" + await stats_report(
                    self.store, self.settings.AUDIT_RETENTION_DAYS) + "\n```"
        except Exception:
            log.exception("command /%s failed", name)
            return "Sorry, that didn't work because of a problem on my side. Please try again."
        return self.help_text()

    async def _model_command(self, msg: Incoming, args: str) -> str:
        choices = await self.model_choices(msg)
        listing = ", ".join(f"`{m}`" for m in choices.available)
        if not args:
            return (f"Your model: `{choices.current}`\nYou may pick: {listing}\n"
                    "Pick one with /model NAME")
        picked = await self.catalog.resolve(args)
        if picked is None:
            shown = args[:64].replace("`", "'")
            return f"There's no model called `{shown}` here. You may pick: {listing}"
        await self.store.set_user_model(msg.platform, msg.user_id, picked)
        return f"Done: your model is now `{picked}`."

    async def _memory_report(self, msg: Incoming, ref: ConversationRef) -> str:
        conv = await self.store.conversation_id(ref)
        stored = await self.store.count_messages(conv)
        summary = await self.store.summary(conv) \
            if self.settings.MEMORY_STRATEGY == "summarize" else None
        model = await self.catalog.current(msg.platform, msg.user_id)
        history = await self.store.recent_messages(
            conv, self._load_limit(), after_id=summary.upto_id if summary else 0)
        prompt = build_prompt(self.settings.SYSTEM_PROMPT, history, "", self.settings.prompt_budget,
                              summary=summary.text if summary else None,
                              factor=self.calibration.factor(model), counter=self.count_tokens)
        lines = [f"Stored messages in this conversation: {stored}",
                 f"Messages that fit the context window now: {prompt.history_used}"]
        if summary:
            lines += [f"Summary (covers the older messages):\n{summary.text}"]
        elif self.settings.MEMORY_STRATEGY == "summarize":
            lines += ["Summary: none yet (written once the history outgrows the window)."]
        else:
            lines += ["Older messages beyond the window are dropped (MEMORY_STRATEGY=truncate)."]
        return "\n".join(lines)

    def _load_limit(self) -> int:
        # A stored message costs at least 5 tokens in a prompt: never load
        # more than could possibly fit.
        return min(HISTORY_LOAD_LIMIT, self.settings.prompt_budget // 5 + 1)

    # -- a chat turn
    async def _chat(self, msg: Incoming, text: str) -> AsyncIterator[str]:
        s = self.settings
        ref = self.conversation_ref(msg)
        audit = AuditRecord(
            platform=msg.platform, user_id=msg.user_id, chat_id=msg.chat_id,
            conversation=ref.key, user_input=text, provider=self.provider.name,
        )
        received = time.monotonic()
        self._turn_started()
        try:
            async with self._order.turn(ref.key), \
                    self.store.conversation_lock(ref.key, s.LLM_TIMEOUT + s.LLM_STALL_TIMEOUT):
                async with contextlib.aclosing(
                        self._chat_locked(msg, text, ref, audit, received)) as deltas:
                    async for delta in deltas:
                        yield delta
        except StorageError as exc:
            # Only taking the conversation's lock raises here (another process
            # is still answering this conversation); the turn itself handles
            # its own storage errors.
            log.warning("conversation %s busy: %s", ref.key, exc)
            audit.status, audit.error = "error", f"busy: {exc}"
            await self._audit(audit)
            yield "I'm still answering your previous message. Please try again in a moment."
        finally:
            self._turn_ended()

    async def _chat_locked(self, msg: Incoming, text: str, ref: ConversationRef,
                           audit: AuditRecord, received: float) -> AsyncIterator[str]:
        s = self.settings
        try:
            conv = await self.store.conversation_id(ref)
            context = await self.store.turn_context(
                conv, msg.platform, msg.user_id, self._load_limit(),
                with_summary=s.MEMORY_STRATEGY == "summarize")
            model = audit.model = self.catalog.choose(context.model_choice)
            summary, history = context.summary, context.history
        except Exception as exc:
            log.exception("storage failed before the model call")
            audit.status, audit.error = "error", f"storage: {type(exc).__name__}: {exc}"
            await self._audit(audit)
            yield "Sorry, I can't reach my memory right now. Please try again in a moment."
            return
        factor = self.calibration.factor(model)
        try:
            prompt = build_prompt(s.SYSTEM_PROMPT, history, text, self.settings.prompt_budget,
                                  summary=summary.text if summary else None, factor=factor,
                                  counter=self.count_tokens)
        except TooLong as exc:
            audit.status = "rejected"
            audit.error = f"prompt {exc.tokens} tokens > budget"
            await self._audit(audit)
            yield (f"That message is about {exc.tokens:,} tokens long; the most I can take "
                   f"is about {exc.limit:,}. Please send something shorter.")
            return
        audit.history_messages = prompt.history_used
        audit.summary_used = prompt.summary_used
        parts: list[str] = []
        usage: Usage | None = None
        status = "ok"
        try:
            async with self._model_slot():
                if self._closing:
                    raise CallCancelled()
                call_started = time.monotonic()
                async for item in stream_reply(
                    self.provider, model, prompt.messages,
                    num_ctx=s.CONTEXT_TOKENS, max_tokens=s.REPLY_TOKENS,
                    limits=CallLimits(s.LLM_TIMEOUT, s.LLM_STALL_TIMEOUT, s.LLM_RETRIES),
                    running=self._calls,
                ):
                    if isinstance(item, Usage):
                        usage = item
                        continue
                    if not parts:
                        audit.first_token_time = time.monotonic() - call_started
                    parts.append(item)
                    yield item
        except ProviderError as exc:
            status = "error"
            audit.error = exc.detail
            log.warning("model call failed for %s: %s", ref.key, exc.detail)
            yield ("\n\n⚠️ " if parts else "⚠️ ") + exc.user_message
        except CallCancelled:
            status = "cancelled"
            audit.error = "shutdown"
            yield SHUTDOWN_NOTE if parts else "The bot is restarting. Please send that again."
        except (GeneratorExit, asyncio.CancelledError):
            # The adapter stopped listening (shutdown, or the chat went away).
            audit.status, audit.error = "cancelled", "reply abandoned"
            audit.model_response = storable("".join(parts))
            audit.response_time = time.monotonic() - received
            with contextlib.suppress(BaseException):
                await asyncio.shield(self._audit(audit))
            raise
        audit.model_response = storable("".join(parts))
        audit.error = storable(audit.error)
        audit.response_time = time.monotonic() - received
        if usage is not None:
            audit.prompt_tokens, audit.completion_tokens = usage.prompt_tokens, \
                usage.completion_tokens
        if status == "ok" and not audit.model_response.strip():
            status, audit.error = "error", "empty reply"
            yield "⚠️ The model returned an empty reply. Please try again."
        audit.status = status
        if status != "ok":
            await self._audit(audit)
            self._log_exchange(audit)
            return
        try:
            await self.store.save_exchange(conv, text, audit.model_response, audit)
        except Exception as exc:
            log.exception("could not store the exchange of %s", ref.key)
            audit.status, audit.error = "error", f"storage: {type(exc).__name__}: {exc}"
            await self._audit(audit)
            yield "\n\n⚠️ I couldn't save this exchange, so I won't remember it."
            return
        self._observe(audit)
        self._log_exchange(audit)
        if usage and usage.prompt_tokens:
            self.calibration.observe(model, round(prompt.tokens / factor), usage.prompt_tokens)
        self._maybe_summarize(conv, ref, msg, model, prompt, len(history))

    def _maybe_summarize(self, conv: int, ref: ConversationRef, msg: Incoming, model: str,
                         prompt: Prompt, loaded: int) -> None:
        """Summarise once the history no longer fits (the summariser picks what)."""
        if self.settings.MEMORY_STRATEGY != "summarize" or self._closing:
            return
        full = prompt.dropped > 0 or loaded >= self._load_limit()
        if full or prompt.tokens > self.settings.prompt_budget * 3 // 4:
            self.memory.schedule(conv, ref, msg.chat_id, model)

    def _log_exchange(self, audit: AuditRecord) -> None:
        if exchange_log.isEnabledFor(logging.INFO):
            exchange_log.info(
                "exchange %s %s %s %.2fs", audit.status, audit.conversation, audit.model,
                audit.response_time or 0.0, extra={"exchange": audit.as_dict()})

    def _turn_started(self) -> None:
        self._turns += 1
        self._idle.clear()

    def _turn_ended(self) -> None:
        self._turns -= 1
        if self._turns == 0:
            self._idle.set()
