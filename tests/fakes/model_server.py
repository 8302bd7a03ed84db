"""A fake model server speaking both the Ollama HTTP API and the OpenAI chat completions API.

The real ``ollama.AsyncClient(host=srv.url)`` and
``openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key=...)`` work against it unmodified.

Use it in-process from pytest-asyncio::

    async with ModelServer() as srv:
        client = ollama.AsyncClient(host=srv.url)
        ...

or as a subprocess (prints ``READY <url>`` once listening, stops on SIGTERM/SIGINT)::

    python -m tests.fakes.model_server --port 0 [--reply-delay 0.5] [--fault http500]

Real servers' quirks, each a knob: ``context_lengths`` (a model's window, reported by
``/api/show``, by ``/v1/models`` as vLLM's ``max_model_len`` with ``report_window``, and by
``/props`` with ``llamacpp_routes``); ``overflow`` ("openai", "llamacpp", "vllm",
"llama_cpp_python") refuses a prompt + reply limit beyond the window the way that server
does (llama-cpp-python: HTTP 200 and an empty stream when streaming); ``send_usage=False``
ignores ``stream_options.include_usage`` (llama-cpp-python); ``reject_param`` refuses a
request field (reasoning models refuse ``max_tokens``); ``strict_roles`` refuses a second
system message or non-alternating roles (Mistral's template); ``llamacpp_routes`` adds
``/tokenize`` and ``/props``; ``vision_models`` are the models whose ``/api/show``
``capabilities`` include ``"vision"`` (as Ollama's do for llava, gemma3, ...): images a
request carried (Ollama's base64 ``images``, OpenAI's ``image_url`` data URLs) are decoded
in ``Recorded.images``. ``peak_active`` is the most chat requests handled at once.

A subprocess can be reconfigured at runtime with ``POST /_fake/config`` (a JSON object of
attribute names, see ``_CONFIG_KEYS``) and inspected with ``GET /_fake/requests``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import inspect
import json
import re
import signal
import socket
import struct
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

__all__ = [
    "DEFAULT_MODELS",
    "FAULTS",
    "ModelServer",
    "Recorded",
    "closed_port_url",
    "count_tokens",
    "echo_reply",
    "main",
    "prompt_tokens",
    "tokenize",
]

DEFAULT_MODELS = ["llama3.2", "qwen2.5"]
FAULTS = frozenset(
    {"http500", "cut", "stall", "hang", "malformed", "rate_limit", "auth", "not_found"}
)
OLLAMA_VERSION = "0.12.6"
DEFAULT_CONTEXT_LENGTH = 131072
OVERFLOWS = frozenset({"openai", "llamacpp", "vllm", "llama_cpp_python"})

# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

# GPT-4 (cl100k) style pre-tokenizer written for the stdlib `re` (no \p{L}):
# letters are [^\W\d_], "punctuation" is anything that is neither space, letter nor digit.
_PRETOKEN = re.compile(
    r"(?P<contraction>(?i:'s|'t|'re|'ve|'m|'ll|'d))"
    r"|(?P<word> ?[^\W\d_]+)"
    r"|(?P<number>\d{1,3})"
    r"|(?P<punct> ?(?:[^\s\w]|_)+[\r\n]*)"
    r"|(?P<space>\s*[\r\n]+|\s+(?!\S)|\s+)"
)

# CJK ideographs, kana and hangul syllables: one token per character.
_CJK_RANGES = (
    (0x3040, 0x30FF),  # hiragana + katakana
    (0x31F0, 0x31FF),  # katakana phonetic extensions
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xAC00, 0xD7AF),  # hangul syllables
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0x20000, 0x2FA1F),  # CJK extensions B..F + compatibility supplement
)


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def _letter_class(ch: str) -> str:
    if ch.isascii():
        return "ascii"
    return "cjk" if _is_cjk(ch) else "other"


def _split_word(body: str) -> list[str]:
    """Split a run of letters into unit tokens, by script."""
    out: list[str] = []
    i = 0
    while i < len(body):
        cls = _letter_class(body[i])
        j = i + 1
        if cls != "cjk":
            while j < len(body) and _letter_class(body[j]) == cls:
                j += 1
        run = body[i:j]
        if cls == "ascii":
            # 1 token up to 6 letters, then 1 per further 4 letters.
            out.append(run[:6])
            out.extend(run[k : k + 4] for k in range(6, len(run), 4))
        elif cls == "other":
            # Accented / Cyrillic / Greek ... letters: 1 token per 2 chars.
            out.extend(run[k : k + 2] for k in range(0, len(run), 2))
        else:
            out.append(run)
        i = j
    return out


def _split_punct(body: str) -> list[str]:
    """1 token per char for the first two chars, then 1 token for the rest of the run."""
    core = body.rstrip("\r\n")
    newlines = body[len(core) :]
    parts = list(core[:2]) + ([core[2:]] if len(core) > 2 else [])
    parts[-1] += newlines
    return parts


def tokenize(text: str) -> list[str]:
    """Split ``text`` into the pieces this server counts (and streams) as tokens.

    ``"".join(tokenize(t)) == t`` always holds, and ``count_tokens(t) == len(tokenize(t))``.
    """
    tokens: list[str] = []
    for m in _PRETOKEN.finditer(text):
        piece = m.group()
        kind = m.lastgroup
        if kind in ("word", "punct"):
            # A single leading space rides along with the word / punctuation for free.
            lead, body = ("", piece) if piece[0] != " " else (" ", piece[1:])
            parts = _split_word(body) if kind == "word" else _split_punct(body)
            parts[0] = lead + parts[0]
            tokens.extend(parts)
        else:
            # Contractions, 1-3 digit groups and standalone whitespace runs: 1 token each.
            tokens.append(piece)
    return tokens


def count_tokens(text: str) -> int:
    """Count tokens the way this fake "model" does.

    This approximates a byte-level BPE tokenizer such as Llama-3's or OpenAI's cl100k_base
    (deliberately *not* a ``len(text) / 4`` formula): text is pre-tokenized with a GPT-4-like
    regex (contractions, `` ?letters``, numbers in groups of up to 3 digits,
    `` ?punctuation runs``, whitespace runs) and each piece is priced:

    * an ASCII word: 1 token up to 6 letters, plus 1 per further 4 letters;
    * each CJK ideograph / kana / hangul syllable: 1 token;
    * other non-ASCII letters: 1 token per 2 characters;
    * a punctuation run: 1 token per character for the first two, then 1 for the rest;
    * a single space in front of a word costs nothing, any other whitespace run costs 1.

    Net effect, close to Llama-3 / cl100k: ordinary English prose comes out at about
    0.75 words per token (~1.3 tokens per word), CJK text at about 1 token per character.
    """
    return len(tokenize(text))


def _text_of(content: Any) -> str:
    """Message content as text (OpenAI allows a list of typed parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and "text" in p
        )
    return str(content)


def prompt_tokens(messages: Iterable[dict[str, Any]]) -> int:
    """Prompt size: each message costs its content + 4 (role markers), plus 3 for the template."""
    return sum(count_tokens(_text_of(m.get("content"))) + 4 for m in messages) + 3


# --------------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------------


class _Headers(dict[str, str]):
    """A plain dict of request headers whose lookups ignore case ("Authorization" works)."""

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__((k.lower(), v) for k, v in items)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(key.lower())

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(key.lower(), default)


@dataclass
class Recorded:
    """One chat request as the server received it."""

    api: str  # "ollama" or "openai"
    path: str
    model: str
    messages: list[dict[str, Any]]
    options: dict[str, Any]  # Ollama "options"; {} for OpenAI
    body: dict[str, Any]
    headers: dict[str, str]
    prompt_tokens: int

    @property
    def images(self) -> list[tuple[str, bytes]]:
        """(mime, bytes) of every image the request carried, in order ("" mime for Ollama's,
        which names none)."""
        found: list[tuple[str, bytes]] = []
        for m in self.messages:
            for b64 in m.get("images") or []:
                found.append(("", base64.b64decode(b64)))
            content = m.get("content")
            for part in content if isinstance(content, list) else []:
                url = part.get("image_url", {}).get("url", "") if isinstance(part, dict) else ""
                head, sep, data = url.partition(";base64,")
                if sep and head.startswith("data:"):
                    found.append((head.removeprefix("data:"), base64.b64decode(data)))
        return found

    @property
    def last_user_message(self) -> str:
        for m in reversed(self.messages):
            if m.get("role") == "user":
                return _text_of(m.get("content"))
        return ""


Reply = str | Callable[[Recorded], str] | Callable[[Recorded], Awaitable[str]]

_NAME_EN = re.compile(r"\bmy name is\s+([^\W\d_]+)", re.IGNORECASE)
_NAME_ZH = re.compile(r"我叫([\u3400-\u4dbf\u4e00-\u9fff]+)")


def echo_reply(rec: Recorded) -> str:
    """Default reply: echo the last user message, plus any name mentioned earlier.

    The name lets a test check, through the user-visible reply, that memory (history or a
    system-prompt summary) actually reached the model.
    """
    last_user = -1
    for i, m in enumerate(rec.messages):
        if m.get("role") == "user":
            last_user = i
    reply = f"You said: {rec.last_user_message}"
    earlier = rec.messages[:last_user] if last_user >= 0 else rec.messages
    name: str | None = None
    for m in earlier:
        text = _text_of(m.get("content"))
        hits = [(h.start(), h.group(1)) for pat in (_NAME_EN, _NAME_ZH) for h in pat.finditer(text)]
        if hits:
            name = max(hits)[1]  # the most recent mention wins
    if name:
        reply += f" Your name is {name}."
    return reply


# --------------------------------------------------------------------------------------------
# Wire formats
# --------------------------------------------------------------------------------------------


def _dumps(obj: Any) -> bytes:
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate, as a broken model sends it: as \ud83d
        return json.dumps(obj, separators=(",", ":")).encode()


def _strip_latest(name: str) -> str:
    return name.removesuffix(":latest")


class _ServerClosing(Exception):
    """Raised inside a handler when close() releases it."""


class _Dialect:
    """What differs between the two APIs: defaults, framing and error bodies."""

    api = ""
    stream_content_type = ""
    stream_default = False

    def __init__(self, srv: ModelServer, model: str, body: dict[str, Any], key: str = "") -> None:
        self.srv = srv
        self.model = model
        self.body = body
        self.key = key  # the Bearer token the client sent (quoted in 401 messages)

    def limit(self) -> int | None:
        raise NotImplementedError

    def error(self, kind: str, headers: dict[str, str] | None = None) -> web.Response:
        raise NotImplementedError

    def prologue(self) -> list[bytes]:
        return []

    def chunk(self, text: str) -> bytes:
        raise NotImplementedError

    def epilogue(self, finish: str, prompt: int, completion: int, elapsed_ns: int) -> bytes:
        raise NotImplementedError

    def whole(self, text: str, finish: str, prompt: int, completion: int, elapsed_ns: int) -> Any:
        raise NotImplementedError

    def malformed(self) -> bytes:
        raise NotImplementedError


class _OllamaDialect(_Dialect):
    api = "ollama"
    stream_content_type = "application/x-ndjson"
    stream_default = True  # Ollama streams unless told "stream": false

    def limit(self) -> int | None:
        options = self.body.get("options") or {}
        n = options.get("num_predict")
        # -1 (infinite) and -2 (fill context) mean "no limit" here.
        return n if isinstance(n, int) and n >= 0 else None

    def error(self, kind: str, headers: dict[str, str] | None = None) -> web.Response:
        status, message = {
            "http500": (500, "llama runner process has terminated: exit status 2"),
            "rate_limit": (429, "too many requests, please retry later"),
            "auth": (401, "unauthorized"),
            "not_found": (
                404,
                f'model "{self.model}" not found, try pulling it first',
            ),
        }.get(kind, (400, kind))
        if kind == "rate_limit":
            headers = {**(headers or {}), "Retry-After": self.srv._retry_after_header()}
        return web.json_response({"error": message}, status=status, headers=headers)

    def _base(self) -> dict[str, Any]:
        created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return {"model": self.model, "created_at": created}

    def chunk(self, text: str) -> bytes:
        msg = {"role": "assistant", "content": text}
        return _dumps({**self._base(), "message": msg, "done": False}) + b"\n"

    def _final(self, text: str, finish: str, prompt: int, completion: int, elapsed_ns: int) -> Any:
        load_ns, prompt_ns, eval_ns = 1_000_000, prompt * 100_000, completion * 10_000_000
        return {
            **self._base(),
            "message": {"role": "assistant", "content": text},
            "done": True,
            "done_reason": finish,
            "total_duration": max(elapsed_ns, load_ns + prompt_ns + eval_ns),
            "load_duration": load_ns,
            "prompt_eval_count": prompt,
            "prompt_eval_duration": prompt_ns,
            "eval_count": completion,
            "eval_duration": eval_ns,
        }

    def epilogue(self, finish: str, prompt: int, completion: int, elapsed_ns: int) -> bytes:
        return _dumps(self._final("", finish, prompt, completion, elapsed_ns)) + b"\n"

    def whole(self, text: str, finish: str, prompt: int, completion: int, elapsed_ns: int) -> Any:
        return self._final(text, finish, prompt, completion, elapsed_ns)

    def malformed(self) -> bytes:
        return b'{"model":"' + self.model.encode() + b'","message":{"role":"assistant","cont\n'


class _OpenAIDialect(_Dialect):
    api = "openai"
    stream_content_type = "text/event-stream; charset=utf-8"
    stream_default = False

    def __init__(self, srv: ModelServer, model: str, body: dict[str, Any], key: str = "") -> None:
        super().__init__(srv, model, body, key)
        self.id = "chatcmpl-" + uuid.uuid4().hex[:29]
        self.created = int(time.time())
        self.fingerprint = "fp_" + hashlib.sha256(model.encode()).hexdigest()[:10]
        stream_options = body.get("stream_options") or {}
        self.include_usage = bool(stream_options.get("include_usage")) and srv.send_usage

    def limit(self) -> int | None:
        n = self.body.get("max_completion_tokens")
        if n is None:
            n = self.body.get("max_tokens")
        return n if isinstance(n, int) and n >= 0 else None

    def error(self, kind: str, headers: dict[str, str] | None = None) -> web.Response:
        headers = {**(headers or {}), "x-request-id": "req_" + uuid.uuid4().hex}
        status, message, etype, code = {
            "http500": (
                500,
                "The server had an error while processing your request. Sorry about that!",
                "server_error",
                None,
            ),
            "rate_limit": (
                429,
                f"Rate limit reached for {self.model} on requests per min (RPM): "
                f"Limit 3, Used 3, Requested 1. Please try again in "
                f"{self.srv._retry_after_header()}s.",
                "requests",
                "rate_limit_exceeded",
            ),
            "auth": (401, _bad_key_message(self.key), "invalid_request_error", "invalid_api_key"),
            "not_found": (
                404,
                f"The model `{self.model}` does not exist or you do not have access to it.",
                "invalid_request_error",
                "model_not_found",
            ),
        }.get(kind, (400, kind, "invalid_request_error", None))
        if kind == "rate_limit":
            headers["retry-after"] = self.srv._retry_after_header()
        err = {"message": message, "type": etype, "param": None, "code": code}
        return web.json_response({"error": err}, status=status, headers=headers)

    def _event(self, choices: list[dict[str, Any]], usage: Any = None) -> bytes:
        obj: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
        }
        if self.include_usage:
            obj["usage"] = usage  # the real API sends "usage": null until the last chunk
        return b"data: " + _dumps(obj) + b"\n\n"

    @staticmethod
    def _choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    @staticmethod
    def _usage(prompt: int, completion: int) -> dict[str, int]:
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def prologue(self) -> list[bytes]:
        # The real API opens with a role-only delta carrying empty content.
        return [self._event([self._choice({"role": "assistant", "content": ""})])]

    def chunk(self, text: str) -> bytes:
        return self._event([self._choice({"content": text})])

    def epilogue(self, finish: str, prompt: int, completion: int, elapsed_ns: int) -> bytes:
        out = self._event([self._choice({}, finish)])
        if self.include_usage:
            out += self._event([], self._usage(prompt, completion))
        return out + b"data: [DONE]\n\n"

    def whole(self, text: str, finish: str, prompt: int, completion: int, elapsed_ns: int) -> Any:
        message = {"role": "assistant", "content": text, "refusal": None, "annotations": []}
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            ],
            "usage": self._usage(prompt, completion),
        }

    def malformed(self) -> bytes:
        return b'data: {"id":"' + self.id.encode() + b'","object":"chat.completion.chunk",{\n\n'


# --------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------

# Attributes a subprocess client may set through POST /_fake/config.
_CONFIG_KEYS = (
    "models",
    "reply",
    "fault",
    "faults",
    "first_token_delay",
    "chunk_delay",
    "tokens_per_chunk",
    "api_key",
    "retry_after",
    "context_lengths",
    "overflow",
    "send_usage",
    "reject_param",
    "strict_roles",
    "report_window",
    "llamacpp_routes",
    "vision_models",
    "empty_streams",
    "empty_stream_form",
    "probe_replies",
)


class ModelServer:
    """Fake Ollama + OpenAI server; see the module docstring.

    Knobs (all plain attributes, change them at any time):
    ``models``, ``reply``, ``fault`` / ``faults``, ``first_token_delay``, ``chunk_delay``,
    ``tokens_per_chunk``, ``gate``, ``api_key`` (OpenAI routes only), ``retry_after``.
    """

    def __init__(
        self, *, models: list[str] | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.models: list[str] = list(DEFAULT_MODELS if models is None else models)
        self.host = host
        self.port = port
        self.url = ""
        self.requests: list[Recorded] = []
        self.reply: Reply | None = None
        self._fault: str | None = None
        self.faults: list[str] = []
        self.first_token_delay: float = 0
        self.chunk_delay: float = 0
        self.tokens_per_chunk: int = 1
        self.gate: asyncio.Event | None = None
        self.api_key: str | None = None
        self.retry_after: float = 1.0  # seconds, sent as Retry-After on "rate_limit"
        self.context_lengths: dict[str, int] = {}  # model -> window; else the default
        self.overflow: str | None = None
        self.send_usage = True
        self.reject_param: str | None = None
        self.strict_roles = False
        self.report_window = False
        self.llamacpp_routes = False
        self.vision_models: list[str] = []  # /api/show says "vision" for these
        # llama-cpp-python's 200 with an empty stream, for this many streamed chat
        # requests; then each non-streamed one takes the next of `probe_replies`:
        # "reply", "empty", "length_empty" (empty, cut at the limit), "http500",
        # "http500_too_long" (an older server's 500 quoting the window), "too_long",
        # "hangup" (the connection closed without an answer).
        self.empty_streams = 0
        self.empty_stream_form = "eof"  # or "drop" (after the 200), "hangup" (before it)
        self.probe_replies: list[str] = []
        self.tokenize_calls = 0
        self.active = 0  # chat requests being handled now
        self.peak_active = 0
        # Chat requests whose client hung up before the reply was complete (what a
        # real server sees when a reply is stopped: it stops generating).
        self.disconnects = 0
        self._disconnected = asyncio.Event()
        self.embeddings = EmbeddingKnobs()  # see the embeddings block below
        self._runner: web.AppRunner | None = None
        # Since 3.10 these bind to the running loop on first use, not at construction.
        self._closing = asyncio.Event()
        self._changed = asyncio.Condition()

    # -- public API ---------------------------------------------------------------------------

    @property
    def fault(self) -> str | None:
        return self._fault

    @fault.setter
    def fault(self, value: str | None) -> None:
        self._fault = _check_fault(value)

    async def start(self) -> None:
        if self._runner is not None:
            return
        self._closing = asyncio.Event()
        self._changed = asyncio.Condition()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.add_routes(
            [
                web.get("/", self._root),
                web.get("/api/version", self._ollama_version),
                web.get("/api/tags", self._ollama_tags),
                web.get("/api/ps", self._ollama_ps),
                web.post("/api/show", self._ollama_show),
                web.post("/api/chat", self._ollama_chat),
                web.get("/v1/models", self._openai_models),
                web.get("/v1/models/{model}", self._openai_model),
                web.post("/v1/chat/completions", self._openai_chat),
                web.post("/tokenize", self._tokenize),
                web.get("/props", self._props),
                *embedding_routes(self),
                web.post("/_fake/config", self._fake_config),
                web.get("/_fake/requests", self._fake_requests),
            ]
        )
        # handler_cancellation: a client that hangs up cancels its handler (no stuck "stall"),
        # shutdown_timeout: a bound on close() even if something unforeseen is still running.
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        self._runner = runner
        self.port = runner.addresses[0][1]
        self.url = f"http://{self.host}:{self.port}"

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._closing.set()  # releases every handler parked in hang/stall/gate/delay
        await runner.cleanup()

    async def __aenter__(self) -> ModelServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_for_requests(self, n: int, timeout: float = 5) -> None:  # noqa: ASYNC109
        """Wait until at least ``n`` chat requests were received; TimeoutError after ``timeout``."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: len(self.requests) >= n)
        except TimeoutError:
            raise TimeoutError(
                f"expected {n} chat request(s) within {timeout}s, got {len(self.requests)}"
            ) from None

    async def wait_for_disconnects(self, n: int, timeout: float = 5) -> None:  # noqa: ASYNC109
        """Wait until ``n`` chat clients hung up mid-reply; TimeoutError after ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                while self.disconnects < n:
                    self._disconnected.clear()
                    await self._disconnected.wait()
        except TimeoutError:
            raise TimeoutError(f"expected {n} disconnect(s) within {timeout}s, got "
                               f"{self.disconnects}") from None

    def _hung_up(self) -> None:
        self.disconnects += 1
        self._disconnected.set()

    def count_tokens(self, text: str) -> int:
        return count_tokens(text)

    # -- helpers ------------------------------------------------------------------------------

    def _has_model(self, name: str) -> bool:
        wanted = _strip_latest(name)
        return any(_strip_latest(m) == wanted for m in self.models)

    def _take_fault(self) -> str | None:
        if self.faults:
            return _check_fault(self.faults.pop(0))
        return self._fault

    def _retry_after_header(self) -> str:
        ra = self.retry_after
        return str(int(ra)) if float(ra).is_integer() else str(ra)

    async def _record(self, rec: Recorded) -> None:
        self.requests.append(rec)
        async with self._changed:
            self._changed.notify_all()

    async def _sleep(self, seconds: float) -> None:
        """Sleep, unless the server closes first (then raise _ServerClosing)."""
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)
        if self._closing.is_set():
            raise _ServerClosing

    async def _wait_event(self, event: asyncio.Event) -> None:
        """Wait for ``event``, unless the server closes first (then raise _ServerClosing)."""
        if not event.is_set():
            waiters = {
                asyncio.ensure_future(event.wait()),
                asyncio.ensure_future(self._closing.wait()),
            }
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
        if self._closing.is_set():
            raise _ServerClosing

    async def _hold_forever(self) -> None:
        """Hang until close() (or until the client hangs up, which cancels the handler)."""
        await self._closing.wait()
        raise _ServerClosing

    async def _before_first_token(self) -> None:
        await self._sleep(self.first_token_delay)
        gate = self.gate
        if gate is not None:
            await self._wait_event(gate)

    async def _make_reply(self, rec: Recorded) -> str:
        reply = self.reply
        if reply is None:
            return echo_reply(rec)
        if isinstance(reply, str):
            return reply
        result = reply(rec)
        if inspect.isawaitable(result):
            result = await result
        return str(result)

    # -- generic chat flow --------------------------------------------------------------------

    def context_length(self, model: str) -> int:
        return self.context_lengths.get(_strip_latest(model), DEFAULT_CONTEXT_LENGTH)

    async def _chat(self, request: web.Request, dialect_cls: type[_Dialect]) -> web.StreamResponse:
        self.active += 1
        self.peak_active = max(self.peak_active, self.active)
        try:
            return await self._chat_counted(request, dialect_cls)
        except asyncio.CancelledError:
            # handler_cancellation: the client closed the connection mid-reply.
            self._hung_up()
            raise
        finally:
            self.active -= 1

    async def _chat_counted(
        self, request: web.Request, dialect_cls: type[_Dialect]
    ) -> web.StreamResponse:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):
            return dialect_cls(self, "", {}).error("invalid JSON body")
        model = str(body.get("model") or "")
        messages = body.get("messages") or []
        options = (body.get("options") or {}) if dialect_cls.api == "ollama" else {}
        rec = Recorded(
            api=dialect_cls.api,
            path=request.path,
            model=model,
            messages=messages,
            options=options,
            body=body,
            headers=_Headers(request.headers.items()),
            prompt_tokens=prompt_tokens(messages),
        )
        await self._record(rec)
        dialect = dialect_cls(self, model, body, _bearer(request))
        fault = self._take_fault()

        # Like the real services, a bad key is rejected before anything else (OpenAI only).
        if dialect.api == "openai" and self.api_key is not None and dialect.key != self.api_key:
            return dialect.error("auth")
        if fault in ("http500", "rate_limit", "auth", "not_found"):
            return dialect.error(fault)
        if not model:
            return dialect.error("model is required")
        if not self._has_model(model):
            return dialect.error("not_found")
        stream = bool(body.get("stream", dialect.stream_default))
        if self.reject_param and self.reject_param in body:
            return _unsupported_param(self.reject_param)
        if self.strict_roles and (problem := _role_problem(messages)):
            return web.json_response({"error": {"message": problem, "type": "server_error",
                                                "code": 400}}, status=400)
        window = self.context_length(model)
        asked = rec.prompt_tokens + (dialect.limit() or 0)
        if self.overflow and asked > window:
            if self.overflow == "llama_cpp_python" and stream:
                # llama-cpp-python: the stream starts with 200, then ends with nothing.
                # (A long prompt: the connection drops before the headers are flushed,
                # its error raised after the app sent them.)
                resp = web.StreamResponse(headers={"Content-Type": dialect.stream_content_type})
                if rec.prompt_tokens > 2 * window:
                    _abort(request)
                    return resp
                await resp.prepare(request)
                await resp.write_eof()
                return resp
            return _too_long(self.overflow, rec.prompt_tokens, asked, window)

        if dialect.api == "openai" and stream and self.empty_streams > 0:
            self.empty_streams -= 1
            resp = web.StreamResponse(headers={"Content-Type": dialect.stream_content_type})
            if self.empty_stream_form == "hangup":  # dropped before any response
                _abort(request)
                return resp
            await resp.prepare(request)
            if self.empty_stream_form == "drop":  # the connection drops after the 200
                _abort(request)
                return resp
            await resp.write_eof()
            return resp
        probe = self.probe_replies.pop(0) if dialect.api == "openai" and not stream \
            and self.probe_replies else "reply"
        if probe == "hangup":  # the connection the broken stream left: closed at once
            _abort(request)
            return web.Response(status=499)
        if probe in ("http500", "http500_too_long"):
            message = (f"Requested tokens ({rec.prompt_tokens}) exceed context window of "
                       f"{window}" if probe == "http500_too_long" else "llama_decode failed")
            return web.json_response({"error": {"message": message, "code": None,
                                                "type": "internal_server_error"}}, status=500)
        if probe == "too_long":
            return _too_long("llama_cpp_python", rec.prompt_tokens, asked, window)
        text = "" if probe in ("empty", "length_empty") else await self._make_reply(rec)
        tokens = tokenize(text)
        finish = "length" if probe == "length_empty" else "stop"
        limit = dialect.limit()
        if limit is not None and len(tokens) > limit:
            tokens, finish = tokens[:limit], "length"
        per = max(1, int(self.tokens_per_chunk))
        chunks = ["".join(tokens[i : i + per]) for i in range(0, len(tokens), per)]
        started = time.monotonic_ns()

        resp: web.StreamResponse | None = None
        try:
            if stream:
                resp = web.StreamResponse(headers={"Content-Type": dialect.stream_content_type})
                await resp.prepare(request)
                if fault == "hang":
                    await self._hold_forever()
                await self._before_first_token()
                for line in dialect.prologue():
                    await resp.write(line)
                if not chunks and fault in ("cut", "stall", "malformed"):
                    chunks = [""]  # a fault needs at least one content chunk to follow
                cut_after = max(1, len(chunks) // 2)
                for i, piece in enumerate(chunks, start=1):
                    if i > 1:
                        await self._sleep(self.chunk_delay)
                    await resp.write(dialect.chunk(piece))
                    if i == 1 and fault == "stall":
                        await self._hold_forever()
                    if i == 1 and fault == "malformed":
                        await resp.write(dialect.malformed())
                    if i == cut_after and fault == "cut":
                        _abort(request)
                        return resp
                elapsed = time.monotonic_ns() - started
                await resp.write(dialect.epilogue(finish, rec.prompt_tokens, len(tokens), elapsed))
                await resp.write_eof()
                return resp

            # Non-streaming: the whole answer arrives at once, after the "generation" time.
            if fault == "hang":
                resp = web.StreamResponse(headers={"Content-Type": "application/json"})
                await resp.prepare(request)
                await self._hold_forever()
            await self._before_first_token()
            await self._sleep(self.chunk_delay * max(len(chunks) - 1, 0))
            elapsed = time.monotonic_ns() - started
            whole = dialect.whole("".join(tokens), finish, rec.prompt_tokens, len(tokens), elapsed)
            payload = _dumps(whole)
            if fault in ("cut", "stall"):
                resp = web.StreamResponse(headers={"Content-Type": "application/json"})
                await resp.prepare(request)
                await resp.write(payload[: len(payload) // 2])
                if fault == "stall":
                    await self._hold_forever()
                _abort(request)
                return resp
            if fault == "malformed":
                payload = payload[: len(payload) // 2]
            return web.Response(body=payload, content_type="application/json")
        except _ServerClosing:
            _abort(request)
            return resp if resp is not None else web.Response(status=503)
        except ConnectionResetError:
            # The client went away mid-stream; nothing left to say to it.
            self._hung_up()
            return resp if resp is not None else web.Response(status=499)

    # -- Ollama routes ------------------------------------------------------------------------

    async def _root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    async def _ollama_version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": OLLAMA_VERSION})

    async def _ollama_tags(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [_ollama_model_entry(m) for m in self.models]})

    async def _ollama_ps(self, request: web.Request) -> web.Response:
        return web.json_response({"models": []})

    async def _ollama_show(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = {}
        name = str(body.get("model") or body.get("name") or "") if isinstance(body, dict) else ""
        if not self._has_model(name):
            return web.json_response({"error": f"model '{name}' not found"}, status=404)
        entry = _ollama_model_entry(name)
        family = entry["details"]["family"]
        return web.json_response(
            {
                "modelfile": f"FROM {entry['name']}\n",
                "parameters": 'stop "<|eot_id|>"',
                "template": "{{ .Prompt }}",
                "details": entry["details"],
                "model_info": {
                    "general.architecture": family,
                    f"{family}.context_length": self.context_length(name),
                },
                "capabilities": ["completion", *(["vision"] if _strip_latest(name)
                                                 in self.vision_models else [])],
                "modified_at": entry["modified_at"],
            }
        )

    async def _ollama_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._chat(request, _OllamaDialect)

    # -- OpenAI routes ------------------------------------------------------------------------

    def _openai_auth_error(self, request: web.Request) -> web.Response | None:
        key = _bearer(request)
        if self.api_key is None or key == self.api_key:
            return None
        return _OpenAIDialect(self, "", {}, key).error("auth")

    @staticmethod
    def _openai_model_entry(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 1_735_689_600, "owned_by": "library"}

    async def _openai_models(self, request: web.Request) -> web.Response:
        if (err := self._openai_auth_error(request)) is not None:
            return err
        data = [self._openai_model_entry(m) for m in self.models]
        if self.report_window:  # vLLM's field
            for entry in data:
                entry["max_model_len"] = self.context_length(entry["id"])
        return web.json_response({"object": "list", "data": data})

    async def _openai_model(self, request: web.Request) -> web.Response:
        if (err := self._openai_auth_error(request)) is not None:
            return err
        name = request.match_info["model"]
        if not self._has_model(name):
            return _OpenAIDialect(self, name, {}).error("not_found")
        return web.json_response(self._openai_model_entry(name))

    async def _openai_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._chat(request, _OpenAIDialect)

    # -- llama.cpp server routes -----------------------------------------------------------------

    async def _tokenize(self, request: web.Request) -> web.Response:
        if not self.llamacpp_routes:
            raise web.HTTPNotFound()
        body = await request.json()
        text = body.get("content", body.get("prompt", ""))
        pieces = tokenize(str(text))
        self.tokenize_calls += 1
        return web.json_response({"tokens": list(range(len(pieces))), "count": len(pieces)})

    async def _props(self, request: web.Request) -> web.Response:
        if not self.llamacpp_routes:
            raise web.HTTPNotFound()
        model = self.models[0] if self.models else ""
        return web.json_response({
            "default_generation_settings": {"n_ctx": self.context_length(model), "model": model},
            "total_slots": 1,
            "model_path": f"/models/{model}.gguf",
            "chat_template": "{{ messages }}",
        })

    # -- control routes for subprocess use ----------------------------------------------------

    async def _fake_config(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not set(body) <= {*_CONFIG_KEYS, "clear_requests"}:
            return web.json_response({"error": f"expected keys among {_CONFIG_KEYS}"}, status=400)
        try:
            for key in _CONFIG_KEYS:
                if key in body:
                    setattr(self, key, body[key])
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        if body.get("clear_requests"):
            self.requests.clear()
        return web.json_response({k: getattr(self, k) for k in _CONFIG_KEYS if k != "reply"})

    async def _fake_requests(self, request: web.Request) -> web.Response:
        return web.json_response([asdict(r) for r in self.requests])


def _unsupported_param(name: str) -> web.Response:
    other = "max_completion_tokens" if name == "max_tokens" else "max_tokens"
    err = {
        "message": f"Unsupported parameter: '{name}' is not supported with this model. "
                   f"Use '{other}' instead.",
        "type": "invalid_request_error", "param": name, "code": "unsupported_parameter",
    }
    return web.json_response({"error": err}, status=400)


def _role_problem(messages: list[dict[str, Any]]) -> str | None:
    """What Mistral's chat template raises, or None."""
    roles = [m.get("role") for m in messages]
    if roles.count("system") > 1 or "system" in roles[1:]:
        return "Only one system message is allowed, at the start"
    turns = [r for r in roles if r != "system"]
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    if turns != expected:
        return "Conversation roles must alternate user/assistant/user/assistant/..."
    return None


def _too_long(form: str, prompt: int, asked: int, window: int) -> web.Response:
    """A too-long prompt refused the way each server does."""
    if form == "llamacpp":
        err: dict[str, Any] = {
            "code": 400,
            "message": "the request exceeds the available context size, try increasing it",
            "type": "exceed_context_size_error", "n_prompt_tokens": prompt, "n_ctx": window,
        }
        return web.json_response({"error": err}, status=400)
    if form == "vllm":
        return web.json_response({
            "object": "error",
            "message": f"This model's maximum context length is {window} tokens. However, you "
                       f"requested {asked} tokens ({prompt} in the messages, {asked - prompt} "
                       "in the completion). Please reduce the length of the messages or "
                       "completion.",
            "type": "BadRequestError", "param": None, "code": 400,
        }, status=400)
    if form == "llama_cpp_python":
        message = f"Requested tokens ({asked}) exceed context window of {window}"
    else:
        message = (f"This model's maximum context length is {window} tokens. However, your "
                   f"messages resulted in {prompt} tokens. Please reduce the length of the "
                   "messages.")
    err = {"message": message, "type": "invalid_request_error", "param": "messages",
           "code": "context_length_exceeded"}
    return web.json_response({"error": err}, status=400)


def _check_fault(value: str | None) -> str | None:
    if value is not None and value not in FAULTS:
        hint = " (use closed_port_url() for refused connections)" if value == "refuse" else ""
        raise ValueError(f"unknown fault {value!r}, expected one of {sorted(FAULTS)}{hint}")
    return value


def _bearer(request: web.Request) -> str:
    auth = request.headers.get("Authorization", "")
    return auth[7:] if auth[:7].lower() == "bearer " else ""


def _bad_key_message(key: str) -> str:
    shown = key[:3] + "*" * max(len(key) - 7, 0) + key[-4:] if len(key) > 7 else key
    return (
        f"Incorrect API key provided: {shown}. "
        "You can find your API key at https://platform.openai.com/account/api-keys."
    )


def _abort(request: web.Request) -> None:
    """Drop the connection so the client sees a broken (incomplete) response."""
    if request.transport is not None:
        request.transport.close()


def _ollama_model_entry(name: str) -> dict[str, Any]:
    full = name if ":" in name else f"{name}:latest"
    digest = hashlib.sha256(full.encode()).hexdigest()
    letters = re.match(r"[a-z]+", full.lower())
    family = letters.group() if letters else "llama"  # "qwen2.5:7b" -> "qwen"
    return {
        "name": full,
        "model": full,
        "modified_at": "2025-01-15T10:20:30.123456Z",
        "size": 1_000_000_000 + int(digest[:8], 16) % 4_000_000_000,
        "digest": digest,
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": family,
            "families": [family],
            "parameter_size": "3.2B",
            "quantization_level": "Q4_K_M",
        },
    }


async def closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The port was just released; nothing else on this host is likely to grab it right away.
    return f"http://127.0.0.1:{port}"



# --------------------------------------------------------------------------------------------
# Embeddings: Ollama /api/embed and /api/embeddings, OpenAI /v1/embeddings (recall)
# --------------------------------------------------------------------------------------------

EMBED_DIM = 32


@dataclass
class EmbeddingKnobs:
    """What the embedding routes answer; change the attributes at any time.

    ``phrases`` maps a phrase to a vector: a text that contains the phrase
    (case-insensitive) gets that vector, so a test can make two texts with no
    word in common similar on purpose. Any other text gets a deterministic
    bag-of-hashed-words vector (texts sharing words are somewhat similar).
    ``fault`` is None, "http500" or "hang"; ``delay`` seconds before answering.
    """

    phrases: dict[str, list[float]] = field(default_factory=dict)
    dim: int = EMBED_DIM
    fault: str | None = None
    delay: float = 0.0
    requests: list[dict[str, Any]] = field(default_factory=list)  # route, model, input

    def vector(self, text: str) -> list[float]:
        low = text.lower()
        for phrase, vec in self.phrases.items():
            if phrase.lower() in low:
                return [float(x) for x in vec]
        out = [0.0] * self.dim
        for word in re.findall(r"\w+", low) or [low]:
            digest = hashlib.sha256(word.encode()).digest()
            for i in range(self.dim):
                out[i] += 1.0 if digest[i % len(digest)] & (1 << (i // len(digest))) else -1.0
        norm = sum(x * x for x in out) ** 0.5 or 1.0
        return [x / norm for x in out]


def embedding_routes(srv: ModelServer) -> list[web.RouteDef]:
    knobs = lambda: srv.embeddings  # noqa: E731  (read at request time: tests swap it)

    async def prelude(request: web.Request,
                      route: str) -> tuple[dict[str, Any], web.Response | None]:
        try:
            body = await request.json()
        except ValueError:
            return {}, web.json_response({"error": "invalid JSON body"}, status=400)
        k = knobs()
        k.requests.append({"route": route, "model": body.get("model"),
                           "input": body.get("input", body.get("prompt"))})
        await srv._sleep(k.delay)
        if k.fault == "hang":
            await srv._hold_forever()
        if k.fault == "http500":
            return body, web.json_response({"error": "embedding backend failed"}, status=500)
        return body, None

    def inputs(value: Any) -> list[str]:
        return [value] if isinstance(value, str) else [str(v) for v in value or []]

    async def ollama_embed(request: web.Request) -> web.Response:
        body, err = await prelude(request, "/api/embed")
        if err is not None:
            return err
        model = str(body.get("model", ""))
        if not srv._has_model(model):
            return web.json_response(
                {"error": f'model "{model}" not found, try pulling it first'}, status=404)
        texts = inputs(body.get("input"))
        return web.json_response({
            "model": model,
            "embeddings": [knobs().vector(t) for t in texts],
            "total_duration": 14_143_917, "load_duration": 1_019_500,
            "prompt_eval_count": sum(count_tokens(t) for t in texts),
        })

    async def ollama_embeddings(request: web.Request) -> web.Response:  # the legacy route
        body, err = await prelude(request, "/api/embeddings")
        if err is not None:
            return err
        model = str(body.get("model", ""))
        if not srv._has_model(model):
            return web.json_response(
                {"error": f'model "{model}" not found, try pulling it first'}, status=404)
        return web.json_response({"embedding": knobs().vector(str(body.get("prompt", "")))})

    async def openai_embeddings(request: web.Request) -> web.Response:
        if (auth := srv._openai_auth_error(request)) is not None:
            return auth
        body, err = await prelude(request, "/v1/embeddings")
        if err is not None:
            return err
        model = str(body.get("model", ""))
        if not srv._has_model(model):
            return _OpenAIDialect(srv, model, {}).error("not_found")
        texts = inputs(body.get("input"))
        base64_wanted = body.get("encoding_format") == "base64"
        data = []
        for i, text in enumerate(texts):
            vec = knobs().vector(text)
            shown: Any = (base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
                          if base64_wanted else vec)
            data.append({"object": "embedding", "index": i, "embedding": shown})
        tokens = sum(count_tokens(t) for t in texts)
        return web.json_response({"object": "list", "data": data, "model": model,
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    return [web.post("/api/embed", ollama_embed),
            web.post("/api/embeddings", ollama_embeddings),
            web.post("/v1/embeddings", openai_embeddings)]


# --------------------------------------------------------------------------------------------
# Standalone process
# --------------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tests.fakes.model_server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated")
    p.add_argument("--reply", default=None, help="fixed reply text (default: echo)")
    p.add_argument(
        "--reply-delay",
        "--first-token-delay",
        dest="first_token_delay",
        type=float,
        default=0.0,
        help="seconds before the first content chunk",
    )
    p.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between chunks")
    p.add_argument("--tokens-per-chunk", type=int, default=1)
    p.add_argument("--fault", choices=sorted(FAULTS), default=None)
    p.add_argument("--api-key", default=None, help="require this Bearer key on /v1 routes")
    return p.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    srv = ModelServer(models=models, host=args.host, port=args.port)
    srv.reply = args.reply
    srv.fault = args.fault
    srv.first_token_delay = args.first_token_delay
    srv.chunk_delay = args.chunk_delay
    srv.tokens_per_chunk = args.tokens_per_chunk
    srv.api_key = args.api_key
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # not available on Windows
            loop.add_signal_handler(sig, stop.set)
    await srv.start()
    try:
        print(f"READY {srv.url}", flush=True)
        await stop.wait()
    finally:
        await srv.close()


def main(argv: list[str] | None = None) -> None:
    asyncio.run(_serve(_parse_args(argv)))


if __name__ == "__main__":
    main()
