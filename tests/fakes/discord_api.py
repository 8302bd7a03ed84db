"""A Discord emulator on 127.0.0.1: the gateway websocket and the REST API a bot uses.

The real discord.py runs against it unmodified once its REST base points here
(`api_base`, e.g. http://127.0.0.1:PORT/api/v10): `GET /gateway` and `GET /gateway/bot`
hand out this server's websocket URL.

    async with DiscordEmulator(token="t") as discord_api:
        ...start the bot with DISCORD_API_BASE=discord_api.api_base...
        await discord_api.wait_ready()
        await discord_api.user_says(USER, "hello")            # a DM
        await discord_api.wait_for(lambda: discord_api.bot_messages(dm))

What it emulates, the way Discord does it:
- gateway: HELLO, IDENTIFY (token checked, close 4004 otherwise) → READY with the
  guilds of that shard as unavailable, then one GUILD_CREATE each (only with the GUILDS
  intent); heartbeat ACKs; dispatches with sequence numbers, routed to the shard
  `(guild_id >> 22) % shard_count` (DMs to shard 0); intents filter the events and the
  MESSAGE_CONTENT intent blanks guild message content unless the bot is mentioned;
  `compress=zlib-stream` in the URL gets one zlib stream of binary frames (otherwise
  text frames). RESUME is answered with INVALID_SESSION (the client identifies again).
- REST: users/@me, oauth2/applications/@me, gateway, gateway/bot, channel messages
  (create with Discord's validation: 2000 characters, empty, unknown reference; edit),
  typing, DM channels, command sync, interaction callbacks (the 3-second rule and
  "already acknowledged"), the webhook routes of interaction responses and followups.
- the bot's own messages come back to it as MESSAGE_CREATE, as on Discord.
- attachments: `attachment(data, filename, content_type)` keeps bytes and returns the
  attachment object for `user_says(..., attachments=[...])`; its `url` (and `proxy_url`)
  points at this server's `/attachments/...`, served without authorisation as Discord's
  CDN does (discord.py's `Attachment.read()` GETs that URL); `size` may lie (`size=`),
  the body may be chunked, and `StoredAttachment.sent` counts what went out.
- `fail_next` injects a 429 (with the headers and body Discord sends) or any status.

What a user sees is kept per channel (`channel_messages`, `seen_by`): content after
edits, every version with its time, the allowed mentions sent, who would actually have
been pinged, references, flags (64 ephemeral, 128 loading). Every REST call is kept
with its body (`calls`). Waiting is `await wait_for(predicate)`, woken by state changes.
"""

from __future__ import annotations

import asyncio
import fnmatch
import itertools
import json
import re
import secrets
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web

from tests.fakes.files import serve_file

API_PREFIX = "/api/v10"
GATEWAY_PATH = "/gateway-ws"
DISCORD_EPOCH_MS = 1_420_070_400_000
MAX_CONTENT = 2000
INTERACTION_ACK_SECONDS = 3.0

# Gateway intents (https://discord.com/developers/docs/topics/gateway#gateway-intents)
INTENT_GUILDS = 1 << 0
INTENT_GUILD_MESSAGES = 1 << 9
INTENT_DIRECT_MESSAGES = 1 << 12
INTENT_MESSAGE_CONTENT = 1 << 15

# Message flags and types
FLAG_EPHEMERAL = 1 << 6
FLAG_LOADING = 1 << 7
TYPE_DEFAULT = 0
TYPE_REPLY = 19

# Channel types
CHANNEL_TEXT = 0
CHANNEL_DM = 1
CHANNEL_PUBLIC_THREAD = 11

# Interaction types and callback types
INTERACTION_COMMAND = 2
INTERACTION_COMPONENT = 3  # a button press on a message
INTERACTION_AUTOCOMPLETE = 4
COMPONENT_BUTTON = 2
COMPONENT_SELECT = 3  # a string select menu
CALLBACK_MESSAGE = 4
CALLBACK_DEFERRED = 5
CALLBACK_DEFERRED_UPDATE = 6  # a component's "got it", the message unchanged for now
CALLBACK_UPDATE = 7  # a component's answer that edits its message
CALLBACK_AUTOCOMPLETE = 8
MEMBER_PERMISSIONS = 2248473465835073  # what a member may do in the channel
MANAGE_GUILD = 1 << 5  # "Manage Server": added for the server's admins (DiscordEmulator.admins)

# Default world: a bot, one server with a text channel, a thread and a role.
BOT_ID = 1_111_111_111_111_111_111
BOT_NAME = "MemoryBot"
GUILD_ID = 1_222_222_222_222_222_222
TEXT_CHANNEL_ID = 1_333_333_333_333_333_333
THREAD_ID = 1_444_444_444_444_444_444
ROLE_ID = 1_555_555_555_555_555_555
BOT_ROLE_ID = 1_555_555_555_555_555_556  # the role Discord makes for the bot in a server

_USER_MENTION = re.compile(r"<@!?(\d+)>")
_ROLE_MENTION = re.compile(r"<@&(\d+)>")
_EVERYONE = re.compile(r"@(everyone|here)\b")
_BODY = web.RequestKey("body", object)  # the parsed request body, read once by the middleware


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    # discord.py decodes a body only if the content type is exactly application/json
    # (no "; charset=utf-8", which aiohttp's json_response would add).
    return web.Response(
        status=status,
        body=json.dumps(data, ensure_ascii=False).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )


def _error(status: int, code: int, message: str,
           errors: dict[str, Any] | None = None) -> web.Response:
    body: dict[str, Any] = {"message": message, "code": code}
    if errors:
        body["errors"] = errors
    return _json(body, status)


def _component(c: dict[str, Any]) -> dict[str, Any]:
    """A button (type 2) or a string select (type 3) as Discord echoes it."""
    kind = c.get("type", COMPONENT_BUTTON)
    if kind == COMPONENT_SELECT:
        return {"type": kind, "custom_id": c.get("custom_id"),
                "placeholder": c.get("placeholder"),
                "min_values": c.get("min_values", 1), "max_values": c.get("max_values", 1),
                "disabled": bool(c.get("disabled", False)),
                "options": [{"label": o["label"], "value": o["value"],
                             "description": o.get("description"),
                             "default": bool(o.get("default", False))}
                            for o in c.get("options", [])]}
    return {"type": kind, "style": c.get("style", 1), "label": c.get("label"),
            "custom_id": c.get("custom_id"), "disabled": bool(c.get("disabled", False))}


def _components(value: Any) -> list[dict[str, Any]]:
    """Action rows as Discord echoes them (custom ids kept, defaults filled)."""
    return [{"type": 1, "components": [_component(c) for c in row.get("components", [])]}
            for row in value or []]


def _bad_components(value: Any) -> str | None:
    """What Discord would refuse in these action rows (its limits), or None."""
    rows = value or []
    if len(rows) > 5:
        return "too many action rows"
    for row in rows:
        items = row.get("components", [])
        if len(items) > 5 or (len(items) > 1 and any(
                c.get("type") == COMPONENT_SELECT for c in items)):
            return "an action row holds up to 5 buttons or one select menu"
        for c in items:
            if len(c.get("custom_id") or "") > 100 or len(c.get("label") or "") > 80:
                return "custom_id over 100 or label over 80 characters"
            options = c.get("options", [])
            if len(options) > 25 or any(len(o["value"]) > 100 or len(o["label"]) > 100
                                        for o in options):
                return "more than 25 options, or an option over 100 characters"
    return None


def _too_long(field_name: str) -> web.Response:
    return _error(400, 50035, "Invalid Form Body", {field_name: {"_errors": [
        {"code": "BASE_TYPE_MAX_LENGTH", "message": f"Must be {MAX_CONTENT} or fewer in length."}
    ]}})


# -- the world ----------------------------------------------------------------------------------


@dataclass
class User:
    id: int
    username: str
    global_name: str | None = None
    bot: bool = False

    def payload(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": str(self.id), "username": self.username, "global_name": self.global_name,
            "discriminator": "0", "avatar": None, "public_flags": 0,
        }
        if self.bot:
            data["bot"] = True
        return data


@dataclass
class Channel:
    id: int
    type: int
    name: str | None = None
    guild_id: int | None = None
    parent_id: int | None = None
    recipient_id: int | None = None  # DMs

    def payload(self, users: dict[int, User]) -> dict[str, Any]:
        data: dict[str, Any] = {"id": str(self.id), "type": self.type, "last_message_id": None}
        if self.type == CHANNEL_DM:
            recipient = users[self.recipient_id] if self.recipient_id else None
            data["recipients"] = [recipient.payload()] if recipient else []
            return data
        data.update({
            "guild_id": str(self.guild_id), "name": self.name, "position": 0, "nsfw": False,
            "permission_overwrites": [], "rate_limit_per_user": 0, "topic": None,
            "parent_id": str(self.parent_id) if self.parent_id else None,
        })
        if self.type == CHANNEL_PUBLIC_THREAD:
            data["owner_id"] = str(BOT_ID)
            data["member_count"] = 2
            data["message_count"] = 0
            data["thread_metadata"] = {
                "archived": False, "auto_archive_duration": 1440, "locked": False,
                "archive_timestamp": _now_iso(),
            }
        return data


@dataclass
class Guild:
    id: int
    name: str
    channels: dict[int, Channel] = field(default_factory=dict)
    roles: dict[int, str] = field(default_factory=dict)
    nicks: dict[int, str | None] = field(default_factory=dict)  # members: user id → nickname
    bot_roles: dict[int, int] = field(default_factory=dict)  # managed role id → its bot's id
    preferred_locale: str = "en-US"  # the server's language (Server Settings → Community)

    def member_payload(self, user: User, *, with_user: bool) -> dict[str, Any]:
        data: dict[str, Any] = {
            "nick": self.nicks.get(user.id), "roles": [], "joined_at": _now_iso(),
            "deaf": False, "mute": False, "flags": 0, "pending": False, "avatar": None,
            "premium_since": None, "communication_disabled_until": None,
        }
        if with_user:
            data["user"] = user.payload()
        return data


# -- what was seen and sent ---------------------------------------------------------------------


@dataclass
class ShownMessage:
    """A message as people in its channel see it now, with its history."""

    id: int
    channel_id: int
    guild_id: int | None
    author_id: int
    content: str
    flags: int = 0
    allowed_mentions: dict[str, Any] | None = None  # as sent with the last create or edit
    message_reference: dict[str, Any] | None = None
    pinged: frozenset[str] = frozenset()  # "everyone", "user:ID", "role:ID" actually notified
    visible_to: int | None = None  # an ephemeral message: only this user sees it
    interaction_id: int | None = None
    versions: list[tuple[float, str]] = field(default_factory=list)  # (monotonic time, content)
    payload: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & FLAG_EPHEMERAL)

    @property
    def loading(self) -> bool:
        return bool(self.flags & FLAG_LOADING)

    @property
    def edit_times(self) -> list[float]:
        return [at for at, _ in self.versions[1:]]

    @property
    def buttons(self) -> list[dict[str, Any]]:
        """The buttons on the message now (type 2 components, in their rows)."""
        return [c for row in self.payload.get("components") or []
                for c in row.get("components", []) if c.get("type") == 2]

    @property
    def selects(self) -> list[dict[str, Any]]:
        """The select menus on the message now (type 3 components)."""
        return [c for row in self.payload.get("components") or []
                for c in row.get("components", []) if c.get("type") == COMPONENT_SELECT]

    @property
    def replies_to(self) -> int | None:
        ref = self.message_reference
        return int(ref["message_id"]) if ref and ref.get("message_id") else None


@dataclass
class Call:
    """One REST request as the emulator received it."""

    method: str
    path: str  # without /api/v10
    query: dict[str, str]
    body: Any
    at: float  # time.monotonic()
    status: int = 0

    def __str__(self) -> str:
        return f"{self.method} {self.path} → {self.status}"


@dataclass
class Callback:
    type: int
    data: dict[str, Any]
    after: float  # seconds since the interaction was dispatched


@dataclass
class InteractionRecord:
    """One slash command or autocomplete the emulator sent, and how the bot answered it."""

    id: int
    token: str
    type: int
    name: str
    options: dict[str, Any]
    user_id: int
    channel_id: int
    guild_id: int | None
    dispatched_at: float
    callbacks: list[Callback] = field(default_factory=list)
    messages: list[ShownMessage] = field(default_factory=list)  # original, then followups

    @property
    def acknowledged(self) -> bool:
        return bool(self.callbacks)

    @property
    def ack_after(self) -> float | None:
        """Seconds from dispatch to the first callback; Discord allows 3."""
        return self.callbacks[0].after if self.callbacks else None

    @property
    def choices(self) -> list[dict[str, Any]] | None:
        for cb in self.callbacks:
            if cb.type == CALLBACK_AUTOCOMPLETE:
                return list(cb.data.get("choices", []))
        return None

    @property
    def answered(self) -> bool:
        """A visible answer exists (a message that is not still "thinking")."""
        return any(m.content and not m.loading for m in self.messages)

    @property
    def texts(self) -> list[str]:
        return [m.content for m in self.messages if m.content]


@dataclass
class _Fault:
    method: str | None
    glob: str
    status: int
    retry_after: float
    times: int


@dataclass
class StoredAttachment:
    """An uploaded file the emulator serves from its CDN path."""

    id: int
    filename: str
    data: bytes
    chunked: bool = False  # served without Content-Length, in 64 KiB pieces
    pad_to: int = 0  # bytes served when more than data (zeros follow)
    sent: int = 0  # bytes written to downloaders so far
    downloads: int = 0


@dataclass
class _Session:
    ws: web.WebSocketResponse
    compressor: Any  # zlib compressobj, or None for text frames
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    session_id: str = ""
    shard: tuple[int, int] = (0, 1)
    intents: int = 0
    seq: int = 0
    ready: bool = False
    close_code: int | None = None


# -- the emulator -------------------------------------------------------------------------------


class DiscordEmulator:
    """See the module docstring."""

    def __init__(
        self,
        *,
        token: str,
        recommended_shards: int = 1,
        max_concurrency: int = 1,
        heartbeat_interval_ms: int = 41_250,
    ) -> None:
        self.token = token
        self.recommended_shards = recommended_shards
        self.max_concurrency = max_concurrency
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.bot = User(BOT_ID, BOT_NAME, BOT_NAME, bot=True)
        self.application_id = BOT_ID  # as for every application created since 2020
        self.users: dict[int, User] = {BOT_ID: self.bot}
        self.guilds: dict[int, Guild] = {}
        self.channels: dict[int, Channel] = {}
        self.messages: dict[int, ShownMessage] = {}  # by id, in creation order
        self.interactions: dict[int, InteractionRecord] = {}
        self.admins: set[tuple[int, int]] = set()  # (guild, user) with Manage Server
        self.commands: dict[int | None, list[dict[str, Any]]] = {}  # guild id (None: global)
        self.identifies: list[dict[str, Any]] = []  # the IDENTIFY payloads, token removed
        self.sessions: dict[int, _Session] = {}  # by shard id
        self.closed_sessions: list[_Session] = []
        self.unknown_routes: list[str] = []
        self.attachments: dict[int, StoredAttachment] = {}
        self._calls: list[Call] = []
        self._faults: list[_Fault] = []
        self._holds: list[tuple[str | None, str, asyncio.Event]] = []
        self._counter = itertools.count(1)
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self._add_default_world()

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}{API_PREFIX}"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{GATEWAY_PATH}"

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        p = API_PREFIX
        app.add_routes([
            web.get(GATEWAY_PATH, self._gateway),
            web.get(f"{p}/users/@me", self._get_me),
            web.get(f"{p}/oauth2/applications/@me", self._get_application),
            web.get(f"{p}/applications/@me", self._get_application),
            web.get(f"{p}/gateway", self._get_gateway),
            web.get(f"{p}/gateway/bot", self._get_gateway_bot),
            web.post(f"{p}/channels/{{cid}}/messages", self._create_message),
            web.patch(f"{p}/channels/{{cid}}/messages/{{mid}}", self._edit_message),
            web.post(f"{p}/channels/{{cid}}/typing", self._typing),
            web.post(f"{p}/users/@me/channels", self._open_dm),
            web.put(f"{p}/applications/{{app}}/commands", self._sync_commands),
            web.put(f"{p}/applications/{{app}}/guilds/{{gid}}/commands", self._sync_commands),
            web.get(f"{p}/applications/{{app}}/commands", self._get_commands),
            web.get(f"{p}/applications/{{app}}/guilds/{{gid}}/commands", self._get_commands),
            web.post(f"{p}/interactions/{{iid}}/{{token}}/callback", self._interaction_callback),
            web.get(f"{p}/webhooks/{{app}}/{{token}}/messages/@original", self._get_original),
            web.patch(f"{p}/webhooks/{{app}}/{{token}}/messages/{{mid}}", self._edit_webhook),
            web.delete(f"{p}/webhooks/{{app}}/{{token}}/messages/{{mid}}", self._delete_webhook),
            web.post(f"{p}/webhooks/{{app}}/{{token}}", self._followup),
            web.get("/attachments/{cid}/{aid}/{name}", self._attachment),
            web.route("*", "/{tail:.*}", self._unknown),
        ])
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        for session in list(self.sessions.values()):
            await session.ws.close(code=1001, message=b"emulator closing")
        await runner.cleanup()

    async def __aenter__(self) -> DiscordEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- building the world ---------------------------------------------------------------------

    def snowflake(self) -> int:
        ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
        return (ms << 22) | (next(self._counter) & 0x3FFFFF)

    def _add_default_world(self) -> None:
        guild = self.add_guild("Test Server", guild_id=GUILD_ID, channel_id=TEXT_CHANNEL_ID)
        guild.roles[ROLE_ID] = "Mods"
        guild.roles[BOT_ROLE_ID] = "Memory Bot"
        guild.bot_roles[BOT_ROLE_ID] = BOT_ID
        thread = Channel(THREAD_ID, CHANNEL_PUBLIC_THREAD, "a thread", GUILD_ID, TEXT_CHANNEL_ID)
        guild.channels[THREAD_ID] = self.channels[THREAD_ID] = thread

    def add_guild(
        self,
        name: str,
        *,
        guild_id: int | None = None,
        channel_id: int | None = None,
        on_shard: tuple[int, int] | None = None,
    ) -> Guild:
        """A server with one text channel "general"; `on_shard=(id, count)` picks its id
        so that Discord's `(guild_id >> 22) % count` puts it on that shard."""
        if guild_id is None:
            guild_id = self.snowflake()
            if on_shard is not None:
                shard, count = on_shard
                guild_id += ((shard - (guild_id >> 22) % count) % count) << 22
        guild = Guild(guild_id, name, roles={guild_id: "@everyone"}, nicks={BOT_ID: None})
        channel = Channel(channel_id or self.snowflake(), CHANNEL_TEXT, "general", guild_id)
        guild.channels[channel.id] = self.channels[channel.id] = channel
        self.guilds[guild_id] = guild
        return guild

    def add_user(self, user_id: int, name: str, *, nick: str | None = None,
                 guild_id: int | None = None, bot: bool = False) -> User:
        user = self.users.get(user_id) or User(user_id, name.lower().replace(" ", "_"), name, bot)
        self.users[user_id] = user
        if guild_id is not None:
            self.guilds[guild_id].nicks[user_id] = nick
        return user

    def dm_channel(self, user_id: int) -> int:
        """The id of the DM channel between `user_id` and the bot (made on first use)."""
        for channel in self.channels.values():
            if channel.type == CHANNEL_DM and channel.recipient_id == user_id:
                return channel.id
        channel = Channel(self.snowflake(), CHANNEL_DM, recipient_id=user_id)
        self.channels[channel.id] = channel
        return channel.id

    def attachment(self, data: bytes, filename: str = "cat.png",
                   content_type: str | None = "image/png", *, size: int | None = None,
                   chunked: bool = False, pad_to: int = 0, flags: int = 0,
                   channel_id: int = TEXT_CHANNEL_ID) -> dict[str, Any]:
        """An attachment object as Discord sends it, its bytes served from this server.
        `size`: the size announced (default: what is served); `pad_to`: serve that many
        bytes (zeros after `data`); `flags` 8192: a voice message."""
        stored = StoredAttachment(self.snowflake(), filename, data, chunked, pad_to)
        self.attachments[stored.id] = stored
        url = f"http://127.0.0.1:{self.port}/attachments/{channel_id}/{stored.id}/{filename}"
        payload: dict[str, Any] = {
            "id": str(stored.id), "filename": filename,
            "size": max(len(data), pad_to) if size is None else size,
            "url": url, "proxy_url": url.replace("127.0.0.1", "localhost"), "flags": flags}
        if content_type is not None:
            payload["content_type"] = content_type
        if content_type and content_type.startswith("image/"):
            payload["width"] = payload["height"] = 64
        return payload

    # -- what users do --------------------------------------------------------------------------

    async def user_says(
        self,
        user_id: int,
        content: str,
        *,
        channel_id: int | None = None,
        mentions_bot: bool = False,
        reply_to: int | None = None,
        reply_ping: bool = False,
        is_bot: bool = False,
        webhook: bool = False,
        author_name: str | None = None,
        attachments: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """A user posts a message; returns the MESSAGE_CREATE payload as Discord builds it.

        Without `channel_id` it is a DM. `mentions_bot` puts `<@BOT>` in front of the
        text; `reply_to` makes it a reply (`reply_ping`: with the reply's ping on).
        """
        if channel_id is None:
            channel_id = self.dm_channel(user_id)
        channel = self.channels[channel_id]
        guild_id = channel.guild_id
        name = author_name or f"user{user_id}"
        if webhook:
            author = User(user_id, name, None, bot=True)  # webhook authors are flagged bots
        else:
            author = self.add_user(user_id, name, guild_id=guild_id, bot=is_bot)
        if mentions_bot:
            content = f"<@{BOT_ID}> {content}"
        referenced = self.messages.get(reply_to) if reply_to is not None else None
        if reply_to is not None and referenced is None:
            raise ValueError(f"no message {reply_to} to reply to")
        mentioned = [int(m) for m in _USER_MENTION.findall(content)]
        if referenced is not None and reply_ping and referenced.author_id not in mentioned:
            mentioned.append(referenced.author_id)
        payload: dict[str, Any] = {
            "id": str(self.snowflake()), "channel_id": str(channel_id), "author": author.payload(),
            "content": content, "timestamp": _now_iso(), "edited_timestamp": None, "tts": False,
            "mention_everyone": bool(_EVERYONE.search(content)),
            "mentions": [self._mention_payload(uid, guild_id) for uid in dict.fromkeys(mentioned)
                         if uid in self.users],
            "mention_roles": _ROLE_MENTION.findall(content), "attachments": attachments or [],
            "embeds": [], "pinned": False, "type": TYPE_REPLY if referenced else TYPE_DEFAULT,
            "flags": 0, "components": [],
        }
        if guild_id is not None:
            payload["guild_id"] = str(guild_id)
            if not webhook:
                payload["member"] = self.guilds[guild_id].member_payload(author, with_user=False)
        if webhook:
            payload["webhook_id"] = str(user_id)
        if referenced is not None:
            payload["message_reference"] = self._reference(referenced)
            payload["referenced_message"] = referenced.payload
        self._store(payload, author_id=author.id)
        await self._dispatch_message(payload, mentions_bot=BOT_ID in mentioned)
        await self._notify()
        return payload

    async def slash(
        self,
        user_id: int,
        name: str,
        options: dict[str, Any] | None = None,
        *,
        channel_id: int | None = None,
        author_name: str | None = None,
        locale: str = "en-US",
    ) -> InteractionRecord:
        """A user runs a synced slash command (in a DM unless `channel_id` is given);
        `locale` is the language of the user's Discord client."""
        return await self._interact(INTERACTION_COMMAND, user_id, name, options or {},
                                    channel_id=channel_id, author_name=author_name,
                                    locale=locale)

    async def autocomplete(
        self,
        user_id: int,
        name: str,
        option: str,
        partial: str,
        *,
        channel_id: int | None = None,
    ) -> InteractionRecord:
        """A user types `partial` into option `option` of command `name`."""
        return await self._interact(INTERACTION_AUTOCOMPLETE, user_id, name, {option: partial},
                                    channel_id=channel_id, focused=option)

    async def press(self, user_id: int, message: ShownMessage, custom_id: str, *,
                    author_name: str | None = None) -> InteractionRecord:
        """`user_id` presses the button `custom_id` on `message` (any id: a forged one too)."""
        return await self._component(user_id, message, {"custom_id": custom_id,
                                                        "component_type": COMPONENT_BUTTON},
                                     author_name=author_name)

    async def choose(self, user_id: int, message: ShownMessage, custom_id: str,
                     values: list[str], *, author_name: str | None = None) -> InteractionRecord:
        """`user_id` picks `values` in the select menu `custom_id` on `message` (any: a
        forged pick too)."""
        return await self._component(user_id, message, {
            "custom_id": custom_id, "component_type": COMPONENT_SELECT, "values": values},
            author_name=author_name)

    async def _component(self, user_id: int, message: ShownMessage, data: dict[str, Any], *,
                         author_name: str | None) -> InteractionRecord:
        """A MESSAGE_COMPONENT interaction (type 3) on `message`, with its `data`."""
        channel = self.channels[message.channel_id]
        record = InteractionRecord(
            id=self.snowflake(), token=secrets.token_urlsafe(48), type=INTERACTION_COMPONENT,
            name=data["custom_id"], options={"message_id": message.id,
                                             "values": data.get("values")},
            user_id=user_id, channel_id=channel.id, guild_id=channel.guild_id,
            dispatched_at=time.monotonic())
        payload = self._interaction_payload(record, channel, data, "en-US", author_name)
        payload["message"] = message.payload
        payload["app_permissions"] = str(MEMBER_PERMISSIONS)
        await self._deliver(record, payload)
        return record

    def _interaction_payload(self, record: InteractionRecord, channel: Channel,
                             data: dict[str, Any], locale: str,
                             author_name: str | None) -> dict[str, Any]:
        """An interaction as the gateway carries it, from its user (and member)."""
        guild_id = channel.guild_id
        user = self.add_user(record.user_id, author_name or f"user{record.user_id}",
                             guild_id=guild_id)
        payload = {
            "id": str(record.id), "application_id": str(self.application_id),
            "type": record.type, "token": record.token, "version": 1, "locale": locale,
            "data": data, "channel_id": str(channel.id), "channel": channel.payload(self.users),
            "app_permissions": "2248473465835073", "entitlements": [],
            "attachment_size_limit": 10 * 1024 * 1024,
            "context": 0 if guild_id is not None else 1,
            "authorizing_integration_owners": {"0": str(guild_id)} if guild_id is not None
            else {"1": str(record.user_id)},
        }
        self._add_member(payload, guild_id, user)
        return payload

    async def _deliver(self, record: InteractionRecord, payload: dict[str, Any]) -> None:
        """Send an interaction to the bot over the gateway."""
        self.interactions[record.id] = record
        session = self._session_for(record.guild_id)
        if session is None:
            raise RuntimeError("no gateway session to deliver the interaction to")
        await self._dispatch(session, "INTERACTION_CREATE", payload)

    def _add_member(self, payload: dict[str, Any], guild_id: int | None, user: User) -> None:
        """The interaction's member (with permissions: Manage Server for admins) or user."""
        if guild_id is None:
            payload["user"] = user.payload()
            return
        perms = MEMBER_PERMISSIONS | (MANAGE_GUILD if (guild_id, user.id) in self.admins else 0)
        payload["guild_id"] = str(guild_id)
        payload["guild_locale"] = self.guilds[guild_id].preferred_locale
        payload["member"] = {**self.guilds[guild_id].member_payload(user, with_user=True),
                             "permissions": str(perms)}

    # -- what tests read ------------------------------------------------------------------------

    def channel_messages(self, channel_id: int) -> list[ShownMessage]:
        """Every message in the channel, oldest first (users', the bot's, ephemeral ones)."""
        return [m for m in self.messages.values() if m.channel_id == channel_id]

    def bot_messages(self, channel_id: int) -> list[ShownMessage]:
        return [m for m in self.channel_messages(channel_id) if m.author_id == BOT_ID]

    def seen_by(self, user_id: int, channel_id: int) -> list[ShownMessage]:
        """What `user_id` sees in the channel: everything but other people's ephemerals."""
        return [m for m in self.channel_messages(channel_id)
                if m.visible_to is None or m.visible_to == user_id]

    def calls(self, prefix: str = "") -> list[Call]:
        """REST calls whose "METHOD /path" or "/path" starts with `prefix`."""
        return [c for c in self._calls
                if f"{c.method} {c.path}".startswith(prefix) or c.path.startswith(prefix)]

    def commands_synced(self, guild_id: int | None = None) -> list[str]:
        return [c["name"] for c in self.commands.get(guild_id, [])]

    @property
    def ready_shards(self) -> set[int]:
        return {sid for sid, s in self.sessions.items() if s.ready}

    def fail_next(
        self, path_glob: str, *, status: int = 429, retry_after: float = 0.3, times: int = 1
    ) -> None:
        """The next `times` requests matching `path_glob` ("PATCH /channels/*" or
        "/channels/*", without /api/v10) get `status`; a 429 is a real per-route limit."""
        method, _, glob = path_glob.rpartition(" ")
        self._faults.append(_Fault(method or None, glob, status, retry_after, times))

    def hold_next(self, path_glob: str) -> asyncio.Event:
        """The next request matching `path_glob` ("POST /channels/*/messages") is
        recorded at once but answered only once the returned event is set."""
        method, _, glob = path_glob.rpartition(" ")
        gate = asyncio.Event()
        self._holds.append((method or None, glob, gate))
        return gate

    async def wait_for(self, predicate: Callable[[], object], timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until `predicate()` is true, re-checked whenever the emulator's state changes."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(predicate)
        except TimeoutError:
            recent = ", ".join(str(c) for c in self._calls[-8:])
            raise TimeoutError(
                f"condition not met within {timeout}s; last calls: {recent}") from None

    async def wait_ready(self, shards: int = 1, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until `shards` gateway sessions got READY and all their GUILD_CREATEs."""
        await self.wait_for(lambda: len(self.ready_shards) >= shards, timeout)

    # -- internals: state -----------------------------------------------------------------------

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _mention_payload(self, user_id: int, guild_id: int | None) -> dict[str, Any]:
        user = self.users[user_id]
        data = user.payload()
        if guild_id is not None and user_id in self.guilds[guild_id].nicks:
            data["member"] = self.guilds[guild_id].member_payload(user, with_user=False)
        return data

    @staticmethod
    def _reference(msg: ShownMessage) -> dict[str, Any]:
        ref = {"type": 0, "message_id": str(msg.id), "channel_id": str(msg.channel_id)}
        if msg.guild_id is not None:
            ref["guild_id"] = str(msg.guild_id)
        return ref

    def _store(self, payload: dict[str, Any], *, author_id: int, **extra: Any) -> ShownMessage:
        msg = ShownMessage(
            id=int(payload["id"]), channel_id=int(payload["channel_id"]),
            guild_id=int(payload["guild_id"]) if payload.get("guild_id") else None,
            author_id=author_id, content=payload["content"], flags=payload.get("flags", 0),
            message_reference=payload.get("message_reference"),
            versions=[(time.monotonic(), payload["content"])], payload=payload, **extra,
        )
        self.messages[msg.id] = msg
        return msg

    def _bot_message_payload(self, channel: Channel, content: str, flags: int,
                             reference: ShownMessage | None) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "id": str(self.snowflake()), "channel_id": str(channel.id),
            "author": self.bot.payload(), "content": content, "timestamp": _now_iso(),
            "edited_timestamp": None, "tts": False, "mention_everyone": False,
            "mentions": [], "mention_roles": [], "attachments": [], "embeds": [],
            "pinned": False, "type": TYPE_REPLY if reference else TYPE_DEFAULT,
            "flags": flags, "components": [],
        }
        if channel.guild_id is not None:
            payload["guild_id"] = str(channel.guild_id)
        if reference is not None:
            payload["message_reference"] = self._reference(reference)
            payload["referenced_message"] = reference.payload
        return payload

    def _pings(self, content: str, allowed: dict[str, Any] | None,
               replied: ShownMessage | None) -> frozenset[str]:
        """Who Discord would notify for this content under these allowed mentions."""
        parse = {"users", "roles", "everyone"} if allowed is None else set(allowed.get("parse", []))
        users = {str(u) for u in (allowed or {}).get("users", [])}
        roles = {str(r) for r in (allowed or {}).get("roles", [])}
        out: set[str] = set()
        if _EVERYONE.search(content) and "everyone" in parse:
            out.add("everyone")
        out |= {f"user:{u}" for u in _USER_MENTION.findall(content)
                if "users" in parse or u in users}
        out |= {f"role:{r}" for r in _ROLE_MENTION.findall(content)
                if "roles" in parse or r in roles}
        replied_user = True if allowed is None else allowed.get("replied_user", False)
        if replied is not None and replied_user:
            out.add(f"user:{replied.author_id}")
        return frozenset(out)

    # -- internals: gateway ---------------------------------------------------------------------

    def _session_for(self, guild_id: int | None) -> _Session | None:
        if not self.sessions:
            return None
        count = next(iter(self.sessions.values())).shard[1]
        shard = 0 if guild_id is None else (guild_id >> 22) % count
        return self.sessions.get(shard)

    async def _send(self, session: _Session, payload: dict[str, Any]) -> None:
        data = json.dumps(payload, ensure_ascii=False)
        async with session.lock:  # the zlib stream must go out in the order it was made
            if session.ws.closed:
                return
            if session.compressor is None:
                await session.ws.send_str(data)
            else:
                compressed = session.compressor.compress(data.encode())
                compressed += session.compressor.flush(zlib.Z_SYNC_FLUSH)
                await session.ws.send_bytes(compressed)

    async def _dispatch(self, session: _Session, event: str, data: dict[str, Any]) -> None:
        session.seq += 1
        await self._send(session, {"op": 0, "t": event, "s": session.seq, "d": data})

    async def _dispatch_message(self, payload: dict[str, Any], *, mentions_bot: bool) -> None:
        guild_id = int(payload["guild_id"]) if payload.get("guild_id") else None
        session = self._session_for(guild_id)
        if session is None:
            return
        needed = INTENT_DIRECT_MESSAGES if guild_id is None else INTENT_GUILD_MESSAGES
        if not session.intents & needed:
            return
        own = payload["author"]["id"] == str(BOT_ID)
        if guild_id is not None and not own and not mentions_bot \
                and not session.intents & INTENT_MESSAGE_CONTENT:
            payload = {**payload, "content": "", "embeds": [], "attachments": [],
                       "components": []}
        await self._dispatch(session, "MESSAGE_CREATE", payload)

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        compress = request.query.get("compress") == "zlib-stream"
        session = _Session(ws, zlib.compressobj() if compress else None)
        await self._send(session, {"op": 10, "d": {"heartbeat_interval":
                                                   self.heartbeat_interval_ms},
                                   "s": None, "t": None})
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                await self._on_gateway_payload(session, json.loads(msg.data))
        finally:
            session.close_code = ws.close_code
            for sid, s in list(self.sessions.items()):
                if s is session:
                    del self.sessions[sid]
            self.closed_sessions.append(session)
            await self._notify()
        return ws

    async def _on_gateway_payload(self, session: _Session, payload: dict[str, Any]) -> None:
        op, data = payload.get("op"), payload.get("d")
        if op == 1:  # heartbeat
            await self._send(session, {"op": 11, "d": None, "s": None, "t": None})
        elif op == 2:  # identify
            await self._identify(session, data or {})
        elif op == 6:  # resume: not kept across connections here, so start afresh
            await self._send(session, {"op": 9, "d": False, "s": None, "t": None})

    async def _identify(self, session: _Session, data: dict[str, Any]) -> None:
        if data.get("token") != self.token:
            await session.ws.close(code=4004, message=b"Authentication failed.")
            return
        shard_id, count = data.get("shard") or [0, 1]
        if not 0 <= shard_id < count:
            await session.ws.close(code=4010, message=b"Invalid shard.")
            return
        self.identifies.append({k: v for k, v in data.items() if k != "token"})
        session.shard = (shard_id, count)
        session.intents = int(data.get("intents", 0))
        session.session_id = secrets.token_hex(16)
        self.sessions[shard_id] = session
        guilds = [g for g in self.guilds.values() if (g.id >> 22) % count == shard_id]
        await self._dispatch(session, "READY", {
            "v": 10, "user": {**self.bot.payload(), "verified": True, "mfa_enabled": False,
                              "flags": 0, "email": None},
            "guilds": [{"id": str(g.id), "unavailable": True} for g in guilds],
            "session_id": session.session_id, "resume_gateway_url": self.gateway_url,
            "shard": [shard_id, count], "private_channels": [], "relationships": [],
            "presences": [], "guild_join_requests": [], "geo_ordered_rtc_regions": [],
            "application": {"id": str(self.application_id), "flags": 1 << 19},
            "_trace": ["emulator"],
        })
        if session.intents & INTENT_GUILDS:
            for guild in guilds:
                await self._dispatch(session, "GUILD_CREATE", self._guild_payload(guild))
        session.ready = True
        await self._notify()

    def _guild_payload(self, guild: Guild) -> dict[str, Any]:
        channels = [c for c in guild.channels.values() if c.type != CHANNEL_PUBLIC_THREAD]
        threads = [c for c in guild.channels.values() if c.type == CHANNEL_PUBLIC_THREAD]
        return {
            "id": str(guild.id), "name": guild.name, "icon": None, "owner_id": "1",
            "unavailable": False, "large": False, "member_count": len(guild.nicks),
            "joined_at": _now_iso(), "features": [], "verification_level": 0,
            "default_message_notifications": 0, "explicit_content_filter": 0, "mfa_level": 0,
            "premium_tier": 0, "preferred_locale": guild.preferred_locale, "nsfw_level": 0,
            "system_channel_flags": 0, "emojis": [], "stickers": [], "voice_states": [],
            "presences": [], "stage_instances": [], "guild_scheduled_events": [],
            "soundboard_sounds": [],
            "roles": [{"id": str(rid), "name": name, "permissions": "68608", "position": 0,
                       "color": 0, "hoist": False, "managed": rid in guild.bot_roles,
                       "mentionable": True, "flags": 0,
                       **({"tags": {"bot_id": str(guild.bot_roles[rid])}}
                          if rid in guild.bot_roles else {})}
                      for rid, name in guild.roles.items()],
            "channels": [c.payload(self.users) for c in channels],
            "threads": [c.payload(self.users) for c in threads],
            "members": [guild.member_payload(self.users[uid], with_user=True)
                        for uid in guild.nicks if uid in self.users],
        }

    # -- internals: interactions ----------------------------------------------------------------

    async def _interact(self, kind: int, user_id: int, name: str, options: dict[str, Any], *,
                        channel_id: int | None, author_name: str | None = None,
                        focused: str | None = None,
                        locale: str = "en-US") -> InteractionRecord:
        if channel_id is None:
            channel_id = self.dm_channel(user_id)
        channel = self.channels[channel_id]
        guild_id = channel.guild_id
        command = next((c for c in self.commands.get(guild_id, []) + self.commands.get(None, [])
                        if c["name"] == name), None)
        if command is None:
            raise ValueError(f"/{name} was never synced")
        types = {o["name"]: o["type"] for o in command.get("options", [])}
        unknown = set(options) - set(types)
        if unknown:
            raise ValueError(f"/{name} has no option(s) {sorted(unknown)}")
        data_options = []
        for key, value in options.items():
            opt: dict[str, Any] = {"name": key, "type": types[key], "value": value}
            if key == focused:
                opt["focused"] = True
            data_options.append(opt)
        record = InteractionRecord(
            id=self.snowflake(), token=secrets.token_urlsafe(48), type=kind, name=name,
            options=options, user_id=user_id, channel_id=channel_id, guild_id=guild_id,
            dispatched_at=time.monotonic(),
        )
        data: dict[str, Any] = {"id": command["id"], "name": name, "type": 1,
                                "options": data_options}
        if command.get("guild_id"):
            data["guild_id"] = command["guild_id"]
        await self._deliver(record, self._interaction_payload(record, channel, data, locale,
                                                              author_name))
        return record

    def _interaction_by_token(self, token: str) -> InteractionRecord | None:
        return next((i for i in self.interactions.values() if i.token == token), None)

    def _interaction_message(self, record: InteractionRecord, data: dict[str, Any],
                             *, loading: bool = False) -> ShownMessage:
        channel = self.channels[record.channel_id]
        flags = int(data.get("flags") or 0) & FLAG_EPHEMERAL
        if loading:
            flags |= FLAG_LOADING
        payload = self._bot_message_payload(channel, data.get("content") or "", flags, None)
        payload["components"] = _components(data.get("components"))
        payload["interaction_metadata"] = {"id": str(record.id), "type": record.type,
                                           "user": self.users[record.user_id].payload(),
                                           "authorizing_integration_owners": {}}
        payload["webhook_id"] = str(self.application_id)
        msg = self._store(payload, author_id=BOT_ID, interaction_id=record.id,
                          allowed_mentions=data.get("allowed_mentions"),
                          visible_to=record.user_id if flags & FLAG_EPHEMERAL else None)
        msg.pinged = self._pings(msg.content, msg.allowed_mentions, None)
        record.messages.append(msg)
        return msg

    # -- internals: REST ------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == GATEWAY_PATH:
            return await handler(request)
        path = request.path.removeprefix(API_PREFIX)
        body = await self._read_body(request)
        call = Call(request.method, path, dict(request.query), body, time.monotonic())
        self._calls.append(call)
        request[_BODY] = body
        # Interaction and webhook routes are authorised by their token in the path; CDN
        # files by knowing their URL.
        token_route = path.startswith(("/interactions/", "/webhooks/", "/attachments/"))
        if not token_route and request.headers.get("Authorization") != f"Bot {self.token}":
            response: web.StreamResponse = _error(401, 0, "401: Unauthorized")
        else:
            hold = next((h for h in self._holds if h[0] in (None, request.method)
                         and fnmatch.fnmatchcase(path, h[1])), None)
            if hold is not None:
                self._holds.remove(hold)
                await self._notify()  # the call is in: a test may act while it is held
                await hold[2].wait()
            fault = self._take_fault(request.method, path)
            response = self._fault_response(fault) if fault else await handler(request)
        call.status = response.status
        await self._notify()
        return response

    @staticmethod
    async def _read_body(request: web.Request) -> Any:
        if not request.can_read_body:
            return None
        if request.content_type == "multipart/form-data":
            form = await request.post()
            raw = form.get("payload_json")
            return json.loads(str(raw)) if raw is not None else {}
        text = await request.text()
        try:
            return json.loads(text) if text else None
        except ValueError:
            return text

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        for fault in self._faults:
            if fault.method not in (None, method) or not fnmatch.fnmatchcase(path, fault.glob):
                continue
            fault.times -= 1
            if fault.times <= 0:
                self._faults.remove(fault)
            return fault
        return None

    @staticmethod
    def _fault_response(fault: _Fault) -> web.Response:
        if fault.status != 429:
            return _error(fault.status, 0, f"{fault.status}: injected failure")
        headers = {
            "Retry-After": str(max(1, round(fault.retry_after))),
            "X-RateLimit-Limit": "5", "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": f"{time.time() + fault.retry_after:.3f}",
            "X-RateLimit-Reset-After": f"{fault.retry_after:.3f}",
            "X-RateLimit-Bucket": "emulated-bucket", "X-RateLimit-Scope": "user",
            "Via": "1.1 google",  # discord.py takes a 429 without it for a Cloudflare ban
        }
        return _json({"message": "You are being rate limited.",
                      "retry_after": fault.retry_after, "global": False}, 429, headers)

    async def _attachment(self, request: web.Request) -> web.StreamResponse:
        stored = self.attachments.get(int(request.match_info["aid"]))
        if stored is None or stored.filename != request.match_info["name"]:
            return _error(404, 0, "404: Not Found")
        stored.downloads += 1
        body = stored.data + b"\0" * max(0, stored.pad_to - len(stored.data))
        return await serve_file(request, stored, body)

    async def _unknown(self, request: web.Request) -> web.Response:
        self.unknown_routes.append(f"{request.method} {request.path}")
        return _error(404, 0, "404: Not Found")

    async def _get_me(self, request: web.Request) -> web.Response:
        return _json({**self.bot.payload(), "verified": True, "mfa_enabled": False,
                      "flags": 0, "email": None, "locale": "en-US"})

    async def _get_application(self, request: web.Request) -> web.Response:
        return _json({
            "id": str(self.application_id), "name": BOT_NAME, "icon": None, "description": "",
            "bot_public": True, "bot_require_code_grant": False, "verify_key": "0" * 64,
            "owner": {"id": "1", "username": "owner", "global_name": "Owner",
                      "discriminator": "0", "avatar": None},
            "team": None, "flags": 1 << 19, "summary": "", "bot": self.bot.payload(),
        })

    async def _get_gateway(self, request: web.Request) -> web.Response:
        return _json({"url": self.gateway_url})

    async def _get_gateway_bot(self, request: web.Request) -> web.Response:
        return _json({"url": self.gateway_url, "shards": self.recommended_shards,
                      "session_start_limit": {"total": 1000, "remaining": 999,
                                              "reset_after": 14_400_000,
                                              "max_concurrency": self.max_concurrency}})

    async def _create_message(self, request: web.Request) -> web.Response:
        channel = self.channels.get(int(request.match_info["cid"]))
        if channel is None:
            return _error(404, 10003, "Unknown Channel")
        body = request[_BODY] or {}
        content = body.get("content") or ""
        if len(content) > MAX_CONTENT:
            return _too_long("content")
        if not content.strip() and not body.get("embeds") and not body.get("sticker_ids"):
            return _error(400, 50006, "Cannot send an empty message")
        ref_body = body.get("message_reference")
        reference = None
        if ref_body:
            reference = self.messages.get(int(ref_body.get("message_id", 0)))
            if reference is None and ref_body.get("fail_if_not_exists", True):
                return _error(400, 50035, "Invalid Form Body", {"message_reference": {
                    "_errors": [{"code": "MESSAGE_REFERENCE_UNKNOWN_MESSAGE",
                                 "message": "Unknown message"}]}})
        payload = self._bot_message_payload(channel, content, 0, reference)
        payload["components"] = _components(body.get("components"))
        msg = self._store(payload, author_id=BOT_ID,
                          allowed_mentions=body.get("allowed_mentions"))
        msg.pinged = self._pings(content, msg.allowed_mentions, reference)
        echo = payload
        if channel.guild_id is not None:
            echo = {**payload, "member": self.guilds[channel.guild_id].member_payload(
                self.bot, with_user=False)}
        await self._dispatch_message(echo, mentions_bot=False)
        return _json(payload)

    async def _edit_message(self, request: web.Request) -> web.Response:
        msg = self.messages.get(int(request.match_info["mid"]))
        if msg is None or msg.channel_id != int(request.match_info["cid"]):
            return _error(404, 10008, "Unknown Message")
        if msg.author_id != BOT_ID or msg.interaction_id is not None:
            return _error(403, 50005, "Cannot edit a message authored by another user")
        return self._apply_edit(msg, request[_BODY] or {})

    def _apply_edit(self, msg: ShownMessage, body: dict[str, Any]) -> web.Response:
        bad = _bad_components(body.get("components"))
        if bad is not None:
            return _error(400, 50035, f"Invalid Form Body: {bad}")
        if "content" in body:
            content = body["content"] or ""
            if len(content) > MAX_CONTENT:
                return _too_long("content")
            msg.content = content
            msg.versions.append((time.monotonic(), content))
            msg.flags &= ~FLAG_LOADING
        if "allowed_mentions" in body:
            msg.allowed_mentions = body["allowed_mentions"]
        if "components" in body:  # [] or null: the buttons go
            msg.payload = {**msg.payload, "components": _components(body["components"])}
        replied = self.messages.get(msg.replies_to) if msg.replies_to else None
        msg.pinged = self._pings(msg.content, msg.allowed_mentions, replied)
        msg.payload = {**msg.payload, "content": msg.content, "flags": msg.flags,
                       "edited_timestamp": _now_iso()}
        return _json(msg.payload)

    async def _typing(self, request: web.Request) -> web.Response:
        if int(request.match_info["cid"]) not in self.channels:
            return _error(404, 10003, "Unknown Channel")
        return web.Response(status=204)

    async def _open_dm(self, request: web.Request) -> web.Response:
        recipient = int((request[_BODY] or {}).get("recipient_id", 0))
        if recipient not in self.users:
            return _error(400, 50007, "Cannot send messages to this user")
        return _json(self.channels[self.dm_channel(recipient)].payload(self.users))

    async def _sync_commands(self, request: web.Request) -> web.Response:
        if int(request.match_info["app"]) != self.application_id:
            return _error(403, 50001, "Missing Access")
        guild_id = int(request.match_info["gid"]) if "gid" in request.match_info else None
        if guild_id is not None and guild_id not in self.guilds:
            return _error(403, 50001, "Missing Access")
        synced = []
        for command in request[_BODY] or []:
            localized = (command.get("description_localizations") or {}).values()
            if len(command.get("description", "")) > 100 or any(len(d) > 100 for d in localized):
                return _error(400, 50035, "Invalid Form Body")
            entry = {**command, "id": str(self.snowflake()),
                     "application_id": str(self.application_id), "version": "1",
                     "type": command.get("type", 1), "default_member_permissions": None,
                     "options": command.get("options", [])}
            if guild_id is not None:
                entry["guild_id"] = str(guild_id)
            synced.append(entry)
        self.commands[guild_id] = synced
        return _json(synced)

    async def _get_commands(self, request: web.Request) -> web.Response:
        guild_id = int(request.match_info["gid"]) if "gid" in request.match_info else None
        return _json(self.commands.get(guild_id, []))

    async def _interaction_callback(self, request: web.Request) -> web.Response:
        record = self.interactions.get(int(request.match_info["iid"]))
        if record is None or record.token != request.match_info["token"]:
            return _error(404, 10062, "Unknown interaction")
        after = time.monotonic() - record.dispatched_at
        if record.callbacks:
            return _error(400, 40060, "Interaction has already been acknowledged.")
        if after > INTERACTION_ACK_SECONDS:
            return _error(404, 10062, "Unknown interaction")
        body = request[_BODY] or {}
        kind, data = int(body.get("type", 0)), body.get("data") or {}
        if kind == CALLBACK_MESSAGE and len(data.get("content") or "") > MAX_CONTENT:
            return _too_long("data.content")
        if kind == CALLBACK_AUTOCOMPLETE and len(data.get("choices", [])) > 25:
            return _error(400, 50035, "Invalid Form Body")
        bad = _bad_components(data.get("components"))
        if bad is not None:
            return _error(400, 50035, f"Invalid Form Body: {bad}")
        record.callbacks.append(Callback(kind, data, after))
        if kind == CALLBACK_UPDATE and record.type == INTERACTION_COMPONENT:
            pressed = self.messages.get(record.options["message_id"])
            if pressed is not None:
                self._apply_edit(pressed, data)
        result: dict[str, Any] = {"interaction": {"id": str(record.id), "type": record.type}}
        if kind in (CALLBACK_MESSAGE, CALLBACK_DEFERRED):
            msg = self._interaction_message(record, data, loading=kind == CALLBACK_DEFERRED)
            result["interaction"].update({"response_message_id": str(msg.id),
                                          "response_message_loading": msg.loading,
                                          "response_message_ephemeral": msg.ephemeral})
            result["resource"] = {"type": kind, "message": msg.payload}
        return _json(result)

    def _webhook_interaction(self, request: web.Request) -> InteractionRecord | None:
        if int(request.match_info["app"]) != self.application_id:
            return None
        return self._interaction_by_token(request.match_info["token"])

    def _webhook_message(
            self, request: web.Request) -> tuple[InteractionRecord, ShownMessage] | None:
        """The interaction's message a webhook route names: "@original" or an id."""
        record = self._webhook_interaction(request)
        mid = request.match_info.get("mid", "@original")
        if record is not None and record.type == INTERACTION_COMPONENT and mid == "@original":
            # After a deferred update, @original is the message the component is on.
            pressed = self.messages.get(record.options["message_id"])
            return (record, pressed) if pressed is not None else None
        if record is None or not record.messages:
            return None
        msg = record.messages[0] if mid == "@original" else next(
            (m for m in record.messages if str(m.id) == mid), None)
        return (record, msg) if msg is not None else None

    async def _get_original(self, request: web.Request) -> web.Response:
        found = self._webhook_message(request)
        if found is None:
            return _error(404, 10008, "Unknown Message")
        return _json(found[1].payload)

    async def _edit_webhook(self, request: web.Request) -> web.Response:
        found = self._webhook_message(request)
        if found is None:
            return _error(404, 10008, "Unknown Message")
        return self._apply_edit(found[1], request[_BODY] or {})

    async def _delete_webhook(self, request: web.Request) -> web.Response:
        found = self._webhook_message(request)
        if found is None:
            return _error(404, 10008, "Unknown Message")
        record, msg = found
        if msg in record.messages:
            record.messages.remove(msg)
        del self.messages[msg.id]
        return web.Response(status=204)

    async def _followup(self, request: web.Request) -> web.Response:
        record = self._webhook_interaction(request)
        if record is None or not record.acknowledged:
            return _error(404, 10015, "Unknown Webhook")
        data = request[_BODY] or {}
        if len(data.get("content") or "") > MAX_CONTENT:
            return _too_long("content")
        if not (data.get("content") or "").strip():
            return _error(400, 50006, "Cannot send an empty message")
        return _json(self._interaction_message(record, data).payload)
