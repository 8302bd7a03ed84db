"""Images users send: the platform-neutral reference, bounded downloads, and provider formats.

An adapter turns a platform's photo or attachment into an `ImageRef`: the size
the platform announces, its type, and a `fetch(max_bytes)` that downloads it
(streaming, stopped once it passes `max_bytes`). The service downloads before
it takes the conversation's lock, and the bytes go to the model with the user's
message as a neutral `Image` (prompt messages carry them under "images");
each provider turns that into its own wire form (`ollama_messages`,
`openai_messages`). History keeps only a short text stand-in (`stand_in`).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # bot.messages imports this module: keep it light
    import httpx

    from bot.providers.base import ModelInfo

DOWNLOAD_TIMEOUT = 30.0  # seconds one image's download may take, connection included
IMAGE_TOKENS = 768  # what one image is charged in the prompt budget (llava: 576, gemma3: 256)
_CHUNK = 64 * 1024


class ImageTooLarge(Exception):
    """The image is (or turned out to be) larger than the limit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"image of {size}+ bytes > {limit}")
        self.size = size
        self.limit = limit


class ImageUnavailable(Exception):
    """The image could not be downloaded; the message is for the operator's log."""


Fetch = Callable[[int], Awaitable[bytes]]


@dataclass(frozen=True, slots=True)
class ImageRef:
    """An image a user sent, not downloaded yet."""

    size: int | None  # bytes, as the platform announces it; None: it didn't say
    mime: str  # "image/jpeg", ...
    # Downloads at most `max_bytes` (raising ImageTooLarge beyond), or raises ImageUnavailable.
    fetch: Fetch = field(compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Image:
    """A downloaded image, as it goes to the model."""

    data: bytes = field(repr=False)
    mime: str
    # The data base64-encoded, made in a worker thread at download: 10 MB take ~0.1 s,
    # too long for the event loop.
    b64: str = field(default="", repr=False)

    def base64(self) -> str:
        return self.b64 or _b64(self.data)

    def data_url(self) -> str:
        return f"data:{self.mime};base64,{self.base64()}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def human_bytes(n: int) -> str:
    """10000000 → '10 MB', 1500000 → '1.5 MB', 250000 → '250 KB' (decimal units)."""
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= size:
            return f"{n / size:.1f}".removesuffix(".0") + f" {unit}"
    return f"{n} bytes"


def stand_in(caption: str, count: int) -> str:
    """What history keeps of a message with images: `[image: caption]`, never the bytes."""
    what = "image" if count == 1 else f"{count} images"
    return f"[{what}: {caption}]" if caption.strip() else f"[{what}]"


def can_see(model: str, info: ModelInfo, vision_models: Sequence[str]) -> bool:
    """Whether `model` takes images: the server says so (Ollama's "vision"
    capability) or the operator does (VISION_MODELS)."""
    bare = model.removesuffix(":latest")
    if any(bare == v.removesuffix(":latest") for v in vision_models):
        return True
    return "vision" in (info.capabilities or ())


def is_image_type(mime: str | None) -> bool:
    return bool(mime) and mime.split(";", 1)[0].strip().lower().startswith("image/")


async def download(client: httpx.AsyncClient, url: str, max_bytes: int) -> bytes:
    """GET `url`, reading at most `max_bytes`: refused by its Content-Length before
    reading, and stopped (the connection dropped) as soon as the body passes the limit."""
    import httpx

    try:
        async with client.stream("GET", url) as response:
            if response.status_code != 200:
                raise ImageUnavailable(f"download: HTTP {response.status_code}")
            announced = response.headers.get("content-length", "")
            if announced.isdigit() and int(announced) > max_bytes:
                raise ImageTooLarge(int(announced), max_bytes)
            body = bytearray()
            async for chunk in response.aiter_bytes(_CHUNK):
                body += chunk
                if len(body) > max_bytes:
                    raise ImageTooLarge(len(body), max_bytes)
            return bytes(body)
    except httpx.HTTPError as exc:
        # Never the URL: a Telegram file URL holds the bot's token.
        raise ImageUnavailable(f"download: {type(exc).__name__}") from None


class Downloader:
    """An adapter's HTTP client for image downloads (made on first use, closed with it)."""

    def __init__(self, timeout: float = DOWNLOAD_TIMEOUT) -> None:
        self._timeout = timeout
        self._client: httpx.AsyncClient | None = None

    async def get(self, url: str, max_bytes: int) -> bytes:
        if self._client is None:
            import httpx

            self._client = httpx.AsyncClient(timeout=self._timeout, follow_redirects=True)
        return await download(self._client, url, max_bytes)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


async def fetch_all(refs: Sequence[ImageRef], max_bytes: int, seconds: float) -> list[Image]:
    """Download each image, within `max_bytes` and `seconds` each.

    Raises ImageTooLarge, ImageUnavailable or TimeoutError.
    """
    images = []
    for ref in refs:
        async with asyncio.timeout(seconds):
            data = await ref.fetch(max_bytes)
        if len(data) > max_bytes:  # an adapter's fetch that read on regardless
            raise ImageTooLarge(len(data), max_bytes)
        images.append(Image(data, ref.mime, await asyncio.to_thread(_b64, data)))
    return images


def attach(messages: list[dict[str, Any]], images: Sequence[Image]) -> list[dict[str, Any]]:
    """The prompt with `images` on its last message (the user's new one)."""
    if not images or not messages:
        return messages
    return [*messages[:-1], {**messages[-1], "images": list(images)}]


def ollama_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ollama's form: `images` on the message, base64 (the client sends it as it is)."""
    return [{**m, "images": [i.base64() for i in m["images"]]} if m.get("images") else m
            for m in messages]


def openai_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI's form: the text and one `image_url` part per image, as a `data:` URL."""
    out = []
    for m in messages:
        images = m.get("images")
        if not images:
            out.append(m)
            continue
        rest = {k: v for k, v in m.items() if k not in ("images", "content")}
        parts: list[dict[str, Any]] = []
        if m.get("content"):
            parts.append({"type": "text", "text": m["content"]})
        parts += [{"type": "image_url", "image_url": {"url": i.data_url()}} for i in images]
        out.append({**rest, "content": parts})
    return out
