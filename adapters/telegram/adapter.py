"""Telegram, through python-telegram-bot's Application (long polling or webhook).

The adapter only translates: an addressed update becomes an `Incoming`, the
core's Markdown stream is shown through the shared StreamRenderer (typing,
throttled edits, 4096-unit splits, plain-text fallback), and `/model` gets an
inline keyboard built from `service.model_choices`. Commands themselves,
memory, access and ordering are the core's. Updates are handled concurrently
(the core keeps one conversation in order), flood control is the
AIORateLimiter's, and a failing update costs its chat one short apology while
the detail goes to the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from urllib.parse import urlsplit

from telegram import BotCommand, CallbackQuery, Chat, Message, Update, User
from telegram.constants import ChatType
from telegram.error import InvalidToken, TelegramError
from telegram.ext import (
    AIORateLimiter,
    Application,
    CallbackQueryHandler,
    ContextTypes,
    MessageHandler,
    filters,
)

from adapters.telegram.addressing import BotIdentity, addressed_text
from adapters.telegram.log_secrets import secrets_kept_out_of_logs
from adapters.telegram.menu import decode_choice, model_keyboard, resolve_choice
from adapters.telegram.pacing import ChatPacer
from adapters.telegram.sink import TelegramSink
from bot.commands import COMMANDS, KNOWN, parse_command
from bot.messages import Incoming
from bot.render import FormattingRejected, StreamRenderer, utf16_len
from bot.service import ChatService
from bot.settings import Settings, SettingsError

log = logging.getLogger(__name__)

MESSAGE_LIMIT = 4096  # UTF-16 code units, after entity parsing
ALLOWED_UPDATES = (Update.MESSAGE, Update.CALLBACK_QUERY)
POLL_TIMEOUT = 10  # seconds a getUpdates long poll may wait for news
SORRY = "Sorry, something went wrong while answering. Please try again."
DRAIN_EXTRA = 5.0  # seconds, beyond SHUTDOWN_GRACE, before replies still running are cancelled
CANCEL_WAIT = 2.0  # seconds for cancelled replies to unwind
_SECRET_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")


def file_url_for(base_url: str) -> str:
    """The file URL of a Bot API server: …/bot → …/file/bot."""
    cut = base_url.rfind("/bot")
    if cut < 0:
        return base_url.rstrip("/") + "/file/bot"
    return f"{base_url[:cut]}/file{base_url[cut:]}"


def default_rate_limiter() -> AIORateLimiter:
    # Telegram's documented limits: ~30 messages/s overall, 20/min in one group.
    # A 429 makes the limiter pause everything for retry_after, then retry.
    return AIORateLimiter(overall_max_rate=30, overall_time_period=1,
                          group_max_rate=20, group_time_period=60, max_retries=5)


class TelegramAdapter:
    """`await TelegramAdapter(settings).run(service, stop)` answers until `stop` is set."""

    name = "telegram"

    def __init__(self, settings: Settings) -> None:
        token = settings.TELEGRAM_TOKEN.get_secret_value() if settings.TELEGRAM_TOKEN else ""
        if not token:
            raise SettingsError("TELEGRAM_TOKEN is empty")
        self._webhook_secret = ""
        if settings.TELEGRAM_WEBHOOK_URL:
            secret = settings.TELEGRAM_WEBHOOK_SECRET
            self._webhook_secret = secret.get_secret_value() if secret else ""
            if not self._webhook_secret:
                raise SettingsError("TELEGRAM_WEBHOOK_SECRET is required when "
                                    "TELEGRAM_WEBHOOK_URL is set (requests without it are "
                                    "refused)")
            if not _SECRET_TOKEN.fullmatch(self._webhook_secret):
                raise SettingsError("TELEGRAM_WEBHOOK_SECRET=<hidden>: allowed: 1-256 "
                                    "characters A-Z, a-z, 0-9, _ and -")
        self._settings = settings
        self._token = token
        self._service: ChatService | None = None
        self._me = BotIdentity(0, "")
        self._inflight: set[asyncio.Task[object]] = set()
        self._pacer = ChatPacer(settings.STREAM_EDIT_INTERVAL)

    # ------------------------------------------------------------------ lifecycle

    async def run(self, service: ChatService, stop: asyncio.Event) -> None:
        self._service = service
        secrets = [self._token, *([self._webhook_secret] if self._webhook_secret else [])]
        with secrets_kept_out_of_logs(secrets):
            app = self._build_application()
            try:
                await app.initialize()
            except InvalidToken:
                # PTB's own message quotes the token.
                raise SettingsError("TELEGRAM_TOKEN was refused by the Bot API server "
                                    "(401 Unauthorized)") from None
            except TelegramError as exc:
                server = urlsplit(self._settings.TELEGRAM_BASE_URL or "https://api.telegram.org")
                raise ConnectionError(f"cannot reach the Telegram Bot API at {server.netloc}: "
                                      f"{exc}") from None
            try:
                self._me = BotIdentity(app.bot.id, app.bot.username)
                await self._register_commands(app)
                await app.start()
                await self._start_receiving(app)
                log.info("telegram: answering as @%s (%s)", self._me.username,
                         "webhook" if self._webhook_secret else "long polling")
                await stop.wait()
                log.info("telegram: stopping")
                await app.updater.stop()
                await self._finish_in_flight(app)
            finally:
                if app.updater.running:
                    await app.updater.stop()
                if app.running:
                    await app.stop()
                await app.shutdown()

    def _build_application(self) -> Application:
        builder = (
            Application.builder()
            .token(self._token)
            .concurrent_updates(True)
            .rate_limiter(default_rate_limiter())
            .connect_timeout(10).read_timeout(30).write_timeout(30).pool_timeout(10)
        )
        base = self._settings.TELEGRAM_BASE_URL
        if base:
            builder = builder.base_url(base).base_file_url(file_url_for(base))
        app = builder.build()
        app.add_handler(MessageHandler(filters.UpdateType.MESSAGE, self._on_message))
        app.add_handler(CallbackQueryHandler(self._on_button))
        app.add_error_handler(self._on_error)
        return app

    async def _register_commands(self, app: Application) -> None:
        commands = [BotCommand("start", "Start: what this bot does"),
                    *(BotCommand(name, desc) for name, desc in COMMANDS)]
        try:
            await app.bot.set_my_commands(commands)
        except TelegramError as exc:  # a menu is a nicety; answering matters more
            log.warning("telegram: setMyCommands failed: %s", exc)

    async def _start_receiving(self, app: Application) -> None:
        updater = app.updater
        assert updater is not None
        s = self._settings
        if not s.TELEGRAM_WEBHOOK_URL:
            await updater.start_polling(timeout=POLL_TIMEOUT,
                                        allowed_updates=list(ALLOWED_UPDATES))
            return
        path = urlsplit(s.TELEGRAM_WEBHOOK_URL).path.lstrip("/")
        await updater.start_webhook(
            listen=s.TELEGRAM_WEBHOOK_LISTEN, port=s.TELEGRAM_WEBHOOK_PORT, url_path=path,
            webhook_url=s.TELEGRAM_WEBHOOK_URL, secret_token=self._webhook_secret,
            allowed_updates=list(ALLOWED_UPDATES))

    async def _finish_in_flight(self, app: Application) -> None:
        """Stop the application, letting replies in flight finish for a bounded time.

        app.stop() hands out what was already fetched and waits for every
        update being handled. The core's shutdown (run by the app alongside)
        ends its replies after SHUTDOWN_GRACE; whatever still runs after
        SHUTDOWN_GRACE + DRAIN_EXTRA is cancelled, which the core records as
        cancelled.
        """
        stopping = asyncio.create_task(app.stop())
        await asyncio.wait({stopping}, timeout=self._settings.SHUTDOWN_GRACE + DRAIN_EXTRA)
        if not stopping.done():
            pending = [t for t in self._inflight if not t.done()]
            log.warning("telegram: cancelling %d replies still running", len(pending))
            for task in pending:
                task.cancel()
            await asyncio.wait({stopping}, timeout=CANCEL_WAIT)
        if not stopping.done():
            stopping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stopping

    # ------------------------------------------------------------------ handlers

    def _incoming(self, user: User, chat: Chat, text: str, raw: object) -> Incoming:
        return Incoming(
            platform="telegram", user_id=str(user.id),
            display_name=user.full_name or user.username or str(user.id),
            chat_id=str(chat.id),
            place_id=None if chat.type == ChatType.PRIVATE else str(chat.id),
            text=text, raw=raw)

    @contextlib.contextmanager
    def _tracked(self) -> Iterator[None]:
        task = asyncio.current_task()
        if task is not None:
            self._inflight.add(task)
        try:
            yield
        finally:
            if task is not None:
                self._inflight.discard(task)

    async def _on_message(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.message
        if message is None or message.from_user is None:
            return
        text = addressed_text(message, self._me, KNOWN)
        if text is None:
            return  # not for us: decided without a single await
        service = self._service
        assert service is not None
        msg = self._incoming(message.from_user, message.chat, text, message)
        with self._tracked():
            keyboard = None
            stream = service.handle(msg)
            if parse_command(text) == ("model", ""):
                # The core's /model answer, plus buttons to pick with; not on a
                # refusal or a rate-limit notice, which never names the model.
                choices = await service.model_choices(msg)
                async with contextlib.aclosing(stream) as deltas:
                    reply = "".join([delta async for delta in deltas])
                if choices.current in reply:
                    keyboard = model_keyboard(message.from_user.id, choices)
                stream = _once(reply)
            sink = TelegramSink(
                context.bot, message.chat.id, pacer=self._pacer,
                thread_id=message.message_thread_id if message.is_topic_message else None,
                reply_to=None if msg.is_direct else message.message_id,
                reply_markup=keyboard)
            renderer = StreamRenderer(sink, limit=MESSAGE_LIMIT, measure=utf16_len,
                                      edit_interval=self._settings.STREAM_EDIT_INTERVAL)
            await renderer.run(stream)

    async def _on_button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        query = update.callback_query
        if query is None:
            return
        with self._tracked():
            await self._model_button(query, context)

    async def _model_button(self, query: CallbackQuery,
                            context: ContextTypes.DEFAULT_TYPE) -> None:
        press = decode_choice(query.data)
        message = query.message
        if press is None or not isinstance(message, Message):
            await query.answer("This button no longer works. Send /model again.")
            return
        if press.owner_id != query.from_user.id:
            # Never someone else's model: each person picks with their own /model.
            await query.answer("This menu belongs to someone else. Send /model to pick yours.",
                               show_alert=True)
            return
        service = self._service
        assert service is not None
        msg = self._incoming(query.from_user, message.chat, "/model", query)
        model = resolve_choice(press.key, (await service.model_choices(msg)).available)
        if model is None:
            await query.answer("That model is no longer offered. Send /model for the list.",
                               show_alert=True)
            return
        async with contextlib.aclosing(service.handle(replace(msg, text=f"/model {model}"))) \
                as deltas:
            reply = "".join([delta async for delta in deltas])
        if reply.strip():
            sink = TelegramSink(context.bot, message.chat.id, pacer=self._pacer)
            try:
                await sink.edit(message.message_id, reply, formatted=True)
            except FormattingRejected:
                await sink.edit(message.message_id, reply, formatted=False)
        await query.answer(f"Model: {model}"[:200])

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Log the detail for the operator; give the chat one short apology."""
        update_id = update.update_id if isinstance(update, Update) else None
        error = context.error
        log.error("telegram: update %s failed: %s: %s", update_id, type(error).__name__, error,
                  exc_info=error)
        if not isinstance(update, Update):
            return
        with contextlib.suppress(TelegramError):
            if update.callback_query is not None:
                await update.callback_query.answer(SORRY)
            elif update.effective_chat is not None and update.effective_message is not None:
                message = update.effective_message
                await context.bot.send_message(
                    update.effective_chat.id, SORRY,
                    message_thread_id=message.message_thread_id
                    if message.is_topic_message else None)


async def _once(text: str) -> AsyncIterator[str]:
    if text:
        yield text
