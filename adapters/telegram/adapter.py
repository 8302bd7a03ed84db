"""Telegram, through python-telegram-bot's Application (long polling or webhook).

The adapter only translates: an addressed update becomes an `Incoming`, the
core's Reply is shown through the shared StreamRenderer (typing, throttled
edits, 4096-unit splits, plain-text fallback), a Reply's choices become an
inline keyboard only its asker can use, and the command menu is the core's
declaration (`service.commands`). Commands themselves,
memory, access and ordering are the core's. Updates are handled concurrently
(the core keeps one conversation in order), flood control is the
AIORateLimiter's, and a failing update costs its chat one short apology while
the detail goes to the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass, replace
from types import MappingProxyType
from urllib.parse import urlsplit

from telegram import Bot, BotCommand, CallbackQuery, Chat, Message, Update, User
from telegram.constants import ChatMemberStatus, ChatType
from telegram.error import InvalidToken, TelegramError
from telegram.ext import (
    AIORateLimiter,
    Application,
    CallbackQueryHandler,
    ContextTypes,
    MessageHandler,
    filters,
)

from adapters.base import Adapter, utf16_len
from adapters.telegram.addressing import BotIdentity, addressed_text
from adapters.telegram.log_secrets import secrets_kept_out_of_logs
from adapters.telegram.media import has_media, images_of, unsupported_kind
from adapters.telegram.menu import (
    STOP_LABEL,
    choices_keyboard,
    decode_choice,
    decode_stop,
    resolve_choice,
    stop_keyboard,
)
from adapters.telegram.pacing import ChatPacer
from adapters.telegram.request import AiohttpRequest
from adapters.telegram.settings import bot_token, webhook_secret
from adapters.telegram.sink import TelegramSink
from bot.i18n import N_, Translator, from_language_tag
from bot.images import Downloader
from bot.messages import Incoming
from bot.render import FormattingRejected
from bot.reply import Reply
from bot.settings import Settings, SettingsError

log = logging.getLogger(__name__)

MESSAGE_LIMIT = 4096  # UTF-16 code units, after entity parsing
ALLOWED_UPDATES = (Update.MESSAGE, Update.CALLBACK_QUERY)
POLL_TIMEOUT = 10  # seconds a getUpdates long poll may wait for news
SORRY = N_("Sorry, something went wrong while answering. Please try again.")
# A button press's answer, per command: the msgid and its placeholder's name.
PICKED = {"model": (N_("Model: {model}"), "model"),
          "language": (N_("Language: {language}"), "language"),
          "persona": (N_("Persona: {name}"), "name")}
# setMyCommands takes a two-letter code only, so one Chinese menu: Traditional, the
# script the bot's users are expected to write.
COMMAND_LANGUAGES = MappingProxyType({"zh": "zh-TW"})
DRAIN_EXTRA = 5.0  # seconds, beyond SHUTDOWN_GRACE, before replies still running are cancelled
ADMIN_CHECK_WITHIN = 3.0  # seconds for getChatMember before "not an admin"
_ADMIN_STATUSES = (ChatMemberStatus.OWNER, ChatMemberStatus.ADMINISTRATOR)


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a reply goes: a chat (or forum topic), quoting a message, for an asker."""

    chat_id: int
    owner_id: int  # who asked: the only one whose presses a keyboard obeys
    thread_id: int | None = None
    reply_to: int | None = None
    stop_label: str = STOP_LABEL  # the Stop button's words, in the asker's language


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


class TelegramAdapter(Adapter[Destination]):
    """`await TelegramAdapter(settings).run(service, stop)` answers until `stop` is set."""

    name = "telegram"

    def __init__(self, settings: Settings, *, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(settings)
        # The Bot API connections' TLS context (None: aiohttp's default, loaded once per
        # process and shared by both connection pools: loading the CA bundle is ~0.1 s).
        self._tls = tls
        self._token = bot_token(settings)
        self._webhook_secret = webhook_secret(settings)
        self._me = BotIdentity(0, "")
        self._pacer = ChatPacer(settings.STREAM_EDIT_INTERVAL)
        self._app: Application | None = None
        self._requests: tuple[AiohttpRequest, ...] = ()
        self._quiet = contextlib.ExitStack()  # the token kept out of logs while running
        self._downloads = Downloader()  # photos and image files the users send

    # ------------------------------------------------------------------ lifecycle

    async def connect(self) -> None:
        secrets = [self._token, *([self._webhook_secret] if self._webhook_secret else [])]
        self._quiet.enter_context(secrets_kept_out_of_logs(secrets))
        app = self._app = self._build_application()
        try:
            await app.initialize()
        except BaseException as exc:
            self._app = None
            self._quiet.close()
            # PTB shuts a bot's requests down only once it has initialised.
            for request in self._requests:
                with contextlib.suppress(Exception):
                    await request.shutdown()
            if isinstance(exc, InvalidToken):  # PTB's own message quotes the token
                raise SettingsError("TELEGRAM_TOKEN was refused by the Bot API server "
                                    "(401 Unauthorized)") from None
            if isinstance(exc, TelegramError):
                server = urlsplit(self._settings.TELEGRAM_BASE_URL or "https://api.telegram.org")
                raise ConnectionError(f"cannot reach the Telegram Bot API at {server.netloc}: "
                                      f"{exc}") from None
            raise

    async def listen(self, stop: asyncio.Event) -> None:
        app = self._app
        assert app is not None
        self._me = BotIdentity(app.bot.id, app.bot.username)
        await self._register_commands(app)
        await app.start()
        await self._start_receiving(app)
        self._connected = True
        log.info("telegram: answering as @%s (%s)", self._me.username,
                 "webhook" if self._webhook_secret else "long polling")
        await stop.wait()
        log.info("telegram: stopping")
        self._connected = False
        await app.updater.stop()
        await self._finish_in_flight(app)

    async def disconnect(self) -> None:
        app = self._app
        if app is None:
            return
        try:
            if app.updater.running:
                await app.updater.stop()
            if app.running:
                await app.stop()
            await app.shutdown()
        finally:
            self._app = None
            await self._downloads.aclose()
            self._quiet.close()

    def _build_application(self) -> Application:
        # aiohttp instead of httpx: a third of the CPU per exchange (request.py);
        # PTB's pool sizes (256 connections, and 1 for getUpdates), our timeouts.
        requests = self._requests = (
            AiohttpRequest(connect_timeout=10, read_timeout=30, write_timeout=30,
                           pool_timeout=10, tls=self._tls),
            AiohttpRequest(connection_pool_size=1, tls=self._tls))
        builder = (
            Application.builder()
            .token(self._token)
            .concurrent_updates(True)
            .rate_limiter(default_rate_limiter())
            .request(requests[0])
            .get_updates_request(requests[1])
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
        # The menu is the core's declaration: what Telegram lists, in order; the
        # default menu in English, and one per language Telegram's clients ask for.
        menu = self.service.commands.menu(self.name)
        catalogs = self.service.catalogs
        for code, language in (("", "en"), *COMMAND_LANGUAGES.items()):
            tr = catalogs.for_language(language)
            commands = [BotCommand(c.name, tr.gettext(c.description)[:256]) for c in menu]
            try:
                await app.bot.set_my_commands(commands, language_code=code or None)
            except TelegramError as exc:  # a menu is a nicety; answering matters more
                log.warning("telegram: setMyCommands (%s) failed: %s", code or "default", exc)

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
        await self.drain(self._settings.SHUTDOWN_GRACE + DRAIN_EXTRA, until=app.stop())

    # ------------------------------------------------------------------ handlers

    def _incoming(self, user: User, chat: Chat, text: str, raw: object) -> Incoming:
        group = chat.type != ChatType.PRIVATE
        chat_id, user_id = chat.id, user.id

        async def place_admin() -> bool:  # asked only by a command that needs it
            return await self._is_chat_admin(chat_id, user_id)

        return Incoming(
            platform="telegram", user_id=str(user.id),
            display_name=user.full_name or user.username or str(user.id),
            chat_id=str(chat.id),
            place_id=str(chat.id) if group else None,
            text=text, raw=raw, place_admin=place_admin if group else None,
            language=from_language_tag(user.language_code))

    async def _is_chat_admin(self, chat_id: int, user_id: int) -> bool:
        """The group's creator or an administrator, as getChatMember says."""
        try:
            async with asyncio.timeout(ADMIN_CHECK_WITHIN):
                member = await self._bot.get_chat_member(chat_id, user_id)
        except (TelegramError, TimeoutError) as exc:
            log.warning("telegram: getChatMember failed: %s", exc)
            return False
        return member.status in _ADMIN_STATUSES

    async def _on_message(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.message
        if message is None or message.from_user is None:
            return
        text = addressed_text(message, self._me, self.service.commands.names)
        if text is None:
            return  # not for us: decided without a single await
        msg = self._incoming(message.from_user, message.chat, text, message)
        if has_media(message):  # the core downloads the picture; it names what it can't read
            msg = replace(msg, unsupported=unsupported_kind(message), images=images_of(
                message, self._bot, self._downloads, self._settings.MAX_IMAGE_BYTES))
        with self.tracked():
            reply = await self.service.handle(msg)
            await self.send(reply, Destination(
                message.chat.id, message.from_user.id,
                thread_id=message.message_thread_id if message.is_topic_message else None,
                reply_to=None if msg.is_direct else message.message_id,
                stop_label=self.service.known_translator(msg).gettext(STOP_LABEL)))

    async def send(self, reply: Reply, to: Destination) -> None:
        # Choices become buttons on the reply; in a group everyone sees them, and
        # only the asker's presses count (the owner is in the callback data).
        keyboard = choices_keyboard(to.owner_id, reply.choices) if reply.choices else None
        if reply.streaming:  # a Stop button while the answer streams
            keyboard = stop_keyboard(to.owner_id, reply.id, to.stop_label)
        sink = TelegramSink(self._bot, to.chat_id, pacer=self._pacer, thread_id=to.thread_id,
                            reply_to=to.reply_to, reply_markup=keyboard,
                            markup_waits_for_an_edit=reply.streaming,
                            edit_interval=self._settings.STREAM_EDIT_INTERVAL)
        if not reply.streaming:
            await self.stream(reply, sink, limit=MESSAGE_LIMIT, measure=utf16_len)
            return
        try:
            # The final edit already goes without the Stop button.
            await self.stream(reply, sink, limit=MESSAGE_LIMIT, measure=utf16_len,
                              on_end=sink.release_markup)
        finally:
            with contextlib.suppress(TelegramError):
                await sink.drop_markup()

    @property
    def _bot(self) -> Bot:
        assert self._app is not None
        return self._app.bot

    async def _on_button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        query = update.callback_query
        if query is None:
            return
        with self.tracked():
            if decode_stop(query.data) is not None:
                await self._stop_button(query)
            else:
                await self._choice_button(query, context)

    async def _stop_button(self, query: CallbackQuery) -> None:
        """A press on a streaming reply's Stop button: the asker's is answered at once."""
        press = decode_stop(query.data)
        message = query.message
        assert press is not None
        if not isinstance(message, Message):
            tr = self.service.catalogs.for_language(self.service.pick_language(
                from_language_tag(query.from_user.language_code)))
            await query.answer(tr.gettext("This reply has already finished."))
            return
        owner, reply_id = press
        msg = self._incoming(query.from_user, message.chat, "/stop", query)
        if owner == query.from_user.id:
            # First: Telegram shows a spinner until then.
            await query.answer(self.service.known_translator(msg).gettext("Stopping…"))
            await self.service.stop_answer(msg, reply_id)
            return
        # Someone else: the core decides (an admin may), so the answer waits for it.
        result = await self.service.stop_answer(msg, reply_id)
        text = await self.collect(result)
        await query.answer(text[:200], show_alert=result.kind.value == "refusal")

    async def _choice_button(self, query: CallbackQuery,
                             context: ContextTypes.DEFAULT_TYPE) -> None:
        """A press on a reply's choices: run `/<command> <key>` as the presser."""
        press = decode_choice(query.data)
        message = query.message
        service = self.service
        if press is None or not isinstance(message, Message):
            tr = service.catalogs.for_language(
                service.pick_language(from_language_tag(query.from_user.language_code)))
            await query.answer(tr.gettext("This button no longer works. Send /{command} "
                                          "again.", command="model"))
            return
        command = press.command
        msg = self._incoming(query.from_user, message.chat, f"/{command}", query)
        tr = await service.translator(msg)
        if press.owner_id != query.from_user.id:
            # Never someone else's pick: each person picks with their own menu.
            await query.answer(tr.gettext("This menu belongs to someone else. Send /{command} "
                                          "to pick yours.", command=command), show_alert=True)
            return
        offered = await service.choices(command, msg)
        key = resolve_choice(press.key, [c.key for c in offered.options] if offered else [])
        choice = offered.find(key) if offered is not None and key is not None else None
        if offered is None or choice is None:
            await query.answer(tr.gettext("That choice is no longer offered. Send /{command} "
                                          "for the list.", command=command), show_alert=True)
            return
        reply = await service.handle(replace(msg, text=offered.pick_line(choice)))
        text = await self.collect(reply)
        if text.strip():
            sink = TelegramSink(context.bot, message.chat.id, pacer=self._pacer)
            try:
                await sink.edit(message.message_id, text, formatted=True)
            except FormattingRejected:
                await sink.edit(message.message_id, text, formatted=False)
        # Said in the language after the press (a /language pick shows the new one).
        await query.answer(self._picked(await service.translator(msg), command,
                                        choice.label)[:200])

    @staticmethod
    def _picked(tr: Translator, command: str, label: str) -> str:
        msgid, name = PICKED.get(command, ("", ""))
        return tr.gettext(msgid, **{name: label}) if msgid else label

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Log the detail for the operator; give the chat one short apology."""
        update_id = update.update_id if isinstance(update, Update) else None
        error = context.error
        log.error("telegram: update %s failed: %s: %s", update_id, type(error).__name__, error,
                  exc_info=error)
        if not isinstance(update, Update):
            return
        # The user's platform language (the store may be what failed).
        user = update.effective_user
        sorry = self.service.catalogs.for_language(self.service.pick_language(
            from_language_tag(user.language_code) if user is not None else None)).gettext(SORRY)
        with contextlib.suppress(TelegramError):
            if update.callback_query is not None:
                await update.callback_query.answer(sorry)
            elif update.effective_chat is not None and update.effective_message is not None:
                message = update.effective_message
                await context.bot.send_message(
                    update.effective_chat.id, sorry,
                    message_thread_id=message.message_thread_id
                    if message.is_topic_message else None)
