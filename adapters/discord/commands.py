"""Slash commands, generated from the core's declaration (`service.commands`).

Each declared command becomes an app command with its description; an
argument becomes an optional string option, autocompleted when it offers
choices (the models for /model). Running one runs the chat command the core
implements once (`/model NAME` through `service.handle`); this module only
acknowledges the interaction in time and shows the answer, ephemeral when the
command is declared private. Called without its argument, /model (and /persona,
/language) answers with the choices as buttons or a select menu (adapters.discord.picks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import discord
from discord import app_commands

from adapters.discord.inbound import DISCORD_LOCALES, incoming_from_interaction
from adapters.discord.picks import choices_view
from adapters.discord.sink import APOLOGY, MESSAGE_LIMIT
from bot.commands import Arg, Command
from bot.i18n import Catalogs
from bot.messages import Incoming
from bot.render import split_markdown
from bot.reply import Reply
from bot.service import ChatService

log = logging.getLogger(__name__)

# Discord drops an interaction not acknowledged within 3 s: answer directly when the
# core is quick, else defer ("thinking…") and edit the answer in.
ANSWER_WITHIN = 1.5
AUTOCOMPLETE_WITHIN = 2.0
MAX_CHOICES = 25  # Discord's limit for autocomplete results
PLATFORM = "discord"

Tracker = Callable[[], contextlib.AbstractContextManager[None]]
# What Discord shows in each client language: descriptions, never names.
_TRANSLATED = (app_commands.TranslationContextLocation.command_description,
               app_commands.TranslationContextLocation.parameter_description)


class CatalogTranslator(app_commands.Translator):
    """description_localizations from the catalogues (zh-TW and zh-CN clients)."""

    def __init__(self, catalogs: Catalogs) -> None:
        super().__init__()
        self._catalogs = catalogs

    async def translate(self, string: app_commands.locale_str, locale: discord.Locale,
                        context: app_commands.TranslationContextTypes) -> str | None:
        code = locale.value  # Discord's zh-TW and zh-CN are the bot's language codes
        if code not in DISCORD_LOCALES or context.location not in _TRANSLATED:
            return None
        text = self._catalogs.for_language(code).gettext(string.message)
        return text[:100] if text != string.message else None


class SlashCommands:
    """Registers the declared commands on a tree and answers them through the core."""

    def __init__(self, service: ChatService, track: Tracker) -> None:
        self._service = service
        self._track = track  # counts an answer as in flight (the adapter's)

    def translator(self) -> CatalogTranslator:
        """The tree's translator (set it with `tree.set_translator` before syncing)."""
        return CatalogTranslator(self._service.catalogs)

    def install(self, tree: app_commands.CommandTree[discord.Client]) -> None:
        for cmd in self._service.commands.menu(PLATFORM):
            tree.add_command(self._app_command(cmd))

    def _app_command(self, cmd: Command) -> app_commands.Command[None, ..., None]:
        description = cmd.description[:100]
        if not cmd.args:
            return app_commands.Command(name=cmd.name, description=description,
                                        callback=self._simple(cmd.name))
        # The core's commands take the rest of the line; Discord gets it as one option.
        arg = cmd.args[0]
        callback = app_commands.describe(value=arg.description[:100])(
            app_commands.rename(value=arg.name)(self._with_value(cmd.name)))
        command = app_commands.Command(name=cmd.name, description=description,
                                       callback=callback)
        if arg.choices is not None:
            command.autocomplete("value")(self._completer(arg))
        return command

    def _simple(self, name: str) -> Callable[[discord.Interaction], Awaitable[None]]:
        async def callback(interaction: discord.Interaction) -> None:
            await self.answer(interaction, f"/{name}")

        callback.__name__ = name
        return callback

    def _with_value(self, name: str) -> Callable[..., Awaitable[None]]:
        async def callback(interaction: discord.Interaction, value: str | None = None) -> None:
            await self.answer(interaction, f"/{name} {value}" if value else f"/{name}")

        callback.__name__ = name
        return callback

    async def answer(self, interaction: discord.Interaction, command: str) -> None:
        name = command[1:].split(" ", 1)[0]
        with self._track():
            try:
                await self._answer(interaction, command,
                                   ephemeral=self._service.commands.private(name))
            except Exception:
                log.exception("discord: /%s failed", name)
                await self._apologise(interaction, incoming_from_interaction(interaction, command))

    async def _answer(self, interaction: discord.Interaction, command: str, *,
                      ephemeral: bool) -> None:
        work = asyncio.create_task(self._collect(incoming_from_interaction(interaction, command)))
        try:
            done, _ = await asyncio.wait({work}, timeout=ANSWER_WITHIN)
            if not done:
                # The reply isn't known yet: its command's declaration says if it's private.
                await interaction.response.defer(ephemeral=ephemeral, thinking=True)
            reply, text = await work
        finally:
            work.cancel()
        await self.send(interaction, reply, text)

    async def send(self, interaction: discord.Interaction, reply: Reply, text: str) -> None:
        """Show a whole reply as the interaction's answer (ephemeral when private); its
        choices become the asker's buttons or select menu, on an ephemeral message."""
        view = choices_view(interaction.user.id, reply.choices) if reply.choices else None
        ephemeral = reply.private or view is not None
        # Only a menu adds components: every other answer crosses the wire as before.
        with_view: dict[str, Any] = {"view": view} if view is not None else {}
        chunks = split_markdown(text, MESSAGE_LIMIT) if text.strip() else []
        if not chunks:  # the core says nothing; the interaction still needs closing
            if not interaction.response.is_done():
                await interaction.response.defer(ephemeral=True, thinking=True)
            await interaction.delete_original_response()
            return
        first, *rest = chunks
        if interaction.response.is_done():
            await interaction.edit_original_response(content=first, **with_view)
        else:
            await interaction.response.send_message(first, ephemeral=ephemeral, **with_view)
        for chunk in rest:
            await interaction.followup.send(chunk, ephemeral=ephemeral)

    async def _collect(self, incoming: Incoming) -> tuple[Reply, str]:
        reply = await self._service.handle(incoming)
        return reply, await reply.text()

    async def _apologise(self, interaction: discord.Interaction, incoming: Incoming) -> None:
        apology = self._service.translator_for(incoming).gettext(APOLOGY)
        try:
            if not interaction.response.is_done():
                await interaction.response.send_message(apology, ephemeral=True)
            else:
                await interaction.followup.send(apology, ephemeral=True)
        except Exception:  # too late (3 s passed) or the channel is gone: log, go on
            log.warning("could not tell the user that a command failed", exc_info=True)

    def _completer(self, arg: Arg) -> Callable[
            [discord.Interaction, str], Awaitable[list[app_commands.Choice[str]]]]:
        kind = arg.choices
        assert kind is not None

        async def complete(interaction: discord.Interaction,
                           current: str) -> list[app_commands.Choice[str]]:
            return await self.complete(interaction, kind, current)

        return complete

    async def complete(self, interaction: discord.Interaction, kind: str,
                       current: str) -> list[app_commands.Choice[str]]:
        """The options the user may pick that contain what they typed; theirs first."""
        incoming = incoming_from_interaction(interaction, f"/{kind}")
        try:
            async with asyncio.timeout(AUTOCOMPLETE_WITHIN):
                choices = await self._service.choices(kind, incoming)
        except Exception:
            log.warning("discord: %s autocomplete failed", kind, exc_info=True)
            return []
        if choices is None:
            return []
        typed = current.strip().lower()
        options = [c for c in choices.options
                   if typed in c.label.lower() and len(c.key) <= 100 and len(c.label) <= 100]
        options.sort(key=lambda c: not c.current)  # stable: keeps the core's order
        return [app_commands.Choice(name=c.label, value=c.key) for c in options[:MAX_CHOICES]]
