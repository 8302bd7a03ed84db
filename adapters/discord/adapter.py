"""The Discord adapter: discord.py 2.x in, the core's reply stream out.

It answers every DM, and in servers the messages that mention the bot or reply to
it; slash commands are generated from the core's declared commands and run as
them. Replies stream through the shared renderer (throttled edits, 2000-character
messages). It holds no memory logic: everything about a conversation happens in
`service.handle`.

Lifecycle (adapters.base: connect, listen, disconnect): log in, sync slash
commands, connect every shard this process runs (always `AutoShardedClient`: one
code path for one shard or many, and it can close its gateway connections while
REST stays usable); when `stop` is set, close
the gateway, let replies in flight finish (SHUTDOWN_GRACE, after which the core
cuts them short, plus a margin), then close the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType

import discord
import yarl
from discord import app_commands
from discord.gateway import DiscordWebSocket
from discord.http import HTTPClient, Route

from adapters.base import Adapter
from adapters.discord.commands import SlashCommands
from adapters.discord.inbound import (
    images_of,
    incoming_from_interaction,
    incoming_from_message,
    is_addressed,
    place_of,
    text_for_model,
    unsupported_kind,
)
from adapters.discord.picks import PickButton, Picks, PickSelect
from adapters.discord.settings import bot_token, shard_ids
from adapters.discord.sink import APOLOGY, MESSAGE_LIMIT, ChannelSink
from bot.i18n import N_
from bot.images import Downloader
from bot.reply import Reply
from bot.settings import Settings

log = logging.getLogger(__name__)

IDENTIFY_WINDOW = 5.0  # Discord: one IDENTIFY per 5 s in each max_concurrency bucket
DRAIN_MARGIN = 5.0  # after SHUTDOWN_GRACE the core stops replies; this lets them end
CONNECTION_CLOSE_WAIT = 5.0
STOP_BUTTON = N_("Stop")  # the Stop button's label, beside ⏹


def gateway_intents() -> discord.Intents:
    """Only what answering needs."""
    intents = discord.Intents.none()
    intents.guild_messages = True
    intents.dm_messages = True
    intents.message_content = True  # privileged: enable it in the developer portal
    # Not privileged; discord.py needs the guild cache to resolve channels, threads,
    # roles and nicknames (mentions become display names) and to tell servers from DMs.
    intents.guilds = True
    return intents


class DiscordEndpoints:
    """Points discord.py at another REST base (a proxy, or the test emulator).

    discord.py reads its REST base (`Route.BASE`) and its default gateway
    (`DiscordWebSocket.DEFAULT_GATEWAY`) from class attributes with no per-client
    option, so they are set here for the life of `run`, and put back afterwards.
    The gateway URL is asked of that API (`GET /gateway`), as Discord intends.
    """

    def __init__(self, api_base: str) -> None:
        self._base = api_base.rstrip("/")
        self._saved: tuple[str, yarl.URL] | None = None

    def __enter__(self) -> DiscordEndpoints:
        if self._base:
            self._saved = (Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY)
            Route.BASE = self._base
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._saved is not None:
            Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = self._saved
            self._saved = None

    async def discover_gateway(self, http: HTTPClient) -> None:
        if self._base:
            data = await http.request(Route("GET", "/gateway"))
            DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(data["url"])


class _GatewayClient(discord.AutoShardedClient):
    """AutoShardedClient with the adapter's hooks and Discord's real IDENTIFY pacing."""

    def __init__(self, adapter: DiscordAdapter, **options: object) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self._adapter = adapter
        self.picks = Picks(adapter.service, adapter.tracked)  # presses on choice menus
        self.add_dynamic_items(PickButton, PickSelect)
        self._identified: dict[int, float] = {}  # bucket → when it last identified
        self._max_concurrency: int | None = None

    async def setup_hook(self) -> None:
        await self._adapter.sync_commands()

    async def on_message(self, message: discord.Message) -> None:
        await self._adapter.on_message(message)

    async def on_ready(self) -> None:
        log.info("discord: ready as %s in %d servers (shards %s of %s)", self.user,
                 len(self.guilds), sorted(self.shards), self.shard_count)

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        # discord.py waits 5 s before every IDENTIFY but the first; Discord's rule is one
        # per 5 s in each bucket `shard_id % max_concurrency` (see discord.py #8430).
        loop = asyncio.get_running_loop()
        if self._identified and self._max_concurrency is None:
            try:
                limits = await self.fetch_session_start_limits()
                self._max_concurrency = max(1, limits.max_concurrency)
            except discord.DiscordException:
                self._max_concurrency = 1
        bucket = (shard_id or 0) % (self._max_concurrency or 1)
        last = self._identified.get(bucket)
        if last is not None:
            await asyncio.sleep(max(0.0, last + IDENTIFY_WINDOW - loop.time()))
        self._identified[bucket] = loop.time()


class DiscordAdapter(Adapter[discord.Message]):
    """Started by `python -m bot` when DISCORD_TOKEN is set."""

    name = "discord"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._token = bot_token(settings)
        self._shards = shard_ids(settings)  # checked now: a bad value stops the start
        self._accepting = False
        self._client: _GatewayClient | None = None
        self._tree: app_commands.CommandTree[_GatewayClient] | None = None
        self._endpoints = DiscordEndpoints(settings.DISCORD_API_BASE)
        self._connection: asyncio.Task[None] | None = None
        self._downloads = Downloader()  # image attachments the users send

    @property
    def client(self) -> discord.AutoShardedClient | None:
        """The running client (for diagnostics and tests)."""
        return self._client

    @property
    def connected(self) -> bool:
        client = self._client
        return (self._accepting and client is not None and client.is_ready()
                and not client.is_closed())

    def _make_client(self) -> _GatewayClient:
        s = self._settings
        # The bot has no voice: discord.py's one-time "voice will NOT be supported"
        # warnings (its own process-wide flags) would only puzzle operators.
        discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False
        return _GatewayClient(
            self,
            intents=gateway_intents(),
            # Set on the client so that no send or edit can forget it: the model's text
            # never pings @everyone, @here, roles or users.
            allowed_mentions=discord.AllowedMentions.none(),
            shard_count=s.DISCORD_SHARD_COUNT,
            shard_ids=self._shards,
            chunk_guilds_at_startup=False,
        )

    async def connect(self) -> None:
        self._endpoints.__enter__()
        client = self._client = self._make_client()
        self._tree = app_commands.CommandTree(client)
        slash = SlashCommands(self.service, self.tracked)
        slash.install(self._tree)
        await self._tree.set_translator(slash.translator())
        self._connection = None
        try:
            await client.login(self._token)
            await self._endpoints.discover_gateway(client.http)
        except BaseException:
            await self.disconnect()
            raise

    async def listen(self, stop: asyncio.Event) -> None:
        client = self._client
        assert client is not None
        self._accepting = True
        connection = self._connection = asyncio.create_task(client.connect(),
                                                            name="discord-gateway")
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({connection, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()

    async def disconnect(self) -> None:
        client, connection = self._client, self._connection
        try:
            if client is not None:
                await self._shut_down(client, connection)
        finally:
            self._endpoints.__exit__(None, None, None)
            self._connection = None
            await self._downloads.aclose()
        if connection is not None and connection.done() and not connection.cancelled():
            connection.result()  # the gateway failed for good (bad token, intents…)

    async def _shut_down(self, client: _GatewayClient,
                         connection: asyncio.Task[None] | None) -> None:
        """Close the gateway, let replies finish over REST, then close the client."""
        self._accepting = False
        for shard in list(client.shards.values()):
            with contextlib.suppress(Exception):
                await shard.disconnect()
        await self.drain(self._settings.SHUTDOWN_GRACE + DRAIN_MARGIN)
        await client.close()
        if connection is not None and not connection.done():
            # close() tells connect() to return; bound the wait all the same.
            done, _ = await asyncio.wait({connection}, timeout=CONNECTION_CLOSE_WAIT)
            if not done:
                connection.cancel()
        log.info("discord: disconnected")

    async def sync_commands(self) -> None:
        """Sync slash commands globally, and at once to DISCORD_DEV_GUILD if set."""
        tree = self._tree
        assert tree is not None
        try:
            synced = await tree.sync()
            log.info("discord: %d slash commands synced globally", len(synced))
            dev_guild = self._settings.DISCORD_DEV_GUILD
            if dev_guild:
                guild = discord.Object(id=dev_guild)
                tree.copy_global_to(guild=guild)
                await tree.sync(guild=guild)
                log.info("discord: slash commands synced to development server %s", dev_guild)
        except discord.HTTPException as exc:
            log.warning("discord: could not sync slash commands: %s", exc)

    async def on_message(self, message: discord.Message) -> None:
        client, service = self._client, self._service
        me = client.user if client is not None else None
        if not self._accepting or me is None or service is None:
            return
        if not is_addressed(message, me.id):
            return
        text = text_for_model(message, me.id)
        images, unsupported = images_of(message, self._downloads), unsupported_kind(message)
        if not text and not images and not unsupported:  # just the mention
            return
        with self.tracked():
            sink = _sink_for(message)
            incoming = incoming_from_message(message, text, images=images,
                                             unsupported=unsupported)
            try:
                reply = await service.handle(incoming)
                await self._show(reply, message, sink)
            except Exception:
                log.exception("discord: answering message %s in channel %s failed",
                              message.id, message.channel.id)
                await sink.apologise(service.translator_for(incoming).gettext(APOLOGY))

    async def send(self, reply: Reply, to: discord.Message) -> None:
        """Answer `to` in its channel."""
        await self._show(reply, to, _sink_for(to))

    async def _show(self, reply: Reply, to: discord.Message, sink: ChannelSink) -> None:
        """Stream a reply; a streaming answer carries a Stop button until it ends."""
        if not reply.streaming:
            await self.stream(reply, sink, limit=MESSAGE_LIMIT)
            return
        # In the asker's language as far as known here (no store round trip).
        label = self.service.known_translator(incoming_from_message(to, "")).gettext(STOP_BUTTON)
        sink = _sink_for(to, view=StopView(self, to.author.id, reply.id, label),
                         edit_interval=self._settings.STREAM_EDIT_INTERVAL)
        try:
            await self.stream(reply, sink, limit=MESSAGE_LIMIT, on_end=sink.release_view)
        finally:
            with contextlib.suppress(discord.HTTPException):
                await sink.drop_view()

    async def stop_pressed(self, interaction: discord.Interaction, owner: int,
                           reply_id: int) -> None:
        """A press on a reply's Stop button: the asker's is acknowledged first."""
        with self.tracked():
            incoming = incoming_from_interaction(interaction, "/stop")
            if interaction.user.id == owner:
                await interaction.response.defer()  # "got it" within Discord's 3 s
                await self.service.stop_answer(incoming, reply_id)
                return
            # Someone else: the core decides (a server admin may stop it).
            result = await self.service.stop_answer(incoming, reply_id)
            await interaction.response.send_message(await self.collect(result),
                                                    ephemeral=True)


class StopView(discord.ui.View):
    """The Stop button of one streaming reply (custom id `stop:<asker>:<reply id>`)."""

    def __init__(self, adapter: DiscordAdapter, owner: int, reply_id: int,
                 label: str = STOP_BUTTON) -> None:
        super().__init__(timeout=None)
        button: discord.ui.Button[StopView] = discord.ui.Button(
            label=label, emoji="⏹", style=discord.ButtonStyle.secondary,
            custom_id=f"stop:{owner}:{reply_id}")

        async def pressed(interaction: discord.Interaction) -> None:
            await adapter.stop_pressed(interaction, owner, reply_id)

        button.callback = pressed  # type: ignore[method-assign]
        self.add_item(button)


def _sink_for(message: discord.Message, *, view: discord.ui.View | None = None,
              edit_interval: float = 0.0) -> ChannelSink:
    # In a server the answer replies to the user's message; in a DM that is noise.
    return ChannelSink(message.channel, message if place_of(message) is not None else None,
                       view=view, edit_interval=edit_interval)
