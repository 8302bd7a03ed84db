"""The conversation service: the one entry point every adapter drives.

An incoming message goes in; a `Reply` comes out (bot.reply: what it is,
whether it is private, what the user may pick, and the Markdown it streams).
The service checks access and rate limits, runs the commands declared in
bot.commands, keeps each conversation strictly in order, caps concurrent model calls, trims the
history to the window, streams the model's reply, and stores the exchange
with its audit record in one transaction. A failed turn is never history.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
import os
import time
import weakref
from collections.abc import AsyncIterator, Callable, Sequence

from bot import notes as note_commands
from bot.commands import Arg, Commands, command, help_text, parse_command
from bot.i18n import (
    LANGUAGE_NAMES,
    LANGUAGES,
    N_,
    Catalogs,
    Translator,
    choose_language,
    parse_language,
)
from bot.images import (
    DOWNLOAD_TIMEOUT,
    IMAGE_TOKENS,
    Image,
    ImageTooLarge,
    ImageUnavailable,
    attach,
    can_see,
    fetch_all,
    human_bytes,
    stand_in,
)
from bot.llm_call import CallCancelled, CallLimits, CallStopped, stream_reply
from bot.logging_setup import RedactSecrets
from bot.memory import Summarizer
from bot.messages import Incoming, ModelChoices
from bot.metrics import Metrics
from bot.models import ModelCatalog, ModelWindows
from bot.ordering import ConversationOrder
from bot.persona_turn import NO_PERSONA, PersonaTurn
from bot.personas import PersonaBook
from bot.prompt import Prompt, PromptPlan, TooLong, build_prompt
from bot.providers.base import Provider, ProviderError, Usage
from bot.ratelimit import MovingWindowLimiter, NoticeOnce
from bot.recall import Recalled
from bot.recaller import NOTHING, Recaller
from bot.records import (
    AuditRecord,
    ConversationRef,
    StorageError,
    StoredMessage,
    StoreUnavailable,
    Summary,
)
from bot.reply import Choice, Choices, Outcome, Reply
from bot.retention import trim_summary_record
from bot.sanitize import clean_text, is_blank, storable
from bot.settings import Settings
from bot.slots import ModelSlots
from bot.stats import stats_report
from bot.store import Store
from bot.tokens import MESSAGE_OVERHEAD, PROMPT_OVERHEAD, Calibration, TokenFactors, count_tokens

log = logging.getLogger(__name__)
exchange_log = logging.getLogger("bot.exchange")

HISTORY_LOAD_LIMIT = 400  # at most this many messages are loaded for one prompt
REJECTED_KEEP = 200  # characters of a refused message the audit log keeps
KNOWN_CHOICES = 10_000  # users whose /language choice is kept in memory (LRU)
RATE_WINDOW = 60  # seconds: RATE_LIMIT_PER_MINUTE
# Notes after a reply's text (two newlines, then the catalogue's words).
SHUTDOWN_NOTE = N_("_(reply cut off: the bot is restarting)_")
# How a turn's audit status reads as the answer's outcome.
_OUTCOMES = {"ok": Outcome.OK, "error": Outcome.ERROR, "cancelled": Outcome.CANCELLED,
             "rejected": Outcome.REFUSED}


def _persona_label(name: str, description: str) -> str:
    # A button or an autocomplete entry: short (Discord allows 100 characters).
    label = f"{name}: {description}" if description else name
    return label if len(label) <= 64 else label[:63] + "…"


def _model_options(models: ModelChoices) -> Choices:
    return Choices("model", tuple(Choice(m, m, m == models.current) for m in models.available))


STORE_UNAVAILABLE = N_("Sorry, my memory is unavailable right now (its database file was "
                       "moved or replaced), so I'm not answering. The bot's operator needs to "
                       "restart me.")
LENGTH_NOTE = N_("_(reply cut off at the length limit)_")
STOPPED_MARK = N_("⏹ stopped")


def _language_options(current: str | None) -> Choices:
    return Choices("language", tuple(Choice(code, LANGUAGE_NAMES[code], code == current)
                                     for code in LANGUAGES))


class ChatService:
    """Thin adapters call `handle`; everything else lives below it."""

    def __init__(self, settings: Settings, store: Store, provider: Provider, *,
                 commands: Commands | None = None,
                 personas: PersonaBook | None = None, catalogs: Catalogs | None = None,
                 lang_env: str | None = None) -> None:
        self.settings = settings
        # The bot's own words in every shipped language (read once, here).
        self.catalogs = catalogs if catalogs is not None else Catalogs.load()
        # The process's LANG: the last signal before English.
        self._lang_env = lang_env if lang_env is not None else os.environ.get("LANG")
        # The /language choices last read or made here, newest last (bounded).
        self._known_choices: collections.OrderedDict[str, str | None] = \
            collections.OrderedDict()
        # PERSONAS_FILE (reloaded on SIGHUP by the app); a bad file raises PersonaError.
        self.personas = personas if personas is not None else PersonaBook(
            settings.PERSONAS_FILE or None, settings.PERSONA_DEFAULTS)
        # The chat commands: the handlers marked below, unless a caller gives others.
        self.commands = commands if commands is not None else Commands.of(type(self))
        self.store = store
        self.provider = provider
        self.catalog = ModelCatalog(settings, provider, store)
        self.calibration = Calibration()
        self.windows = ModelWindows(settings, provider, store, self.calibration)
        # History is re-counted every turn; a bounded memo makes that cheap.
        self.count_tokens = functools.lru_cache(maxsize=50_000)(count_tokens)
        self._order = ConversationOrder()
        # Replies and summaries share the slots, replies first (one-request servers).
        self._slots = ModelSlots(settings.LLM_CONCURRENCY)
        self._calls: set[asyncio.Task[None]] = set()  # model calls in flight
        self._turns = 0  # turns in flight
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        # Per-user state lives only while the user is inside a rate window.
        self._limiter = MovingWindowLimiter(RATE_WINDOW)
        self._rate_notified = NoticeOnce(RATE_WINDOW)
        # The answers handed out, by (conversation, reply id), for /stop to find; an
        # entry goes with its Reply once the adapter lets go of it.
        self._answers: weakref.WeakValueDictionary[tuple[str, int], Reply] = \
            weakref.WeakValueDictionary()
        self._askers: dict[int, str] = {}  # reply id → user_key, while the Reply lives
        self._redact = RedactSecrets(settings.secrets()).redact
        self.image_timeout = DOWNLOAD_TIMEOUT  # seconds, per image
        self.memory = Summarizer(settings, store, provider, self._calls, self._audit,
                                 self._slots, self.calibration, self.windows)
        # Recall of older messages (words, and meaning with EMBED_MODEL); bot.recaller.
        self.recaller = Recaller(settings, store, self._slots)
        self.metrics = Metrics()
        # Turns in flight, and model calls waiting for a slot (replies and summaries).
        self.metrics.watch(lambda: self._turns, lambda: self._slots.waiting())

    # -- what adapters call
    def conversation_ref(self, msg: Incoming) -> ConversationRef:
        """Platform + user + place (or platform + user with MEMORY_SCOPE=user)."""
        if self.settings.MEMORY_SCOPE == "user":
            place = "*"
        else:
            place = msg.place_id if msg.place_id is not None else "dm"
        key = f"{msg.platform}:{msg.user_id}@{place}"
        return ConversationRef(key=key, platform=msg.platform, user_id=msg.user_id, place=place)

    def help_text(self, model: str | None = None, tr: Translator | None = None) -> str:
        return help_text(model or self.settings.LLM_MODEL, self.commands, tr)

    # -- the language of the bot's own words, per user
    def language_of(self, msg: Incoming, chosen: str | None = None) -> str:
        """The user's language: their /language choice (`chosen`), else LANGUAGE,
        else the platform's signal, else LANG, else English."""
        return self.pick_language(msg.language, chosen)

    def pick_language(self, platform: str | None, chosen: str | None = None) -> str:
        """As language_of, from the platform's signal alone (already mapped)."""
        return choose_language(chosen=chosen, setting=self.settings.LANGUAGE,
                               platform=platform, lang_env=self._lang_env)

    def translator_for(self, msg: Incoming, chosen: str | None = None) -> Translator:
        """A translator without asking the store (the stored choice, if known, as `chosen`)."""
        return self.catalogs.for_language(self.language_of(msg, chosen))

    def known_translator(self, msg: Incoming) -> Translator:
        """Without a store round trip: with the choice this process last read or made
        (for what must show at once, like a Stop button's label)."""
        return self.translator_for(msg, self._known_choices.get(msg.user_key))

    async def translator(self, msg: Incoming) -> Translator:
        """The translator for `msg`'s sender, their stored /language choice included."""
        return self.translator_for(msg, await self._chosen_language(msg))

    def _note_choice(self, user_key: str, chosen: str | None) -> None:
        known = self._known_choices
        known[user_key] = chosen
        known.move_to_end(user_key)
        while len(known) > KNOWN_CHOICES:
            known.popitem(last=False)

    async def _chosen_language(self, msg: Incoming) -> str | None:
        try:
            chosen = await self.store.user_language(msg.platform, msg.user_id)
            self._note_choice(msg.user_key, chosen)
            return chosen
        except Exception:
            # Words in the platform's language beat no answer at all.
            log.warning("could not read the language choice of %s", msg.user_key,
                        exc_info=True)
            return None

    async def model_choices(self, msg: Incoming) -> ModelChoices:
        current = await self.catalog.current(msg.platform, msg.user_id)
        return ModelChoices(current=current, available=await self.catalog.available())

    async def choices(self, command: str, msg: Incoming) -> Choices | None:
        """What `msg`'s sender may pick with `/command` now (for autocomplete and
        buttons; no rate limit or audit: nothing is run)."""
        if command == "model":
            return _model_options(await self.model_choices(msg))
        if command == "persona":
            return await self._persona_choices(msg)
        if command == "language":
            return _language_options(await self._chosen_language(msg))
        return None

    def is_admin(self, msg: Incoming) -> bool:
        # The console is the operator's own terminal.
        return msg.platform == "console" or msg.user_key in self.settings.admin_users

    async def handle(self, msg: Incoming) -> Reply:
        """Answer one message; a Reply with no text means say nothing."""
        text = clean_text(msg.text)
        command = parse_command(text)
        # A command's answer is private by its declaration, refusals included.
        private = command is not None and self.commands.private(command[0])
        if not self._allowed(msg):
            await self._reject(msg, text, "not allowed")
            # No stored choice: someone not allowed could never have made one.
            return Reply.refusal(
                self.translator_for(msg).gettext("Sorry, this bot is private.")
                if msg.is_direct else "", private=private)
        wait = await self._rate_wait(msg)
        if wait:
            await self._reject(msg, text, "rate limited")
            if self._first_notice(msg.user_key, wait):
                seconds = max(1, round(wait))
                return Reply.refusal((await self.translator(msg)).ngettext(
                    "You're sending messages too fast. Please try again in {seconds} second.",
                    "You're sending messages too fast. Please try again in {seconds} seconds.",
                    seconds, seconds=seconds), private=private)
            return Reply.refusal(private=private)
        if command is not None:
            return await self._command(msg, *command)
        if msg.unsupported:  # a sticker, voice note, video or other file
            return Reply.notice((await self.translator(msg)).gettext(
                "I can only read text and pictures."))
        if is_blank(text) and not msg.images:
            return Reply.notice((await self.translator(msg)).gettext(
                "Send me some text and I'll answer. /help lists what I can do."))
        if len(text) > self.settings.MAX_INPUT_CHARS:
            await self._reject(msg, text, f"input {len(text)} chars")
            return Reply.refusal((await self.translator(msg)).gettext(
                "That message is {length:,} characters long; the limit is {limit:,}. "
                "Please send something shorter.",
                length=len(text), limit=self.settings.MAX_INPUT_CHARS))
        if self._closing:
            return Reply.notice((await self.translator(msg)).gettext(
                "The bot is restarting. Please send that again in a minute."))
        if msg.images and (refused := await self._image_refusal(msg, text)) is not None:
            return refused
        ref = self.conversation_ref(msg)
        audit = AuditRecord(
            platform=msg.platform, user_id=msg.user_id, chat_id=msg.chat_id,
            conversation=ref.key, user_input=_user_text(text, len(msg.images)),
            provider=self.provider.name,
        )
        # The turn runs as the adapter reads the answer; its audit status is the outcome.
        # /stop (or a Stop button) sets `stop`: the turn cuts its model call at once.
        stop = asyncio.Event()
        reply = Reply.answer(self._chat(msg, text, ref, audit, stop),
                             lambda: _OUTCOMES.get(audit.status, Outcome.ERROR),
                             on_cancel=stop.set)
        self._answers[ref.key, reply.id] = reply
        self._askers[reply.id] = msg.user_key
        weakref.finalize(reply, self._askers.pop, reply.id, None)
        return reply

    def answers_in(self, msg: Incoming) -> list[Reply]:
        """The answers in `msg`'s conversation still streaming (or waiting their
        turn), oldest first: what a /stop would cancel."""
        key = self.conversation_ref(msg).key
        return [r for (k, _), r in sorted(self._answers.items()) if k == key
                and r.outcome is Outcome.PENDING]

    async def aclose(self) -> None:
        """Stop background work and release the provider's connections."""
        await self.memory.cancel_all()
        await self.recaller.aclose()
        await self.windows.flush()
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
        if not self.store.shared_rate_limit:
            return self._limiter.hit(msg.user_key, limit)
        try:
            return await self.store.rate_hit(msg.user_key, limit, RATE_WINDOW)
        except Exception:
            # A limiter that can't count must not silence everyone; the turn
            # itself will report a database that is really gone.
            log.warning("rate limit check failed; letting the message through", exc_info=True)
            return 0.0

    def _first_notice(self, user_key: str, wait: float) -> bool:
        """One 'too fast' reply per window, not one per extra message."""
        return self._rate_notified.first(user_key, wait)

    async def _reject(self, msg: Incoming, text: str, reason: str) -> None:
        ref = self.conversation_ref(msg)
        await self._audit(AuditRecord(
            platform=msg.platform, user_id=msg.user_id, chat_id=msg.chat_id,
            conversation=ref.key, user_input=text[:REJECTED_KEEP], status="rejected", error=reason,
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

    # -- commands: dispatched from the declarations (bot.commands); handlers below
    async def _command(self, msg: Incoming, name: str, args: str) -> Reply:
        cmd = self.commands.get(name)
        if cmd is None:
            tr = await self.translator(msg)
            return Reply.notice(tr.gettext("I don't know /{command}.", command=name[:32])
                                + " " + self.help_text(tr=tr))
        if cmd.admin and not self.is_admin(msg):
            return Reply.refusal((await self.translator(msg)).gettext(
                "Only the bot's admins can see /{command}.", command=name),
                private=cmd.private)
        try:
            reply = await cmd.handler(self, msg, args)
        except StoreUnavailable:
            # The store logged why, once.
            return Reply.error(self.translator_for(msg).gettext(STORE_UNAVAILABLE),
                               private=cmd.private)
        except Exception:
            log.exception("command /%s failed", name)
            # The store may be what failed: the platform's language then.
            return Reply.error(self.translator_for(msg).gettext(
                "Sorry, that didn't work because of a problem on my side. Please try again."),
                private=cmd.private)
        if isinstance(reply, str):
            reply = Reply.notice(reply)
        reply.private = reply.private or cmd.private
        return reply

    # Telegram's greeting; it answers like /help and is listed in Telegram's menu only.
    @command("start", N_("Start: what this bot does"), platforms=("telegram",))
    async def _cmd_start(self, msg: Incoming, args: str) -> Reply:
        return await self._cmd_help(msg, args)

    @command("help", N_("What the bot does and its commands"))
    async def _cmd_help(self, msg: Incoming, args: str) -> Reply:
        return Reply.notice(self.help_text(await self.catalog.current(msg.platform, msg.user_id),
                                           await self.translator(msg)))

    @command("reset", N_("Forget this conversation"), private=True)
    async def _cmd_reset(self, msg: Incoming, args: str) -> Reply:
        ref = self.conversation_ref(msg)
        async with self._order.turn(ref.key), \
                self.store.conversation_lock(ref.key, self.settings.LLM_TIMEOUT):
            conv = await self.store.conversation_id(ref)
            await self.memory.forget(conv)  # its summary must not send what we forget
            self.recaller.forget(conv)  # nor its cached vectors or last recall
            removed = await self.store.reset_conversation(conv)
        return Reply.notice((await self.translator(msg)).ngettext(
            "Done: I forgot this conversation ({count} message). New start!",
            "Done: I forgot this conversation ({count} messages). New start!",
            removed, count=removed))

    @command("model", N_("Show your model, or pick one: /model NAME"), private=True,
             args=(Arg("name", N_("the model to switch to; leave out to see yours"),
                       choices="model"),))
    async def _cmd_model(self, msg: Incoming, args: str) -> Reply:
        tr = await self.translator(msg)
        choices = await self.model_choices(msg)
        listing = ", ".join(f"`{m}`" for m in choices.available)
        if not args:
            # Each model's own window (and size where the server says), as `ollama show`.
            described = await asyncio.gather(*(self.windows.describe(m, tr)
                                               for m in choices.available[:25]))
            lines = "\n".join(f"• `{m}`: {d}" for m, d in
                              zip(choices.available, described, strict=False))
            return Reply.notice(
                tr.gettext("Your model: `{model}`", model=choices.current) + "\n"
                + tr.gettext("You may pick:") + f"\n{lines}\n"
                + tr.gettext("Pick one with /model NAME"), choices=_model_options(choices))
        picked = await self.catalog.resolve(args)
        if picked is None:
            shown = args[:64].replace("`", "'")
            return Reply.refusal(tr.gettext(
                "There's no model called `{name}` here. You may pick: {models}",
                name=shown, models=listing))
        await self.store.set_user_model(msg.platform, msg.user_id, picked)
        return Reply.notice(tr.gettext("Done: your model is now `{model}`.", model=picked))

    @command("memory", N_("What the bot remembers of this conversation"), private=True)
    async def _cmd_memory(self, msg: Incoming, args: str) -> Reply:
        return Reply.notice(await self._memory_report(msg, self.conversation_ref(msg),
                                                      await self.translator(msg)))

    @command("remember", N_("Keep a note in every prompt: /remember TEXT"), private=True,
             args=(Arg("text", N_("what the bot should keep in mind in this conversation")),))
    async def _cmd_remember(self, msg: Incoming, args: str) -> Reply:
        conv = await self.store.conversation_id(self.conversation_ref(msg))
        return Reply.notice(await note_commands.remember(self.store, conv, args,
                                                         await self.translator(msg)))

    @command("forget", N_("Delete a note: /forget N (see /memory)"), private=True,
             args=(Arg("n", N_("the note's number, as /memory lists them")),))
    async def _cmd_forget(self, msg: Incoming, args: str) -> Reply:
        conv = await self.store.conversation_id(self.conversation_ref(msg))
        return Reply.notice(await note_commands.forget(self.store, conv, args,
                                                       await self.translator(msg)))

    @command("stats", N_("Usage figures (admins only)"), admin=True, private=True)
    async def _cmd_stats(self, msg: Incoming, args: str) -> Reply:
        report = await stats_report(self.store, self.settings.AUDIT_RETENTION_DAYS,
                                    await self.translator(msg))
        return Reply.notice("```\n" + report + "\n```")

    @command("language", N_("Show or choose my language: /language CODE"), private=True,
             args=(Arg("code", N_("en, zh-TW or zh-CN; leave out to see yours"),
                       choices="language"),))
    async def _cmd_language(self, msg: Incoming, args: str) -> Reply:
        chosen = await self.store.user_language(msg.platform, msg.user_id)
        tr = self.translator_for(msg, chosen)
        codes = ", ".join(LANGUAGES)
        if not args:
            current = self.language_of(msg, chosen)
            shown = tr.gettext("Your language: {language}.", language=LANGUAGE_NAMES[current]) \
                if chosen else tr.gettext(
                    "Your language: {language} (automatic, from your app's settings).",
                    language=LANGUAGE_NAMES[current])
            return Reply.notice(
                shown + "\n" + tr.gettext(
                    "Choose with /language CODE: {codes}; /language auto follows your app.",
                    codes=codes),
                choices=_language_options(chosen))
        picked = parse_language(args)
        if picked is None:
            return Reply.refusal(tr.gettext("I don't know the language {code}. Choose one of: "
                                            "{codes}", code=args[:32], codes=codes))
        new = None if picked == "auto" else picked
        await self.store.set_user_language(msg.platform, msg.user_id, new)
        self._note_choice(msg.user_key, new)
        tr = self.translator_for(msg, new)  # said in the new language
        if new is None:
            return Reply.notice(tr.gettext("Done: I'll follow your app's language again."))
        return Reply.notice(tr.gettext("Done: I'll write to you in {language}.",
                                       language=LANGUAGE_NAMES[new]))

    async def _memory_report(self, msg: Incoming, ref: ConversationRef,
                             tr: Translator) -> str:
        conv = await self.store.conversation_id(ref)
        stored = await self.store.count_messages(conv)
        summary = await self.store.summary(conv) \
            if self.settings.MEMORY_STRATEGY == "summarize" else None
        persona = await self._persona_turn(msg, ref)  # its model, system and window count
        model = await self._persona_model(
            persona, await self.catalog.current(msg.platform, msg.user_id))
        history = await self.store.recent_messages(
            conv, self._load_limit(), after_id=summary.upto_id if summary else 0)
        win = persona.window(await self.windows.window(model))
        factors = await self.windows.factors(model)
        prompt = build_prompt(persona.system(self.settings.SYSTEM_PROMPT), history, "",
                              win.budget, summary=summary.text if summary else None,
                              counter=factors.count, system_as_user=self.settings.SYSTEM_AS_USER,
                              examples=persona.examples())
        lines = [tr.gettext("Stored messages in this conversation: {count}", count=stored),
                 tr.gettext("Messages that fit the context window now: {count} "
                            "(`{model}`: {tokens:,} tokens)", count=prompt.history_used,
                            model=model, tokens=win.num_ctx)]
        failing = self.settings.MEMORY_STRATEGY == "summarize" \
            and await self._summary_failing(msg, ref)
        if summary:
            lines += [tr.gettext("Summary (covers the older messages):") + f"\n{summary.text}"]
            if failing:
                lines += [tr.gettext("(Out of date: the last attempt to update it failed.)")]
        elif failing:
            lines += [tr.gettext("Summary: not written: the last attempt failed. Replies still "
                                 "work and the older messages are kept; it is tried again as "
                                 "the history grows.")]
        elif self.settings.MEMORY_STRATEGY == "summarize":
            lines += [tr.gettext(
                "Summary: none yet (written once the history outgrows the window).")]
        else:
            lines += [tr.gettext(
                "Older messages beyond the window are dropped (MEMORY_STRATEGY=truncate).")]
        lines += await self._notes_and_recall_report(conv, tr)
        return "\n".join(lines)

    async def _notes_and_recall_report(self, conv: int, tr: Translator) -> list[str]:
        """/memory's notes (numbered) and what recall brought to the last reply."""
        notes = await self.store.notes(conv)
        lines = [tr.gettext("Notes ({count}):", count=len(notes))
                 + f"\n{note_commands.numbered(notes)}" if notes
                 else tr.gettext("Notes: none (keep one with /remember TEXT).")]
        if not self.recaller.on:
            return [*lines, tr.gettext("Recall of older messages is off (RECALL=off).")]
        last = self.recaller.last(conv)
        if last is None or not last.recalled.messages:
            return [*lines, tr.gettext("Recalled for the last reply: nothing.")]
        count = len(last.recalled.messages)
        heading = tr.gettext("Recalled for the last reply ({count} older messages, by words "
                             "and meaning):", count=count) if last.by_meaning \
            else tr.gettext("Recalled for the last reply ({count} older messages, by words):",
                            count=count)
        shown = "\n".join(line[:300] for line in last.recalled.text.splitlines()[1:])
        return [*lines, f"{heading}\n{shown}"]

    async def _summary_failing(self, msg: Incoming, ref: ConversationRef) -> bool:
        """Whether this conversation's latest summary attempt failed (from the audit log)."""
        rows = await self.store.audit_log(50, msg.user_key)
        last = next((r for r in reversed(rows)
                     if r["kind"] == "summary" and r["conversation"] == ref.key), None)
        return last is not None and last["status"] == "error"

    def _load_limit(self) -> int:
        # A stored message costs at least 5 tokens in a prompt: never load
        # more than could possibly fit.
        return min(HISTORY_LOAD_LIMIT, self.settings.prompt_budget // 5 + 1)

    # -- personas (/persona) and /stop: handlers and their helpers
    async def _persona_turn(self, msg: Incoming, ref: ConversationRef) -> PersonaTurn:
        """This conversation's persona: its own pick, else the place's default set in
        chat, else PERSONA_DEFAULTS, else none. A name the file no longer has is skipped."""
        if not len(self.personas.current):
            return NO_PERSONA
        return self._pick_persona(msg, *await self.store.personas_of(ref.key, msg.platform,
                                                                      msg.place_id))

    def _pick_persona(self, msg: Incoming, picked: str | None,
                      place_default: str | None) -> PersonaTurn:
        """The persona of _persona_turn, from the stored picks."""
        book = self.personas
        for name in (picked, place_default):
            if name and (persona := book.get(name)) is not None:
                return PersonaTurn(persona)
        return PersonaTurn(book.default_for(msg.platform, msg.place_id))

    async def _persona_model(self, persona: PersonaTurn, model: str) -> str:
        """The persona's model where the catalog offers it, else the user's."""
        wanted = persona.persona.model if persona.persona is not None else None
        if not wanted:
            return model
        resolved = await self.catalog.resolve(wanted)
        if resolved is None:
            log.warning("persona %s names model %s, which is not offered; using %s",
                        persona.name, wanted, model)
            return model
        return resolved

    async def _persona_choices(self, msg: Incoming,
                               tr: Translator | None = None) -> Choices | None:
        book = self.personas.current
        if not len(book):
            return None
        tr = tr or await self.translator(msg)
        current = (await self._persona_turn(msg, self.conversation_ref(msg))).name
        options = [Choice(p.name, _persona_label(p.name, p.description), p.name == current)
                   for p in book]
        options.append(Choice("off", tr.gettext("off (the default)"), False))
        return Choices("persona", tuple(options))

    @command("persona", N_("List the personas, or pick one: /persona NAME (off: the default)"),
             private=True,
             args=(Arg("name", N_("a persona, or off; add 'default' to set this server's or "
                                  "group's default (its admins)"), choices="persona"),))
    async def _cmd_persona(self, msg: Incoming, args: str) -> Reply:
        book = self.personas.current
        tr = await self.translator(msg)
        if not len(book):
            return Reply.notice(tr.gettext("No personas are set up on this bot (its operator "
                                           "sets PERSONAS_FILE)."))
        ref = self.conversation_ref(msg)
        words = args.split()
        if not words:
            current = (await self._persona_turn(msg, ref)).name
            yours = " " + tr.gettext("(yours now)")
            lines = [f"• `{p.name}`{yours if p.name == current else ''}"
                     + (f": {p.description}" if p.description else "") for p in book]
            now = tr.gettext("Persona here: `{name}`", name=current) if current \
                else tr.gettext("Persona here: none")
            return Reply.notice(
                f"{now}\n" + tr.gettext("Personas:") + "\n" + "\n".join(lines) + "\n"
                + tr.gettext("Pick one with /persona NAME; /persona off goes back to the "
                             "default."), choices=await self._persona_choices(msg, tr))
        as_default = len(words) == 2 and words[1].lower() == "default"
        if len(words) > 2 or (len(words) == 2 and not as_default):
            return Reply.refusal(tr.gettext(
                "Use /persona NAME, /persona off, or /persona NAME default."))
        name = words[0]
        persona = None if name.lower() == "off" else book.get(name)
        if persona is None and name.lower() != "off":
            shown = name[:32].replace("`", "'")
            return Reply.refusal(tr.gettext(
                "There's no persona called `{name}`. Personas: {names}", name=shown,
                names=", ".join(f"`{n}`" for n in book.names())))
        if as_default:
            return await self._set_place_persona(msg, persona.name if persona else None, tr)
        await self.store.set_conversation_persona(ref, persona.name if persona else None)
        if persona is None:
            fallback = (await self._persona_turn(msg, ref)).name
            return Reply.notice(
                tr.gettext("Done: back to the default persona (`{name}`).", name=fallback)
                if fallback else tr.gettext("Done: back to the default persona (none)."))
        return Reply.notice(tr.gettext(
            "Done: this conversation now uses the persona `{name}`.", name=persona.name))

    async def _set_place_persona(self, msg: Incoming, name: str | None,
                                 tr: Translator) -> Reply:
        """`/persona NAME default`: the platform says who runs the place; the core decides."""
        if msg.place_id is None:
            return Reply.refusal(tr.gettext("A default persona is for a server or group: send "
                                            "/persona NAME default there."))
        if not (self.is_admin(msg) or await msg.is_place_admin()):
            return Reply.refusal(tr.gettext(
                "Only this server's or group's admins can set its default persona."))
        await self.store.set_place_persona(msg.platform, msg.place_id, name)
        if name is None:
            return Reply.notice(tr.gettext(
                "Done: this place has no default persona set in chat now."))
        return Reply.notice(tr.gettext("Done: `{name}` is now the default persona here.",
                                       name=name))

    @command("stop", N_("Stop the reply in progress in this conversation"))
    async def _cmd_stop(self, msg: Incoming, args: str) -> Reply:
        running = self.answers_in(msg)
        tr = await self.translator(msg)
        if not running:
            return Reply.notice(tr.gettext("Nothing to stop: no reply is in progress here."))
        for reply in running:
            reply.cancel()
        return Reply.notice(tr.gettext(STOPPED_MARK) + ".")

    async def stop_answer(self, msg: Incoming, reply_id: int) -> Reply:
        """A Stop button on answer `reply_id`, pressed by `msg`'s sender: only the asker,
        a bot admin or the place's admin may stop it."""
        found = next((r for (_, i), r in list(self._answers.items()) if i == reply_id), None)
        # The presser's language as far as known without asking the store: a press
        # on a running reply is answered at once.
        tr = self.known_translator(msg)
        if found is None or found.outcome is not Outcome.PENDING:
            return Reply.notice(tr.gettext("That reply has already finished."))
        if self._askers.get(reply_id) != msg.user_key and not self.is_admin(msg) \
                and not await msg.is_place_admin():
            return Reply.refusal(tr.gettext(
                "Only the person who asked (or an admin) can stop this reply."))
        found.cancel()
        return Reply.notice(tr.gettext(STOPPED_MARK) + ".")

    # -- a chat turn
    async def _chat(self, msg: Incoming, text: str, ref: ConversationRef,
                    audit: AuditRecord, stop: asyncio.Event) -> AsyncIterator[str]:
        s = self.settings
        received = time.monotonic()
        self._turn_started()
        try:
            async with self._order.turn(ref.key):
                # Downloaded in turn (a photo and the question after it stay in order) but
                # before the conversation's lock: no connection or model slot waits on it.
                images = await self._download_images(msg, audit) if msg.images else []
                if isinstance(images, str):
                    yield images
                    return
                async with self.store.conversation_lock(
                        ref.key, s.LLM_TIMEOUT + s.LLM_REPLY_TIMEOUT), contextlib.aclosing(
                        self._chat_locked(msg, text, ref, audit, received, images,
                                          stop=stop)) as deltas:
                    async for delta in deltas:
                        yield delta
        except StoreUnavailable:
            # The store logged why, once; the user hears it every time.
            audit.status, audit.error = "error", "storage: database unavailable"
            yield self.translator_for(msg).gettext(STORE_UNAVAILABLE)
        except StorageError as exc:
            # Only taking the conversation's lock raises here (another process
            # is still answering this conversation); the turn itself handles
            # its own storage errors.
            log.warning("conversation %s busy: %s", ref.key, exc)
            audit.status, audit.error = "error", f"busy: {exc}"
            await self._audit(audit)
            yield (await self.translator(msg)).gettext(
                "I'm still answering your previous message. Please try again in a moment.")
        finally:
            self._turn_ended()

    async def _chat_locked(self, msg: Incoming, text: str, ref: ConversationRef,
                           audit: AuditRecord, received: float,
                           images: Sequence[Image] = (), *,
                           stop: asyncio.Event) -> AsyncIterator[str]:
        s = self.settings
        try:
            conv = await self.store.conversation_id(ref)
            # The context, notes and personas in one round trip (one thread hand-off
            # on SQLite), as far as the backend can.
            with_personas = bool(len(self.personas.current))
            reads = await self.store.turn_reads(
                conv, ref, msg.place_id, self._load_limit(),
                with_summary=s.MEMORY_STRATEGY == "summarize", with_personas=with_personas)
            context, notes = reads.context, reads.notes
            model = audit.model = self.catalog.choose(context.model_choice)
            summary, history = context.summary, context.history
            persona = self._pick_persona(msg, *reads.personas) \
                if with_personas and reads.personas is not None else NO_PERSONA
            model = audit.model = await self._persona_model(persona, model)
            audit.persona = persona.name
        except StoreUnavailable:
            raise  # said as such by the turn (_chat)
        except Exception as exc:
            log.exception("storage failed before the model call")
            audit.status, audit.error = "error", f"storage: {type(exc).__name__}: {exc}"
            await self._audit(audit)
            yield self.translator_for(msg).gettext(
                "Sorry, I can't reach my memory right now. Please try again in a moment.")
            return
        # The user's language came with the turn's one context query.
        tr = self.translator_for(msg, context.language_choice)
        self._note_choice(msg.user_key, context.language_choice)
        win = persona.window(await self.windows.window(model))
        factors = await self.windows.factors(model)
        notes_text = note_commands.notes_section(notes, win.budget // 4, factors.count)
        # Every message is counted once for the turn: the recall window's start and
        # each fit below share the plan's counts.
        plan = PromptPlan(persona.system(s.SYSTEM_PROMPT), history, text,
                          summary=summary.text if summary else None, factors=factors,
                          system_as_user=s.SYSTEM_AS_USER, examples=persona.examples())
        recalled = await self._recall(conv, text, plan, history, summary, notes_text,
                                      win.budget, factors)
        plan.know(recalled.text, recalled.measured)  # the block is not measured again

        def build(budget: int) -> Prompt:
            return _with_images(self._turn_prompt(
                plan, notes_text, recalled, budget - IMAGE_TOKENS * len(images)), images)

        try:
            prompt = await self._fit(model, build, win.budget)
        except TooLong as exc:
            audit.status, audit.user_input = "rejected", text[:REJECTED_KEEP]
            audit.error = f"prompt {exc.tokens} tokens > budget"
            await self._audit(audit)
            yield tr.gettext("That message is about {tokens:,} tokens long; the most I can "
                             "take is about {limit:,}. Please send something shorter.",
                             tokens=exc.tokens, limit=exc.limit)
            return
        audit.history_messages = prompt.history_used
        audit.summary_used = prompt.summary_used
        audit.recalled = self._recalled_in(prompt, recalled)
        parts: list[str] = []
        usage: Usage | None = None
        status = "ok"
        refitted = False
        try:
            while True:
                try:
                    async with self._slots:
                        if self._closing:
                            raise CallCancelled()
                        if stop.is_set():  # stopped while waiting its turn
                            raise CallStopped()
                        call_started = time.monotonic()
                        max_tokens = persona.max_tokens(win, prompt.tokens)
                        async for item in stream_reply(
                            self.provider, model, prompt.messages,
                            num_ctx=win.num_ctx, max_tokens=max_tokens,
                            limits=CallLimits(s.LLM_TIMEOUT, s.LLM_STALL_TIMEOUT,
                                              s.LLM_RETRIES, reply=s.LLM_REPLY_TIMEOUT),
                            running=self._calls,
                            options=persona.options(win, max_tokens), stop=stop,
                        ):
                            if isinstance(item, Usage):
                                usage = item
                                continue
                            if not parts:
                                audit.first_token_time = time.monotonic() - call_started
                            parts.append(item)
                            yield item
                    break
                except ProviderError as exc:
                    if exc.kind != "too_long" or parts:
                        raise
                    # The server's window is smaller than we thought: learn it,
                    # refit the prompt to it and try once more.
                    # A server that names no window: three quarters of what failed.
                    learned = exc.window if exc.window and exc.window < win.num_ctx \
                        else min(win.num_ctx, prompt.tokens + win.reply) * 3 // 4
                    await self.windows.learn_window(model, learned)
                    if refitted:
                        raise
                    refitted = True
                    win = persona.window(await self.windows.window(model))
                    try:
                        prompt = await self._fit(model, build, win.budget)
                    except TooLong:
                        raise exc from None
                    audit.history_messages = prompt.history_used
                    audit.summary_used = prompt.summary_used
        except ProviderError as exc:
            status = "error"
            audit.error = exc.detail
            log.warning("model call failed for %s: %s", ref.key, exc.detail)
            if exc.kind == "too_long":
                yield "⚠️ " + tr.gettext(
                    "That is more than the model `{model}` can read at once (about "
                    "{tokens:,} tokens), even with older messages left out. Please send a "
                    "shorter message, or /reset to start over.", model=model, tokens=win.num_ctx)
            elif exc.kind == "reply_timeout":
                yield ("\n\n" if parts else "") + f"_({exc.message(tr)})_"
            else:
                yield ("\n\n⚠️ " if parts else "⚠️ ") + exc.message(tr)
        except CallStopped:
            # /stop: what was shown stays, marked; the audit keeps it, history does not.
            status = "cancelled"
            audit.error = "stopped by the user"
            yield ("\n\n" if parts else "") + tr.gettext(STOPPED_MARK)
        except CallCancelled:
            status = "cancelled"
            audit.error = "shutdown"
            yield "\n\n" + tr.gettext(SHUTDOWN_NOTE) if parts \
                else tr.gettext("The bot is restarting. Please send that again.")
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
        if audit.prompt_tokens is None:  # the server sent no counts: estimate, marked so
            audit.est_prompt_tokens = prompt.tokens
        if audit.completion_tokens is None and parts:
            audit.est_completion_tokens = factors.count(audit.model_response)
        if status == "ok" and is_blank(audit.model_response):
            status, audit.error = "error", "empty reply"
            yield "⚠️ " + tr.gettext("The model returned an empty reply. Please try again.")
        elif status == "ok" and usage is not None and usage.stop_reason == "length":
            # Kept as history as it was; the note is only for the reader.
            yield "\n\n" + tr.gettext(LENGTH_NOTE)
        audit.status = status
        if status != "ok":
            await self._audit(audit)
            self._log_exchange(audit)
            return
        try:
            # History keeps the images' stand-in text, never their bytes.
            await self.store.save_exchange(conv, _user_text(text, len(images)),
                                           audit.model_response, audit)
        except Exception as exc:
            log.exception("could not store the exchange of %s", ref.key)
            audit.status, audit.error = "error", f"storage: {type(exc).__name__}: {exc}"
            await self._audit(audit)
            yield "\n\n⚠️ " + tr.gettext("I couldn't save this exchange, so I won't remember it.")
            return
        self._observe(audit)
        self._log_exchange(audit)
        self.recaller.stored(conv)  # embeds the new messages off the reply's path
        if usage and usage.prompt_tokens and not images:  # images' tokens aren't text's
            await self.windows.observe(model, prompt.messages, usage.prompt_tokens,
                                       prompt.measured)
        self._maybe_summarize(conv, ref, msg, model, prompt, history, text, audit.model_response,
                              win.budget, factors.count)

    # -- notes and recall in the prompt
    async def _recall(self, conv: int, text: str, plan: PromptPlan,
                      history: list[StoredMessage], summary: Summary | None,
                      notes_text: str, budget: int, factors: TokenFactors) -> Recalled:
        """The older messages recalled for `text`, within RECALL_TOKENS: only among
        messages older than the window the turn's prompt keeps with that room taken
        (the same plan: the persona's system prompt and examples included)."""
        s = self.settings
        if not self.recaller.on:
            return NOTHING
        reserve = min(s.recall_tokens, budget)
        try:
            oldest_used_id, dropped = plan.oldest_kept(budget - reserve,
                                                       self._notes_sections(notes_text))
        except TooLong:
            return NOTHING
        older = dropped > 0 or summary is not None or len(history) >= self._load_limit()
        if not older:
            return NOTHING  # everything stored is in the window anyway
        if oldest_used_id is not None:
            before = oldest_used_id
        elif history:
            before = history[-1].id + 1
        else:  # all of it summarised
            before = summary.upto_id + 1 if summary else 0
        return await self.recaller.recall(conv, text, before, reserve, factors.count, factors)

    @staticmethod
    def _notes_sections(notes_text: str) -> list[tuple[str, str]]:
        return [(note_commands.NOTES_HEADING, notes_text)] if notes_text else []

    def _turn_prompt(self, plan: PromptPlan, notes_text: str, recalled: Recalled,
                     budget: int) -> Prompt:
        """System prompt, notes, summary, recalled block, the window, the new message;
        a message too long for those leaves out the recall block, then the notes."""
        notes = self._notes_sections(notes_text)
        late = [("Recalled messages", recalled.text)] if recalled.text else []
        attempts = [(notes, late), (notes, []), ([], [])]
        for n, (sections, late_sections) in enumerate(attempts):
            try:
                return plan.build(budget, sections, late_sections)
            except TooLong:
                if n == len(attempts) - 1:
                    raise
        raise AssertionError("unreachable")

    @staticmethod
    def _recalled_in(prompt: Prompt, recalled: Recalled) -> int:
        """How many recalled messages the prompt carries (0 if the block was left out)."""
        if not recalled.text or not prompt.messages:
            return 0
        return len(recalled.messages) if recalled.text in prompt.messages[0]["content"] else 0

    async def _fit(self, model: str, build: Callable[[int], Prompt], budget: int) -> Prompt:
        """The prompt within `budget` by the server's own count where it can count.

        The estimate is corrected from each count, so the next turn's first
        fit is already close; at most two refits.
        """
        prompt = build(budget)
        target = budget
        for _ in range(2):
            exact = await self._server_count(model, prompt.messages)
            if exact is None:
                return prompt
            await self.windows.observe(model, prompt.messages, exact, prompt.measured)
            if exact <= budget:
                return prompt
            target -= exact - budget + 1
            prompt = build(target)
        return prompt

    async def _server_count(self, model: str, messages: list[dict[str, str]]) -> int | None:
        counted = await self.provider.count_tokens(
            model, "\n".join(m["content"] for m in messages))
        if counted is None:
            return None
        return counted + PROMPT_OVERHEAD + MESSAGE_OVERHEAD * len(messages)

    def _maybe_summarize(self, conv: int, ref: ConversationRef, msg: Incoming, model: str,
                         prompt: Prompt, history: list[StoredMessage], text: str,
                         reply: str, budget: int, counter: Callable[[str], int]) -> None:
        """Summarise once the history no longer fits and there is something to fold."""
        if self.settings.MEMORY_STRATEGY != "summarize" or self._closing:
            return
        full = prompt.dropped > 0 or len(history) >= self._load_limit()
        # The model's real window and token factors, as the prompt was fitted.
        if (full or prompt.tokens > budget * 3 // 4) \
                and self.memory.due(history, text, reply, budget=budget, counter=counter):
            self.memory.schedule(conv, ref, msg.chat_id, model)

    # -- images: checked before the turn, downloaded before the conversation's lock
    async def _image_refusal(self, msg: Incoming, text: str) -> Reply | None:
        """A refusal for an image announced over MAX_IMAGE_BYTES, or for a model that can't
        see (naming one that can); None: go ahead."""
        limit = self.settings.MAX_IMAGE_BYTES
        shown = _user_text(text, len(msg.images))
        if any(i.size is not None and i.size > limit for i in msg.images):
            size = max(i.size or 0 for i in msg.images)
            await self._reject(msg, shown, f"image {size} bytes > MAX_IMAGE_BYTES {limit}")
            return Reply.refusal((await self.translator(msg)).gettext(
                "That image is too large: the limit is {limit}.", limit=human_bytes(limit)))
        try:
            model = await self.catalog.current(msg.platform, msg.user_id)
        except Exception:
            return None  # the turn itself reports a database that is gone
        if await self._sees(model):
            return None
        await self._reject(msg, shown, f"model {model} can't see images")
        seeing = await self._vision_model()
        tr = await self.translator(msg)
        if seeing is not None:
            return Reply.refusal(tr.gettext(
                "The model `{model}` can't see images. `{vision_model}` can: switch with "
                "/model {vision_model}", model=model, vision_model=seeing))
        return Reply.refusal(tr.gettext(
            "The model `{model}` can't see images, and no model here can.", model=model))

    async def _sees(self, model: str) -> bool:
        info = (await self.windows.window(model)).info  # /api/show, asked once per model
        return can_see(model, info, self.settings.vision_models)

    async def _vision_model(self) -> str | None:
        """The first model users may pick that sees images, if any."""
        models = (await self.catalog.available())[:25]
        sees = await asyncio.gather(*(self._sees(m) for m in models))
        return next((m for m, ok in zip(models, sees, strict=True) if ok), None)

    async def _download_images(self, msg: Incoming, audit: AuditRecord) -> list[Image] | str:
        """The images' bytes, each bounded by MAX_IMAGE_BYTES and a timeout; or what to
        tell the user (the audit record then written)."""
        limit = self.settings.MAX_IMAGE_BYTES
        try:
            images = await fetch_all(msg.images, limit, self.image_timeout)
        except ImageTooLarge as exc:
            audit.status = "rejected"
            audit.error = f"image over MAX_IMAGE_BYTES {limit} while reading ({exc.size}+ bytes)"
            await self._audit(audit)
            return (await self.translator(msg)).gettext(
                "That image is too large: the limit is {limit}.", limit=human_bytes(limit))
        except (ImageUnavailable, TimeoutError) as exc:
            audit.status = "error"
            why = str(exc) or f"timed out ({self.image_timeout:g} s)"
            audit.error = f"image download failed: {why}"
            log.warning("image download failed for %s: %s", audit.conversation, audit.error)
            await self._audit(audit)
            return (await self.translator(msg)).gettext(
                "I couldn't download that image. Please send it again.")
        audit.images = len(images)
        return images

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


def _user_text(text: str, images: int) -> str:
    """What history and the audit log keep of the user's message."""
    return stand_in(text, images) if images else text


def _with_images(prompt: Prompt, images: Sequence[Image]) -> Prompt:
    # Images change the messages: Calibration measures them again (measured=None).
    return dataclasses.replace(prompt, messages=attach(prompt.messages, images),
                               measured=None) if images else prompt
