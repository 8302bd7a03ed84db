"""A Reply's choices on Discord: buttons (a select menu past five), and what a pick does.

The custom id is `pick:<command>:<asker id>:<ref>` on a button and
`pick:<command>:<asker id>` on the select menu (the picked option's value is the
ref); a ref is the choice's key, or a short digest of a key too long to carry
(`bot.reply.key_ref`). Both are discord.py dynamic items, matched by their custom
id, so a press works after a restart too and no view is kept per menu. A press is
untrusted input: only the asker's counts (anyone else gets a private refusal), and
only for a key the core offers that user now; the pick then runs as the command
typed with its argument (`/model NAME`), and the menu's message becomes the answer.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol, cast

import discord

from adapters.discord.inbound import incoming_from_interaction
from adapters.discord.sink import APOLOGY
from bot.reply import Choices, key_ref
from bot.service import ChatService

log = logging.getLogger(__name__)

BUTTONS_UP_TO = 5  # one row of buttons; more choices become a select menu
MAX_OPTIONS = 25  # Discord's limit for a select menu's options
CUSTOM_ID_LIMIT = 100  # characters, for a custom id and for an option's value
BUTTON_LABEL_LIMIT = 80
OPTION_LABEL_LIMIT = 100
CURRENT = "✓ "  # marks what the user has now, as on Telegram
_PREFIX = "pick"
_COMMAND = r"(?P<command>[a-z_]+)"
_OWNER = r"(?P<owner>[0-9]+)"

Tracker = Callable[[], contextlib.AbstractContextManager[None]]


def choices_view(owner: int, choices: Choices) -> discord.ui.View | None:
    """The asker's buttons or select menu for `choices`; None when there is nothing to pick."""
    options = list(choices.options)[:MAX_OPTIONS]
    if not options:
        return None
    view = discord.ui.View(timeout=None)  # dynamic items: nothing to time out
    if len(options) <= BUTTONS_UP_TO:
        head = f"{_PREFIX}:{choices.command}:{owner}:"
        for option in options:
            view.add_item(PickButton(
                head + key_ref(option.key, CUSTOM_ID_LIMIT - len(head)),
                ((CURRENT if option.current else "") + option.label)[:BUTTON_LABEL_LIMIT],
                current=option.current))
        return view
    view.add_item(PickSelect(f"{_PREFIX}:{choices.command}:{owner}", [
        discord.SelectOption(label=option.label[:OPTION_LABEL_LIMIT],
                             value=key_ref(option.key, CUSTOM_ID_LIMIT),
                             default=option.current)
        for option in options]))
    return view


class Picks:
    """Answers presses on the menus `choices_view` made, through the core."""

    def __init__(self, service: ChatService, track: Tracker) -> None:
        self._service = service
        self._track = track  # counts a pick as in flight (the adapter's)

    async def pick(self, interaction: discord.Interaction, command: str, owner: int,
                   ref: str) -> None:
        with self._track():
            msg = incoming_from_interaction(interaction, f"/{command}")
            service = self._service
            if interaction.user.id != owner:
                # Never someone else's pick: each person picks with their own menu.
                tr = await service.translator(msg)
                await interaction.response.send_message(tr.gettext(
                    "This menu belongs to someone else. Send /{command} to pick yours.",
                    command=command), ephemeral=True)
                return
            await interaction.response.defer()  # "got it" within Discord's 3 s
            try:
                offered = await service.choices(command, msg)
                choice = offered.resolve(ref) if offered is not None else None
                if offered is None or choice is None:
                    tr = await service.translator(msg)
                    await interaction.followup.send(tr.gettext(
                        "That choice is no longer offered. Send /{command} for the list.",
                        command=command), ephemeral=True)
                    return
                reply = await service.handle(replace(msg, text=offered.pick_line(choice)))
                text = await reply.text()
                # The menu's message now says what was picked; its buttons go.
                await interaction.edit_original_response(content=text or choice.label,
                                                         view=None)
            except Exception:
                log.exception("discord: a pick of /%s failed", command)
                with contextlib.suppress(discord.HTTPException):
                    await interaction.followup.send(
                        service.translator_for(msg).gettext(APOLOGY), ephemeral=True)


class _HasPicks(Protocol):
    picks: Picks


def _picks(interaction: discord.Interaction) -> Picks:
    return cast(_HasPicks, interaction.client).picks


class PickButton(discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]],
                 template=rf"{_PREFIX}:{_COMMAND}:{_OWNER}:(?P<ref>.+)"):
    """One choice as a button."""

    def __init__(self, custom_id: str, label: str, *, current: bool = False) -> None:
        super().__init__(discord.ui.Button(
            label=label, custom_id=custom_id,
            style=discord.ButtonStyle.primary if current else discord.ButtonStyle.secondary))

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction[Any],
                             item: discord.ui.Item[Any], match: Any, /) -> PickButton:
        return cls(match.string, getattr(item, "label", None) or "")

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        match = self.template.fullmatch(self.custom_id)
        assert match is not None  # discord.py matched it to dispatch here
        await _picks(interaction).pick(interaction, match["command"], int(match["owner"]),
                                       match["ref"])


class PickSelect(discord.ui.DynamicItem[discord.ui.Select[discord.ui.View]],
                 template=rf"{_PREFIX}:{_COMMAND}:{_OWNER}"):
    """The choices as one select menu; the picked option's value is its ref."""

    def __init__(self, custom_id: str, options: list[discord.SelectOption]) -> None:
        super().__init__(discord.ui.Select(custom_id=custom_id, options=options,
                                           min_values=1, max_values=1))

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction[Any],
                             item: discord.ui.Item[Any], match: Any, /) -> PickSelect:
        return cls(match.string, list(getattr(item, "options", [])))

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        match = self.template.fullmatch(self.custom_id)
        assert match is not None
        values = self.item.values
        await _picks(interaction).pick(interaction, match["command"], int(match["owner"]),
                                       values[0] if values else "")
