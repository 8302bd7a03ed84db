"""python-telegram-bot's HTTP requests over aiohttp, with replies parsed by orjson.

PTB's default HTTPXRequest costs about a third of the bot's CPU per exchange
(profiled: httpx → httpcore → anyio per call, and httpcore scans every pooled
connection, asking each idle one whether its socket is readable, before each
request). aiohttp's client (already a dependency, for Discord) parses HTTP in
C and hands out a pooled keep-alive connection without a scan. PTB supports a
BaseRequest of one's own (telegram.request.BaseRequest); this is one.

Timeouts as PTB's: read → sock_read, connect → sock_connect, pool → the wait
for a connection (aiohttp's `connect`, which includes connecting). aiohttp has
no write timeout: a request that cannot be written within read_timeout fails
at its read.
"""

from __future__ import annotations

import json
import ssl
from typing import Any

import aiohttp
import orjson
from telegram._utils.defaultvalue import DefaultValue
from telegram._utils.types import ODVInput
from telegram.error import NetworkError, TelegramError, TimedOut
from telegram.request import BaseRequest, RequestData

POOL_SIZE = 256  # as PTB's HTTPXRequest
_JSON = {"Content-Type": "application/json"}


def _json_body(parameters: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(parameters)
    except TypeError:  # orjson.JSONEncodeError
        # What orjson refuses and the stdlib writes: a lone surrogate, an int past 64 bits.
        return json.dumps(parameters).encode()


class AiohttpRequest(BaseRequest):
    """One aiohttp session; PTB makes one for its calls and one for getUpdates."""

    __slots__ = ("_connect", "_pool", "_pool_size", "_read", "_session", "_tls", "_write")

    def __init__(self, *, connection_pool_size: int = POOL_SIZE,
                 read_timeout: float | None = 5.0, write_timeout: float | None = 5.0,
                 connect_timeout: float | None = 5.0,
                 pool_timeout: float | None = 1.0, tls: ssl.SSLContext | None = None) -> None:
        self._pool_size = connection_pool_size
        self._tls = tls
        self._read, self._write = read_timeout, write_timeout
        self._connect, self._pool = connect_timeout, pool_timeout
        self._session: aiohttp.ClientSession | None = None

    @property
    def read_timeout(self) -> float | None:
        return self._read

    async def initialize(self) -> None:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._pool_size,
                                               ssl=self._tls if self._tls else True),
                headers={"User-Agent": self.USER_AGENT},
                # Redirects and cookies are not part of the Bot API.
                cookie_jar=aiohttp.DummyCookieJar())

    async def shutdown(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    @staticmethod
    def parse_json_payload(payload: bytes) -> Any:
        try:
            return orjson.loads(payload)
        except orjson.JSONDecodeError:
            # As PTB's own parser (the stdlib's): invalid UTF-8 is replaced, and an
            # escaped lone surrogate (which orjson refuses) is read, not fatal.
            try:
                return json.loads(payload.decode("utf-8", "replace"))
            except ValueError as exc:
                raise TelegramError("Invalid server response") from exc

    async def do_request(
        self,
        url: str,
        method: str,
        request_data: RequestData | None = None,
        read_timeout: ODVInput[float] = BaseRequest.DEFAULT_NONE,
        write_timeout: ODVInput[float] = BaseRequest.DEFAULT_NONE,
        connect_timeout: ODVInput[float] = BaseRequest.DEFAULT_NONE,
        pool_timeout: ODVInput[float] = BaseRequest.DEFAULT_NONE,
    ) -> tuple[int, bytes]:
        session = self._session
        if session is None or session.closed:
            raise RuntimeError("This AiohttpRequest is not initialized!")
        read = self._read if isinstance(read_timeout, DefaultValue) else read_timeout
        connect = self._connect if isinstance(connect_timeout, DefaultValue) \
            else connect_timeout
        pool = self._pool if isinstance(pool_timeout, DefaultValue) else pool_timeout
        timeout = aiohttp.ClientTimeout(
            total=None, sock_read=read, sock_connect=connect,
            connect=None if pool is None or connect is None else pool + connect)
        data: Any = None
        headers = None
        if request_data is not None and request_data.contains_files:
            form = aiohttp.FormData()
            for name, value in request_data.json_parameters.items():
                form.add_field(name, value)
            for name, part in request_data.multipart_data.items():
                filename, content, *rest = part
                form.add_field(name, content, filename=filename,
                               content_type=rest[0] if rest else None)
            data = form
        elif request_data is not None:
            # One JSON body (the Bot API takes application/json for any call without
            # files): profiled, aiohttp's form encoding of the parameters (FormData,
            # urlencode) was a tenth of the cost of each call.
            data, headers = _json_body(request_data.parameters), _JSON
        try:
            async with session.request(method, url, data=data, headers=headers,
                                       timeout=timeout,
                                       allow_redirects=False) as response:
                return response.status, await response.read()
        except TimeoutError as exc:
            raise TimedOut from exc
        except aiohttp.ClientError as exc:
            raise NetworkError(f"aiohttp.{type(exc).__name__}: {exc}") from exc
