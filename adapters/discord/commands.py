"""Slash commands: /help, /reset, /model, /memory, /stats.

Each runs as the chat command the core implements once (`/model NAME` through
`service.handle`); this module only acknowledges the interaction in time and shows
the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import discord
from discord import app_commands

from adapters.discord.inbound import incoming_from_interaction
from adapters.discord.inflight import InFlight
from adapters.discord.sink import APOLOGY, MESSAGE_LIMIT
from bot.commands import COMMANDS
from bot.messages import Incoming
from bot.render import split_markdown
from bot.service import ChatService

log = logging.getLogger(__name__)

# Discord drops an interaction not acknowledged within 3 s: answer directly when the
# core is quick, else defer ("thinking…") and edit the answer in.
ANSWER_WITHIN = 1.5
AUTOCOMPLETE_WITHIN = 2.0
MAX_CHOICES = 25  # Discord's limit for autocomplete results
# Only the user who asked sees these: they are about that user's own settings and memory.
PRIVATE = frozenset({"reset", "model", "memory", "stats"})
WITHOUT_OPTIONS = ("help", "reset", "memory", "stats")  # and /model, with its `name`


def _description(name: str) -> str:
    return dict(COMMANDS).get(name, name)[:100]


class SlashCommands:
    """Registers the commands on a tree and answers them through the core."""

    def __init__(self, service: ChatService, in_flight: InFlight) -> None:
        self._service = service
        self._in_flight = in_flight

    def install(self, tree: app_commands.CommandTree[discord.Client]) -> None:
        for name in WITHOUT_OPTIONS:
            tree.add_command(app_commands.Command(
                name=name, description=_description(name), callback=self._simple(name)))

        @tree.command(name="model", description=_description("model"))
        @app_commands.describe(name="the model to switch to; leave out to see yours")
        async def model(interaction: discord.Interaction, name: str | None = None) -> None:
            await self.answer(interaction, f"/model {name}" if name else "/model")

        model.autocomplete("name")(self.model_names)

    def _simple(self, name: str) -> Callable[[discord.Interaction], Awaitable[None]]:
        async def callback(interaction: discord.Interaction) -> None:
            await self.answer(interaction, f"/{name}")

        callback.__name__ = name
        return callback

    async def answer(self, interaction: discord.Interaction, command: str) -> None:
        name = command[1:].split(" ", 1)[0]
        ephemeral = name in PRIVATE
        with self._in_flight.track():
            try:
                await self._answer(interaction, command, ephemeral=ephemeral)
            except Exception:
                log.exception("discord: /%s failed", name)
                await self._apologise(interaction)

    async def _answer(self, interaction: discord.Interaction, command: str, *,
                      ephemeral: bool) -> None:
        work = asyncio.create_task(self._collect(incoming_from_interaction(interaction, command)))
        try:
            done, _ = await asyncio.wait({work}, timeout=ANSWER_WITHIN)
            if not done:
                await interaction.response.defer(ephemeral=ephemeral, thinking=True)
            text = await work
        finally:
            work.cancel()
        chunks = split_markdown(text, MESSAGE_LIMIT) if text.strip() else []
        if not chunks:  # the core says nothing; the interaction still needs closing
            if not interaction.response.is_done():
                await interaction.response.defer(ephemeral=True, thinking=True)
            await interaction.delete_original_response()
            return
        first, *rest = chunks
        if interaction.response.is_done():
            await interaction.edit_original_response(content=first)
        else:
            await interaction.response.send_message(first, ephemeral=ephemeral)
        for chunk in rest:
            await interaction.followup.send(chunk, ephemeral=ephemeral)

    async def _collect(self, incoming: Incoming) -> str:
        parts: list[str] = []
        async with contextlib.aclosing(self._service.handle(incoming)) as deltas:
            async for delta in deltas:
                parts.append(delta)
        return "".join(parts)

    async def _apologise(self, interaction: discord.Interaction) -> None:
        try:
            if not interaction.response.is_done():
                await interaction.response.send_message(APOLOGY, ephemeral=True)
            else:
                await interaction.followup.send(APOLOGY, ephemeral=True)
        except Exception:  # too late (3 s passed) or the channel is gone: log, go on
            log.warning("could not tell the user that a command failed", exc_info=True)

    async def model_names(self, interaction: discord.Interaction,
                          current: str) -> list[app_commands.Choice[str]]:
        """The models this user may pick that contain what they typed; theirs first."""
        incoming = incoming_from_interaction(interaction, "/model")
        try:
            async with asyncio.timeout(AUTOCOMPLETE_WITHIN):
                choices = await self._service.model_choices(incoming)
        except Exception:
            log.warning("discord: model autocomplete failed", exc_info=True)
            return []
        typed = current.strip().lower()
        names = [m for m in choices.available if typed in m.lower() and len(m) <= 100]
        names.sort(key=lambda m: m != choices.current)  # stable: keeps the core's order
        return [app_commands.Choice(name=m, value=m) for m in names[:MAX_CHOICES]]
