"""A Telegram Bot API server for tests: the real python-telegram-bot talks to it.

`TelegramApiEmulator` is an aiohttp server on 127.0.0.1 that answers
`/bot<TOKEN>/<method>` like api.telegram.org (or a self-hosted Bot API
server) does: the same JSON shapes, the same error descriptions, HTML parse
mode parsed by Telegram's rules. It keeps, per chat, the messages as a user
would see them (text after parsing, entities, edit history, keyboards) and
every call it received, so tests can assert both what the user saw and what
crossed the wire.

Files: `add_file` keeps bytes to serve (`photo_size`, `document` build the
objects a message carries); `getFile` answers with a `file_path`, and
`/file/bot<TOKEN>/<file_path>` (what python-telegram-bot builds from
`base_file_url`) serves the bytes, with Content-Length or chunked, and may send
more than the `file_size` it announced (a lying file, for read-time checks);
`StoredFile.sent` counts what actually went out.

Tests drive it with `user_says`, `press_button`, `fail_next`, and wait with
`await wait_for(predicate)`, which re-checks after every state change (no
sleeping). It is stricter than the real server in one place: a bare `&`
that starts no known entity is refused (Telegram keeps it literally), so a
converter that forgets to escape is caught.

Standalone: `python -m tests.fakes.telegram_api --port 0` prints
`READY <base_url> <token>` and serves until interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import re
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from tests.fakes.files import serve_file

MAX_MESSAGE_UTF16 = 4096
MAX_CALLBACK_DATA_BYTES = 64
DEFAULT_TOKEN = "7000001:AAEmulatorSecretTokenDoNotLog_x9Zq"
CHAT_ACTIONS = frozenset({
    "typing", "upload_photo", "record_video", "upload_video", "record_voice", "upload_voice",
    "upload_document", "choose_sticker", "find_location", "record_video_note",
    "upload_video_note",
})

# Form-encoded bodies carry everything as strings; these fields are not strings.
_INT_FIELDS = frozenset({
    "chat_id", "message_id", "offset", "limit", "timeout", "message_thread_id", "cache_time",
    "user_id", "max_connections", "from_chat_id", "reply_to_message_id",
})
_BOOL_FIELDS = frozenset({
    "disable_notification", "protect_content", "show_alert", "drop_pending_updates",
    "allow_sending_without_reply", "disable_web_page_preview", "is_personal",
})
_JSON_FIELDS = frozenset({
    "reply_markup", "reply_parameters", "entities", "caption_entities", "allowed_updates",
    "commands", "scope", "link_preview_options",
})


class ApiError(Exception):
    """An error answer of the Bot API: `{"ok": false, "error_code", "description"}`."""

    def __init__(self, status: int, description: str, *, retry_after: int | None = None) -> None:
        super().__init__(description)
        self.status = status
        self.description = description
        self.retry_after = retry_after

    def payload(self) -> dict[str, Any]:
        body: dict[str, Any] = {"ok": False, "error_code": self.status,
                                "description": self.description}
        if self.retry_after is not None:
            body["parameters"] = {"retry_after": self.retry_after}
        return body


def bad_request(detail: str) -> ApiError:
    return ApiError(400, f"Bad Request: {detail}")


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


# --------------------------------------------------------------------------- HTML parse mode

_HTML_TAGS = frozenset({
    "b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "span", "tg-spoiler", "a",
    "code", "pre", "blockquote", "tg-emoji",
})
_ENTITY_OF_TAG = {
    "b": "bold", "strong": "bold", "i": "italic", "em": "italic", "u": "underline",
    "ins": "underline", "s": "strikethrough", "strike": "strikethrough", "del": "strikethrough",
    "span": "spoiler", "tg-spoiler": "spoiler", "code": "code", "pre": "pre",
    "blockquote": "blockquote", "a": "text_link", "tg-emoji": "custom_emoji",
}
_NAMED_ENTITIES = {"lt": "<", "gt": ">", "amp": "&", "quot": '"'}
_URL_SCHEMES = ("http://", "https://", "tg://", "mailto:", "ton://")
_CHAR_REF = re.compile(r"&(#[0-9]{1,8}|#x[0-9a-fA-F]{1,7}|[a-zA-Z]+);?")


class HtmlError(Exception):
    """Why Telegram refused the markup (the part after "can't parse entities: ")."""


@dataclass
class _OpenTag:
    name: str
    start: int  # UTF-16 offset in the visible text
    attrs: dict[str, str]


def _byte_offset(markup: str, index: int) -> int:
    return len(markup[:index].encode("utf-8"))


def _decode_entity(markup: str, i: int) -> tuple[str, int] | None:
    """Decode the character reference at markup[i] == "&": (char, next index) or None."""
    m = _CHAR_REF.match(markup, i)
    if not m:
        return None
    body = m.group(1)
    if body.startswith("#x"):
        code = int(body[2:], 16)
    elif body.startswith("#"):
        code = int(body[1:])
    elif body in _NAMED_ENTITIES:
        return _NAMED_ENTITIES[body], m.end()
    else:
        return None
    if code == 0 or code >= 0x10FFFF or 0xD800 <= code <= 0xDFFF:
        return None
    return chr(code), m.end()


def _parse_attributes(markup: str, i: int, tag: str, begin: int) -> tuple[dict[str, str], int]:
    """Parse `name="value"` pairs up to ">" as Telegram does; return them and the index of ">"."""
    attrs: dict[str, str] = {}
    n = len(markup)
    while True:
        while i < n and markup[i].isspace():
            i += 1
        if i >= n:
            raise HtmlError(f"Unclosed start tag at byte offset {_byte_offset(markup, begin)}")
        if markup[i] == ">":
            return attrs, i
        name_start = i
        while i < n and not markup[i].isspace() and markup[i] not in "=>":
            i += 1
        name = markup[name_start:i].lower()
        while i < n and markup[i].isspace():
            i += 1
        if not name or i >= n or markup[i] != "=":
            if i >= n:
                raise HtmlError(f"Unclosed start tag at byte offset {_byte_offset(markup, begin)}")
            raise HtmlError(
                "Expected equal sign in declaration of an attribute of the tag "
                f'"{tag}" at byte offset {_byte_offset(markup, begin)}')
        i += 1
        while i < n and markup[i].isspace():
            i += 1
        if i >= n:
            raise HtmlError(f"Unclosed start tag at byte offset {_byte_offset(markup, begin)}")
        if markup[i] in "\"'":
            quote = markup[i]
            i += 1
            value: list[str] = []
            while i < n and markup[i] != quote:
                if markup[i] == "&":
                    decoded = _decode_entity(markup, i)
                    if decoded:
                        value.append(decoded[0])
                        i = decoded[1]
                        continue
                value.append(markup[i])
                i += 1
            if i >= n:
                raise HtmlError(f"Unclosed start tag at byte offset {_byte_offset(markup, begin)}")
            i += 1
            attrs[name] = "".join(value)
        else:
            token_start = i
            while i < n and (markup[i].isalnum() or markup[i] in ".-"):
                i += 1
            if i < n and not markup[i].isspace() and markup[i] != ">":
                raise HtmlError("Unexpected end of name token at byte offset "
                                f"{_byte_offset(markup, token_start)}")
            attrs[name] = markup[token_start:i].lower()


def parse_html(markup: str) -> tuple[str, list[dict[str, Any]]]:
    """Parse Telegram HTML: (visible text, entities with UTF-16 offsets) or raise HtmlError."""
    out: list[str] = []
    offset = 0  # UTF-16 units emitted so far
    stack: list[_OpenTag] = []
    entities: list[dict[str, Any]] = []
    i, n = 0, len(markup)
    while i < n:
        ch = markup[i]
        if ch == "&":
            decoded = _decode_entity(markup, i)
            if decoded is None:
                raise HtmlError(f'Unescaped "&" at byte offset {_byte_offset(markup, i)}; '
                                "use &amp;")
            out.append(decoded[0])
            offset += utf16_len(decoded[0])
            i = decoded[1]
            continue
        if ch != "<":
            out.append(ch)
            offset += utf16_len(ch)
            i += 1
            continue
        begin = i
        if i + 1 < n and markup[i + 1] == "/":  # an end tag
            j = i + 2
            while j < n and not markup[j].isspace() and markup[j] != ">":
                j += 1
            name = markup[i + 2:j].lower()
            while j < n and markup[j].isspace():
                j += 1
            if j >= n or markup[j] != ">":
                raise HtmlError(f"Unclosed end tag at byte offset {_byte_offset(markup, begin)}")
            if not stack:
                raise HtmlError(f"Unexpected end tag at byte offset {_byte_offset(markup, begin)}")
            top = stack.pop()
            if name and name != top.name:
                raise HtmlError(
                    f"Unmatched end tag at byte offset {_byte_offset(markup, begin)}, "
                    f'expected "</{top.name}>", found "</{name}>"')
            _close_entity(top, offset, "".join(out), stack, entities)
            i = j + 1
            continue
        j = i + 1
        while j < n and not markup[j].isspace() and markup[j] != ">":
            j += 1
        if j >= n:
            raise HtmlError(f"Unclosed start tag at byte offset {_byte_offset(markup, begin)}")
        name = markup[i + 1:j].lower()
        if name not in _HTML_TAGS:
            raise HtmlError(
                f'Unsupported start tag "{name}" at byte offset {_byte_offset(markup, begin)}')
        attrs, j = _parse_attributes(markup, j, name, begin)
        if name == "span" and attrs.get("class") != "tg-spoiler":
            raise HtmlError(f'Tag "span" must have class "tg-spoiler" at byte offset '
                            f"{_byte_offset(markup, begin)}")
        if name == "blockquote" and any(t.name == "blockquote" for t in stack):
            raise HtmlError("Blockquote entities can't be nested at byte offset "
                            f"{_byte_offset(markup, begin)}")
        stack.append(_OpenTag(name, offset, attrs))
        i = j + 1
    if stack:
        raise HtmlError(f'Can\'t find end tag corresponding to start tag "{stack[-1].name}"')
    entities.sort(key=lambda e: (e["offset"], -e["length"]))
    return "".join(out), entities


def _close_entity(tag: _OpenTag, end: int, text: str, stack: list[_OpenTag],
                  entities: list[dict[str, Any]]) -> None:
    length = end - tag.start
    if length <= 0:
        return  # Telegram drops empty entities
    kind = _ENTITY_OF_TAG[tag.name]
    entity: dict[str, Any] = {"type": kind, "offset": tag.start, "length": length}
    if tag.name == "a":
        url = tag.attrs.get("href", "")
        if not url.startswith(_URL_SCHEMES):
            return  # Telegram silently drops a link it can't use
        entity["url"] = url
    elif tag.name == "blockquote" and "expandable" in tag.attrs:
        entity["type"] = "expandable_blockquote"
    elif tag.name == "code" and stack and stack[-1].name == "pre":
        language = tag.attrs.get("class", "")
        if language.startswith("language-"):
            stack[-1].attrs["language"] = language.removeprefix("language-")
        return  # <pre><code> is one pre entity
    elif tag.name == "pre" and tag.attrs.get("language"):
        entity["language"] = tag.attrs["language"]
    elif tag.name == "tg-emoji":
        entity["custom_emoji_id"] = tag.attrs.get("emoji-id", "")
    entities.append(entity)


def _trim(text: str, entities: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Telegram strips leading and trailing whitespace; entities follow."""
    stripped = text.lstrip()
    cut = utf16_len(text) - utf16_len(stripped)
    stripped = stripped.rstrip()
    size = utf16_len(stripped)
    kept = []
    for e in entities:
        start = max(0, e["offset"] - cut)
        end = min(size, e["offset"] + e["length"] - cut)
        if end > start:
            kept.append({**e, "offset": start, "length": end - start})
    return stripped, kept


def render_text(text: str, parse_mode: str | None) -> tuple[str, list[dict[str, Any]]]:
    """What the user sees for text sent with parse_mode, or raise ApiError as Telegram would."""
    if parse_mode in (None, ""):
        visible, entities = text, []
    elif parse_mode.lower() == "html":
        try:
            visible, entities = parse_html(text)
        except HtmlError as exc:
            raise bad_request(f"can't parse entities: {exc}") from None
    else:
        raise bad_request(f"unsupported parse_mode {parse_mode!r} (the emulator knows HTML)")
    visible, entities = _trim(visible, entities)
    if not visible:
        raise bad_request("message text is empty")
    if utf16_len(visible) > MAX_MESSAGE_UTF16:
        raise bad_request("message is too long")
    return visible, entities


# --------------------------------------------------------------------------- state


@dataclass
class ApiCall:
    """One request the emulator received."""

    method: str
    params: dict[str, Any]
    at: float  # time.monotonic() on arrival
    status: int = 200
    error: str | None = None
    content_type: str = ""  # of the request body ("" without one)


@dataclass
class Edit:
    """One state of a message: what it showed from `at` on."""

    at: float
    text: str
    entities: list[dict[str, Any]]
    reply_markup: dict[str, Any] | None


@dataclass
class VisibleMessage:
    """A message as the people in the chat see it."""

    chat: dict[str, Any]
    message_id: int
    sender: dict[str, Any]
    date: int
    sent_at: float
    text: str = ""
    entities: list[dict[str, Any]] = field(default_factory=list)
    markup_source: str | None = None  # the text as sent, before parsing
    parse_mode: str | None = None
    reply_markup: dict[str, Any] | None = None
    reply_to: VisibleMessage | None = None
    thread_id: int | None = None
    edits: list[Edit] = field(default_factory=list)  # later states, oldest first
    extra: dict[str, Any] = field(default_factory=dict)  # photo, sticker, caption ...

    @property
    def chat_id(self) -> int:
        return int(self.chat["id"])

    @property
    def from_bot(self) -> bool:
        return bool(self.sender.get("is_bot"))

    @property
    def changed_at(self) -> list[float]:
        """When the message appeared and each time it changed."""
        return [self.sent_at, *(e.at for e in self.edits)]

    @property
    def buttons(self) -> list[dict[str, Any]]:
        rows = (self.reply_markup or {}).get("inline_keyboard", [])
        return [button for row in rows for button in row]

    def to_api(self, *, with_reply: bool = True) -> dict[str, Any]:
        msg: dict[str, Any] = {
            "message_id": self.message_id, "from": self.sender, "chat": self.chat,
            "date": self.date,
        }
        if self.thread_id is not None:
            msg["message_thread_id"] = self.thread_id
            msg["is_topic_message"] = True
        if any(key in self.extra for key in _MEDIA_KEYS):
            msg.update(self.extra)
        elif self.text:
            msg["text"] = self.text
            if self.entities:
                msg["entities"] = self.entities
        if self.edits:
            msg["edit_date"] = int(time.time())
        if self.reply_markup:
            msg["reply_markup"] = self.reply_markup
        if with_reply and self.reply_to is not None:
            msg["reply_to_message"] = self.reply_to.to_api(with_reply=False)
        return msg


@dataclass
class StoredFile:
    """A file the emulator serves: its bytes, and the size it announces."""

    file_id: str
    file_unique_id: str
    file_path: str
    data: bytes
    announced: int | None  # file_size in messages and getFile; None: not said
    chunked: bool = False  # served without Content-Length, in 64 KiB pieces
    pad_to: int = 0  # bytes served when more than data (zeros follow): lying about its size
    sent: int = 0  # bytes written to downloaders so far
    downloads: int = 0
    gate: asyncio.Event | None = None  # a download waits for it before the first byte

    @property
    def served_size(self) -> int:
        return max(len(self.data), self.pad_to)

    def meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"file_id": self.file_id, "file_unique_id": self.file_unique_id}
        if self.announced is not None:
            meta["file_size"] = self.announced
        return meta


_MEDIA_KEYS = ("caption", "photo", "sticker", "document", "voice", "video")


@dataclass
class CallbackQuery:
    id: str
    user: dict[str, Any]
    message: VisibleMessage
    data: str
    answer: dict[str, Any] | None = None


@dataclass
class _Failure:
    status: int
    description: str
    retry_after: int | None
    times: int


_COMMAND_RE = re.compile(r"(?<!\S)/[A-Za-z0-9_]{1,32}(?:@[A-Za-z0-9_]{3,32})?")
_MENTION_RE = re.compile(r"(?<![\w@])@[A-Za-z0-9_]{5,32}\b")


def detect_entities(text: str) -> list[dict[str, Any]]:
    """bot_command and mention entities, as Telegram adds them to a user's message."""
    found = []
    for kind, pattern in (("bot_command", _COMMAND_RE), ("mention", _MENTION_RE)):
        for m in pattern.finditer(text):
            found.append({"type": kind, "offset": utf16_len(text[:m.start()]),
                          "length": utf16_len(m.group(0))})
    return sorted(found, key=lambda e: e["offset"])


class TelegramApiEmulator:
    """The Bot API on 127.0.0.1 for one bot. Use `async with TelegramApiEmulator() as tg:`."""

    def __init__(self, *, token: str = DEFAULT_TOKEN, username: str = "memory_test_bot",
                 first_name: str = "Memory Bot") -> None:
        self.bot_token = token
        self.bot_id = int(token.split(":", 1)[0])
        self.bot_username = username
        self.bot_user: dict[str, Any] = {
            "id": self.bot_id, "is_bot": True, "first_name": first_name, "username": username,
        }
        self.port = 0
        self.webhook_url = ""
        self.webhook_secret: str | None = None
        self.webhook_deliveries: list[tuple[int, int]] = []  # (update_id, http status)
        self._runner: web.AppRunner | None = None
        self._calls: list[ApiCall] = []
        self._failures: dict[str, list[_Failure]] = {}
        self._holds: dict[str, list[asyncio.Event]] = {}
        self._chats: dict[int, dict[str, Any]] = {}
        self._users: dict[int, dict[str, Any]] = {}
        self._messages: dict[int, list[VisibleMessage]] = {}
        self._next_message_id: dict[int, int] = {}
        self._updates: list[dict[str, Any]] = []  # not yet confirmed by an offset
        self._update_ids = itertools.count(100_001)
        self._query_ids = itertools.count(900_001)
        self._queries: dict[str, CallbackQuery] = {}
        self._allowed_updates: list[str] = []
        self._poll_generation = 0
        self._commands: dict[tuple[str, str], list[dict[str, Any]]] = {}
        # getChatMember: (chat, user) → status; anyone else in a group is a "member".
        self.member_status: dict[tuple[int, int], str] = {}
        self._changed = asyncio.Event()
        self._closing = False
        self._delivery: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self.files: dict[str, StoredFile] = {}  # by file_id
        self._file_ids = itertools.count(1)

    # ----------------------------------------------------------------- lifecycle

    async def start(self, port: int = 0) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/bot{token}/{method}", self._handle)
        app.router.add_route("*", "/file/bot{token}/{path:.*}", self._file)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        server = site._server  # the bound port is only known after start
        assert server is not None and server.sockets
        self.port = server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self._closing = True
        self._notify()
        if self._delivery is not None:
            self._delivery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._delivery
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> TelegramApiEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def base_url(self) -> str:
        """What to pass as TELEGRAM_BASE_URL (the token is appended by the library)."""
        return f"http://127.0.0.1:{self.port}/bot"

    @property
    def base_file_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/file/bot"

    # ----------------------------------------------------------------- test helpers

    def user_says(
        self,
        user_id: int,
        text: str,
        *,
        chat_id: int | None = None,
        chat_type: str = "private",
        chat_title: str = "Test Group",
        first_name: str | None = None,
        username: str | None = None,
        reply_to: VisibleMessage | None = None,
        is_bot: bool = False,
        caption_photo: bool = False,
        photo: list[dict[str, Any]] | None = None,
        document: dict[str, Any] | None = None,
        sticker: bool = False,
        voice: bool = False,
        video: bool = False,
        edited: bool = False,
        thread_id: int | None = None,
        language_code: str | None = None,
    ) -> dict[str, Any]:
        """A user sends `text`; queue the update and return the message as the bot gets it.

        `caption_photo`: a photo with `text` as its caption (no caption when text is "");
        `photo` (sizes from `photo_size`) or `document` (from `document`): that one, `text`
        its caption. `sticker`, `voice`, `video`: that (no text). `edited`: the update is an
        edit of this message.
        `language_code`: the user's app language from now on ("" sends none; default "en").
        """
        user = self._user(user_id, first_name=first_name, username=username, is_bot=is_bot,
                          language_code=language_code)
        if chat_type == "private":
            chat = {"id": user_id, "type": "private", "first_name": user["first_name"]}
            if user.get("username"):
                chat["username"] = user["username"]
        else:
            if chat_id is None:
                raise ValueError("a group message needs chat_id")
            chat = {"id": chat_id, "type": chat_type, "title": chat_title}
        chat_id = int(chat["id"])
        self._chats[chat_id] = chat
        extra: dict[str, Any] = {}
        if caption_photo and photo is None:
            photo = [self.photo_size(bytes(range(256)) * 4 + b"\xff" * 176, 90, 90)]  # 1200
        if photo is not None or document is not None:
            if photo is not None:
                extra["photo"] = photo
            if document is not None:
                extra["document"] = document
            if text:
                extra["caption"] = text
                caption_entities = detect_entities(text)
                if caption_entities:
                    extra["caption_entities"] = caption_entities
            text = ""
        elif voice:
            extra["voice"] = {**self.add_file(b"OggS" + b"\0" * 96, path_hint="voice.oga").meta(),
                              "duration": 2, "mime_type": "audio/ogg"}
            text = ""
        elif video:
            extra["video"] = {**self.add_file(b"\0" * 100, path_hint="video.mp4").meta(),
                              "width": 64, "height": 64, "duration": 1,
                              "mime_type": "video/mp4"}
            text = ""
        elif sticker:
            extra["sticker"] = {
                "file_id": "CAACAgIAAxkBAAE", "file_unique_id": "AgADsticker", "type": "regular",
                "width": 512, "height": 512, "is_animated": False, "is_video": False,
                "emoji": "🙂"}
            text = ""
        msg = self._store(chat, user, text, detect_entities(text), reply_to=reply_to,
                          thread_id=thread_id, extra=extra)
        api = msg.to_api()
        if edited:
            api["edit_date"] = int(time.time())
            self._queue_update({"edited_message": api})
        else:
            self._queue_update({"message": api})
        return api

    def add_file(self, data: bytes, *, announced: int | str | None = "exact",
                 chunked: bool = False, pad_to: int = 0,
                 path_hint: str = "photo.jpg") -> StoredFile:
        """Keep `data` to serve. `announced`: the file_size given out ("exact": its real
        size; None: none); `pad_to`: serve that many bytes (zeros after `data`)."""
        n = next(self._file_ids)
        stem, _, ext = path_hint.rpartition(".")
        stored = StoredFile(
            file_id=f"AgACAgIAAxkBAAE{n:06d}", file_unique_id=f"AQAD{n:06d}",
            file_path=f"{stem or 'file'}s/file_{n}.{ext}", data=data,
            announced=announced if not isinstance(announced, str)
            else max(len(data), pad_to),
            chunked=chunked, pad_to=pad_to)
        self.files[stored.file_id] = stored
        return stored

    def photo_size(self, data: bytes, width: int, height: int, **file: Any) -> dict[str, Any]:
        """One PhotoSize of a photo, its bytes served (`file`: add_file's options)."""
        return {**self.add_file(data, **file).meta(), "width": width, "height": height}

    def document(self, data: bytes, mime_type: str, file_name: str = "picture.png",
                 **file: Any) -> dict[str, Any]:
        """A Document (a file sent as a file), its bytes served."""
        return {**self.add_file(data, path_hint=file_name, **file).meta(),
                "file_name": file_name, "mime_type": mime_type}

    def file_by_id(self, file_id: str) -> StoredFile:
        return self.files[file_id]

    def post_as_bot(self, chat_id: int, text: str) -> VisibleMessage:
        """Put a message from the bot into a known chat, without any call (for unit tests)."""
        return self._store(self._chat(chat_id), self.bot_user, text, [])

    def press_button(self, user_id: int, message: VisibleMessage, data: str, *,
                     first_name: str | None = None) -> str:
        """`user_id` presses an inline button (any data: a forged press too); return its id."""
        user = self._user(user_id, first_name=first_name)
        query = CallbackQuery(str(next(self._query_ids)), user, message, data)
        self._queries[query.id] = query
        self._queue_update({"callback_query": {
            "id": query.id, "from": user, "message": message.to_api(),
            "chat_instance": f"ci{message.chat_id}", "data": data}})
        return query.id

    def callback_answer(self, query_id: str) -> dict[str, Any] | None:
        """The answerCallbackQuery params for that press, or None if unanswered."""
        return self._queries[query_id].answer

    def messages(self, chat_id: int) -> list[VisibleMessage]:
        return list(self._messages.get(chat_id, []))

    def bot_messages(self, chat_id: int) -> list[VisibleMessage]:
        return [m for m in self._messages.get(chat_id, []) if m.sender["id"] == self.bot_id]

    def bot_texts(self, chat_id: int) -> list[str]:
        return [m.text for m in self.bot_messages(chat_id)]

    def calls(self, method: str | None = None) -> list[ApiCall]:
        """Every call received (of one method), in order, with its params."""
        if method is None:
            return list(self._calls)
        return [c for c in self._calls if c.method.lower() == method.lower()]

    def params(self, method: str) -> list[dict[str, Any]]:
        return [c.params for c in self.calls(method)]

    def commands(self, scope: str = "default", language_code: str = "") -> list[dict[str, Any]]:
        return list(self._commands.get((scope, language_code), []))

    def fail_next(self, method: str, status: int, description: str, *,
                  retry_after: int | None = None, times: int = 1) -> None:
        """Answer the next `times` calls of `method` with this error instead."""
        self._failures.setdefault(method.lower(), []).append(
            _Failure(status, description, retry_after, times))

    def hold_next(self, method: str) -> asyncio.Event:
        """The next call of `method` is received (and recorded) at once but carried
        out only once the returned event is set: a call in flight, held there."""
        gate = asyncio.Event()
        self._holds.setdefault(method.lower(), []).append(gate)
        return gate

    @property
    def pending_updates(self) -> int:
        """Updates queued and not yet confirmed by the bot (offset)."""
        return len(self._updates)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0,  # noqa: ASYNC109
                       what: str = "condition") -> None:
        """Return once predicate() holds; re-checked after every call and state change."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}; "
                                   f"last calls: {[c.method for c in self._calls[-8:]]}")
            event = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), remaining)

    async def wait_for_call(self, method: str, count: int = 1,
                            timeout: float = 5.0) -> ApiCall:  # noqa: ASYNC109
        await self.wait_for(lambda: len(self.calls(method)) >= count, timeout,
                            f"{count} {method} call(s)")
        return self.calls(method)[count - 1]

    def transcript(self, chat_id: int) -> str:
        """The chat as text, for assertion messages."""
        return "\n".join(f"[{m.message_id}] {m.sender.get('username') or m.sender['id']}: "
                         f"{m.text or m.extra.get('caption', '<media>')}"
                         for m in self._messages.get(chat_id, []))

    # ----------------------------------------------------------------- internals

    def _notify(self) -> None:
        # Wake every waiter; the next change gets a fresh event.
        self._changed.set()
        self._changed = asyncio.Event()

    def _user(self, user_id: int, *, first_name: str | None = None, username: str | None = None,
              is_bot: bool = False, language_code: str | None = None) -> dict[str, Any]:
        user = self._users.get(user_id)
        if user is None or first_name or username:
            user = {"id": user_id, "is_bot": is_bot,
                    "first_name": first_name or (user or {}).get("first_name")
                    or f"User{user_id}"}
            name = username or (self._users.get(user_id) or {}).get("username")
            if name:
                user["username"] = name
            user["language_code"] = "en"
            self._users[user_id] = user
        if language_code is not None:
            user = {k: v for k, v in user.items() if k != "language_code"}
            if language_code:
                user["language_code"] = language_code
            self._users[user_id] = user
        return user

    def _store(self, chat: dict[str, Any], sender: dict[str, Any], text: str,
               entities: list[dict[str, Any]], *, reply_to: VisibleMessage | None = None,
               thread_id: int | None = None, extra: Mapping[str, Any] | None = None,
               markup_source: str | None = None, parse_mode: str | None = None,
               reply_markup: dict[str, Any] | None = None) -> VisibleMessage:
        chat_id = int(chat["id"])
        message_id = self._next_message_id.get(chat_id, 1)
        self._next_message_id[chat_id] = message_id + 1
        msg = VisibleMessage(
            chat=chat, message_id=message_id, sender=sender, date=int(time.time()),
            sent_at=time.monotonic(), text=text, entities=entities,
            markup_source=markup_source, parse_mode=parse_mode, reply_markup=reply_markup,
            reply_to=reply_to, thread_id=thread_id, extra=dict(extra or {}))
        self._messages.setdefault(chat_id, []).append(msg)
        self._notify()
        return msg

    def _queue_update(self, body: dict[str, Any]) -> int:
        update_id = next(self._update_ids)
        self._updates.append({"update_id": update_id, **body})
        self._notify()
        if self.webhook_url:
            self._ensure_delivery()
        return update_id

    def _find(self, chat_id: int, message_id: int) -> VisibleMessage | None:
        for msg in self._messages.get(chat_id, []):
            if msg.message_id == message_id:
                return msg
        return None

    def _chat(self, chat_id: Any) -> dict[str, Any]:
        if not isinstance(chat_id, int) or chat_id not in self._chats:
            raise bad_request("chat not found")
        return self._chats[chat_id]

    # ----------------------------------------------------------------- HTTP

    async def _file(self, request: web.Request) -> web.StreamResponse:
        """A file download, as the Bot API's file server answers it."""
        path = request.match_info["path"]
        self._calls.append(ApiCall("file", {"file_path": path}, time.monotonic()))
        stored = next((f for f in self.files.values() if f.file_path == path), None)
        if request.match_info["token"] != self.bot_token or stored is None:
            self._notify()
            return web.json_response({"ok": False, "error_code": 404,
                                      "description": "Not Found"}, status=404)
        stored.downloads += 1
        self._notify()
        if stored.gate is not None:
            await stored.gate.wait()
        body = stored.data + b"\0" * (stored.served_size - len(stored.data))
        try:
            return await serve_file(request, stored, body)
        finally:
            self._notify()

    async def _handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        content_type = request.content_type if request.can_read_body else ""
        try:
            params = await _read_params(request)
        except ValueError as exc:
            return web.json_response(bad_request(str(exc)).payload(), status=400)
        call = ApiCall(method, params, time.monotonic(), content_type=content_type)
        self._calls.append(call)
        self._notify()  # a long poll answers much later; its arrival is news already
        if request.match_info["token"] != self.bot_token:
            call.status, call.error = 401, "Unauthorized"
            return web.json_response(
                {"ok": False, "error_code": 401, "description": "Unauthorized"}, status=401)
        try:
            result = await self._dispatch(method, params)
        except ApiError as exc:
            call.status, call.error = exc.status, exc.description
            self._notify()
            return web.json_response(exc.payload(), status=exc.status)
        self._notify()
        return web.json_response({"ok": True, "result": result})

    async def _dispatch(self, method: str, params: dict[str, Any]) -> Any:
        holds = self._holds.get(method.lower())
        if holds:
            await holds.pop(0).wait()
        failures = self._failures.get(method.lower())
        if failures:
            failure = failures[0]
            failure.times -= 1
            if failure.times <= 0:
                failures.pop(0)
            raise ApiError(failure.status, failure.description, retry_after=failure.retry_after)
        handler = _METHODS.get(method.lower())
        if handler is None:
            raise ApiError(404, "Not Found")
        return await handler(self, params)

    # ----------------------------------------------------------------- Bot API methods

    async def _get_me(self, p: dict[str, Any]) -> Any:
        return {**self.bot_user, "can_join_groups": True, "can_read_all_group_messages": False,
                "supports_inline_queries": False, "can_connect_to_business": False,
                "has_main_web_app": False}

    async def _true(self, p: dict[str, Any]) -> Any:
        return True

    async def _delete_webhook(self, p: dict[str, Any]) -> Any:
        self.webhook_url, self.webhook_secret = "", None
        if p.get("drop_pending_updates"):
            self._updates.clear()
        return True

    async def _set_webhook(self, p: dict[str, Any]) -> Any:
        url = str(p.get("url") or "")
        secret = p.get("secret_token")
        if secret is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,256}", str(secret)):
            raise bad_request("secret token contains unallowed characters")
        if url and not url.startswith(("http://", "https://")):
            raise bad_request("bad webhook: Webhook can be set up only on ports 80, 88, 443 "
                              "or 8443")
        if p.get("drop_pending_updates"):
            self._updates.clear()
        self.webhook_url, self.webhook_secret = url, secret
        if isinstance(p.get("allowed_updates"), list):
            self._allowed_updates = p["allowed_updates"]
        if url:
            self._ensure_delivery()
        return True

    async def _get_webhook_info(self, p: dict[str, Any]) -> Any:
        return {"url": self.webhook_url, "has_custom_certificate": False,
                "pending_update_count": len(self._updates)}

    def _ready_updates(self) -> list[dict[str, Any]]:
        allowed = self._allowed_updates or ["message", "edited_message", "channel_post",
                                            "edited_channel_post", "callback_query",
                                            "inline_query", "my_chat_member"]
        return [u for u in self._updates if any(k in u for k in allowed)]

    async def _get_updates(self, p: dict[str, Any]) -> Any:
        if self.webhook_url:
            raise ApiError(409, "Conflict: can't use getUpdates method while webhook is active; "
                                "use deleteWebhook to delete the webhook first")
        offset = int(p.get("offset") or 0)
        if offset > 0:  # confirms every update before it
            self._updates = [u for u in self._updates if u["update_id"] >= offset]
        if isinstance(p.get("allowed_updates"), list):
            self._allowed_updates = p["allowed_updates"]
        limit = max(1, min(100, int(p.get("limit") or 100)))
        timeout = float(p.get("timeout") or 0)
        self._poll_generation += 1
        generation = self._poll_generation
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            ready = self._ready_updates()
            if ready:
                return ready[:limit]
            if generation != self._poll_generation:
                raise ApiError(409, "Conflict: terminated by other getUpdates request; make "
                                    "sure that only one bot instance is running")
            remaining = deadline - loop.time()
            if remaining <= 0 or self._closing:
                return []
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def _reply_markup(self, p: dict[str, Any]) -> dict[str, Any] | None:
        markup = p.get("reply_markup")
        if markup is None:
            return None
        if not isinstance(markup, dict):
            raise bad_request("can't parse reply keyboard markup JSON object")
        for row in markup.get("inline_keyboard", []):
            for button in row:
                if not button.get("text"):
                    raise bad_request("BUTTON_TEXT_EMPTY")
                data = button.get("callback_data")
                if data is not None and not (
                        0 < len(str(data).encode("utf-8")) <= MAX_CALLBACK_DATA_BYTES):
                    raise bad_request("BUTTON_DATA_INVALID")
        return markup if markup.get("inline_keyboard") else None

    async def _get_file(self, p: dict[str, Any]) -> Any:
        stored = self.files.get(str(p.get("file_id", "")))
        if stored is None:
            raise bad_request("invalid file_id")
        return {**stored.meta(), "file_path": stored.file_path}

    async def _send_message(self, p: dict[str, Any]) -> Any:
        chat = self._chat(p.get("chat_id"))
        text = p.get("text")
        if not isinstance(text, str) or text == "":
            raise bad_request("message text is empty")
        visible, entities = render_text(text, p.get("parse_mode"))
        markup = self._reply_markup(p)
        reply_to = None
        reply = p.get("reply_parameters") or (
            {"message_id": p["reply_to_message_id"]} if p.get("reply_to_message_id") else None)
        if reply:
            reply_to = self._find(int(chat["id"]), int(reply.get("message_id", 0)))
            if reply_to is None and not (reply.get("allow_sending_without_reply")
                                         or p.get("allow_sending_without_reply")):
                raise bad_request("message to be replied not found")
        msg = self._store(chat, self.bot_user, visible, entities, reply_to=reply_to,
                          thread_id=p.get("message_thread_id"), markup_source=text,
                          parse_mode=p.get("parse_mode"), reply_markup=markup)
        return msg.to_api()

    def _own_message(self, p: dict[str, Any]) -> VisibleMessage:
        if p.get("inline_message_id"):
            raise bad_request("the emulator has no inline messages")
        chat = self._chat(p.get("chat_id"))
        msg = self._find(int(chat["id"]), int(p.get("message_id") or 0))
        if msg is None:
            raise bad_request("message to edit not found")
        if msg.sender["id"] != self.bot_id:
            raise bad_request("message can't be edited")
        return msg

    async def _edit_message_text(self, p: dict[str, Any]) -> Any:
        msg = self._own_message(p)
        text = p.get("text")
        if not isinstance(text, str) or text == "":
            raise bad_request("message text is empty")
        visible, entities = render_text(text, p.get("parse_mode"))
        markup = self._reply_markup(p)  # no reply_markup: the keyboard goes away
        if visible == msg.text and entities == msg.entities and markup == msg.reply_markup:
            raise bad_request(
                "message is not modified: specified new message content and reply markup are "
                "exactly the same as a current content and reply markup of the message")
        msg.text, msg.entities, msg.reply_markup = visible, entities, markup
        msg.markup_source, msg.parse_mode = text, p.get("parse_mode")
        msg.edits.append(Edit(time.monotonic(), visible, entities, markup))
        return msg.to_api()

    async def _edit_message_reply_markup(self, p: dict[str, Any]) -> Any:
        msg = self._own_message(p)
        markup = self._reply_markup(p)
        if markup == msg.reply_markup:
            raise bad_request(
                "message is not modified: specified new message content and reply markup are "
                "exactly the same as a current content and reply markup of the message")
        msg.reply_markup = markup
        msg.edits.append(Edit(time.monotonic(), msg.text, msg.entities, markup))
        return msg.to_api()

    async def _delete_message(self, p: dict[str, Any]) -> Any:
        msg = self._own_message(p)
        self._messages[msg.chat_id].remove(msg)
        return True

    async def _send_chat_action(self, p: dict[str, Any]) -> Any:
        self._chat(p.get("chat_id"))
        if p.get("action") not in CHAT_ACTIONS:
            raise bad_request("wrong parameter action in request")
        return True

    @staticmethod
    def _scope_key(p: dict[str, Any]) -> tuple[str, str]:
        scope = p.get("scope") or {}
        return str(scope.get("type", "default")), str(p.get("language_code") or "")

    async def _set_my_commands(self, p: dict[str, Any]) -> Any:
        commands = p.get("commands")
        if not isinstance(commands, list) or len(commands) > 100:
            raise bad_request("commands must be an array of up to 100 BotCommand")
        for c in commands:
            if not re.fullmatch(r"[a-z0-9_]{1,32}", str(c.get("command", ""))):
                raise bad_request("BOT_COMMAND_INVALID")
            if not 1 <= len(str(c.get("description", ""))) <= 256:
                raise bad_request("BOT_COMMAND_DESCRIPTION_INVALID")
        self._commands[self._scope_key(p)] = [
            {"command": c["command"], "description": c["description"]} for c in commands]
        return True

    async def _get_my_commands(self, p: dict[str, Any]) -> Any:
        return self._commands.get(self._scope_key(p), [])

    async def _delete_my_commands(self, p: dict[str, Any]) -> Any:
        self._commands.pop(self._scope_key(p), None)
        return True

    def set_admin(self, chat_id: int, user_id: int, status: str = "administrator") -> None:
        """Make `user_id` the group's "creator" or an "administrator" (getChatMember)."""
        self.member_status[(chat_id, user_id)] = status

    async def _get_chat_member(self, p: dict[str, Any]) -> Any:
        chat_id, user_id = int(p.get("chat_id", 0)), int(p.get("user_id", 0))
        chat = self._chats.get(chat_id)
        user = self._users.get(user_id)
        if chat is None:
            raise bad_request("chat not found")
        if user is None:
            raise bad_request("PARTICIPANT_ID_INVALID")
        if chat["type"] == "private":
            status = "member"
        else:
            status = self.member_status.get((chat_id, user_id), "member")
        member: dict[str, Any] = {"status": status, "user": user}
        if status == "administrator":
            member.update(can_be_edited=False, is_anonymous=False, can_manage_chat=True,
                          can_delete_messages=True, can_manage_video_chats=True,
                          can_restrict_members=True, can_promote_members=False,
                          can_change_info=True, can_invite_users=True, can_post_stories=False,
                          can_edit_stories=False, can_delete_stories=False,
                          can_pin_messages=True)
        elif status == "creator":
            member["is_anonymous"] = False
        return member

    async def _answer_callback_query(self, p: dict[str, Any]) -> Any:
        query = self._queries.get(str(p.get("callback_query_id")))
        if query is None or query.answer is not None:
            raise bad_request("query is too old and response timeout expired or query ID is "
                              "invalid")
        if len(str(p.get("text") or "")) > 200:
            raise bad_request("MESSAGE_TOO_LONG")
        query.answer = dict(p)
        return True

    # ----------------------------------------------------------------- webhook delivery

    def _ensure_delivery(self) -> None:
        if self._delivery is None or self._delivery.done():
            self._delivery = asyncio.get_running_loop().create_task(self._deliver())

    async def _deliver(self) -> None:
        """POST queued updates to the webhook in order, as Telegram does."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        while self.webhook_url and not self._closing:
            ready = self._ready_updates()
            if not ready:
                event = self._changed
                await event.wait()
                continue
            update = ready[0]
            headers = {}
            if self.webhook_secret:
                headers["X-Telegram-Bot-Api-Secret-Token"] = self.webhook_secret
            try:
                async with self._session.post(self.webhook_url, json=update,
                                              headers=headers) as resp:
                    status = resp.status
            except aiohttp.ClientError:
                status = 0
            self.webhook_deliveries.append((update["update_id"], status))
            if status == 200:
                self._updates.remove(update)
                self._notify()
            else:  # Telegram retries later; a short pause keeps this from spinning
                event = self._changed
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), 0.2)


_METHODS: dict[str, Callable[[TelegramApiEmulator, dict[str, Any]], Any]] = {
    "getme": TelegramApiEmulator._get_me,
    "logout": TelegramApiEmulator._true,
    "close": TelegramApiEmulator._true,
    "deletewebhook": TelegramApiEmulator._delete_webhook,
    "setwebhook": TelegramApiEmulator._set_webhook,
    "getwebhookinfo": TelegramApiEmulator._get_webhook_info,
    "getupdates": TelegramApiEmulator._get_updates,
    "sendmessage": TelegramApiEmulator._send_message,
    "editmessagetext": TelegramApiEmulator._edit_message_text,
    "editmessagereplymarkup": TelegramApiEmulator._edit_message_reply_markup,
    "deletemessage": TelegramApiEmulator._delete_message,
    "sendchataction": TelegramApiEmulator._send_chat_action,
    "setmycommands": TelegramApiEmulator._set_my_commands,
    "getmycommands": TelegramApiEmulator._get_my_commands,
    "deletemycommands": TelegramApiEmulator._delete_my_commands,
    "answercallbackquery": TelegramApiEmulator._answer_callback_query,
    "getchatmember": TelegramApiEmulator._get_chat_member,
    "getfile": TelegramApiEmulator._get_file,
}


async def _read_params(request: web.Request) -> dict[str, Any]:
    """The call's parameters from the query string and a JSON, urlencoded or multipart body."""
    raw: dict[str, Any] = dict(request.query)
    if request.can_read_body:
        if request.content_type == "application/json":
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("JSON body must be an object")
            raw.update(body)
        elif request.content_type in ("application/x-www-form-urlencoded",
                                      "multipart/form-data"):
            form = await request.post()
            for key, value in form.items():
                raw[key] = value if isinstance(value, str) else "<file>"
    return {key: _coerce(key, value) for key, value in raw.items()}


def _coerce(key: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    if key in _JSON_FIELDS:
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"can't parse {key} JSON object") from None
    if key in _INT_FIELDS:
        with contextlib.suppress(ValueError):
            return int(value)
        with contextlib.suppress(ValueError):
            return float(value)  # PTB sends timeouts like "10.0"
        return value
    if key in _BOOL_FIELDS:
        return value.lower() in ("true", "1")
    return value


def visible_text(messages: Iterable[VisibleMessage]) -> str:
    """The texts of messages joined as a reader would read them."""
    return "\n".join(m.text for m in messages)


async def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", default=DEFAULT_TOKEN)
    args = parser.parse_args(argv)
    tg = TelegramApiEmulator(token=args.token)
    await tg.start(args.port)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        print(f"READY {tg.base_url} {tg.bot_token}", flush=True)
        await stop.wait()
    finally:
        await tg.close()


if __name__ == "__main__":
    asyncio.run(_main())
