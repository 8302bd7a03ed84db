"""What a Telegram message carries besides text: pictures the model may see, or media it can't.

A photo is the largest of its sizes whose announced `file_size` is within
MAX_IMAGE_BYTES (Telegram sends several); a document whose mime type is
image/* is a picture too. Stickers, voice notes, videos, audio and other files
are named so the core can say it only reads text and pictures. Downloads go
through getFile, then the file URL python-telegram-bot builds from
`base_file_url` (TELEGRAM_BASE_URL's …/file/bot for a self-hosted server),
read with a cap; a local Bot API server's absolute paths are read from disk.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from telegram import Bot, Message, PhotoSize
from telegram.error import TelegramError

from bot.images import (
    Downloader,
    Fetch,
    ImageRef,
    ImageTooLarge,
    ImageUnavailable,
    is_image_type,
)

PHOTO_MIME = "image/jpeg"  # Telegram re-encodes every photo as JPEG


def has_media(message: Message) -> bool:
    """Whether the message carries a file of any kind (photo, sticker, voice, ...)."""
    return bool(message.photo) or message.effective_attachment is not None


def unsupported_kind(message: Message) -> str:
    """"sticker", "voice", "video", "audio" or "file"; "" for text and pictures."""
    if message.photo:
        return ""
    if message.sticker is not None:
        return "sticker"
    if message.voice is not None:
        return "voice"
    if message.video is not None or message.video_note is not None \
            or message.animation is not None:
        return "video"
    if message.audio is not None:
        return "audio"
    document = message.document
    if document is not None and not is_image_type(document.mime_type):
        return "file"
    if document is None and message.effective_attachment is not None:
        return "file"  # a contact, location, poll, ...: nothing to read either
    return ""


def pick_photo(sizes: Sequence[PhotoSize], max_bytes: int) -> PhotoSize:
    """The largest size within `max_bytes` (an unannounced size counts as within);
    if none is, the smallest, which the core then refuses by its size."""
    fitting = [p for p in sizes if p.file_size is None or p.file_size <= max_bytes]
    if fitting:
        return max(fitting, key=lambda p: (p.width * p.height, p.file_size or 0))
    return min(sizes, key=lambda p: p.file_size or 0)


def images_of(message: Message, bot: Bot, downloader: Downloader,
              max_bytes: int) -> tuple[ImageRef, ...]:
    """The picture this message carries, as an ImageRef (at most one in Telegram)."""
    if message.photo:
        photo = pick_photo(message.photo, max_bytes)
        return (ImageRef(photo.file_size, PHOTO_MIME,
                         _fetcher(bot, downloader, photo.file_id)),)
    document = message.document
    if document is not None and is_image_type(document.mime_type):
        return (ImageRef(document.file_size, str(document.mime_type),
                         _fetcher(bot, downloader, document.file_id)),)
    return ()


def _fetcher(bot: Bot, downloader: Downloader, file_id: str) -> Fetch:
    async def fetch(max_bytes: int) -> bytes:
        try:
            file = await bot.get_file(file_id)
        except TelegramError as exc:
            raise ImageUnavailable(f"getFile: {exc}") from None
        # getFile announces the size again: checked before a byte is read.
        if file.file_size is not None and file.file_size > max_bytes:
            raise ImageTooLarge(file.file_size, max_bytes)
        path = file.file_path
        if not path:
            raise ImageUnavailable("getFile gave no file_path")
        if path.startswith(("http://", "https://")):
            return await downloader.get(path, max_bytes)
        # A Bot API server in --local mode hands out absolute paths on its own disk.
        return await asyncio.to_thread(_read_local, Path(path), max_bytes)

    return fetch


def _read_local(path: Path, max_bytes: int) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise ImageUnavailable(f"local file: {type(exc).__name__}") from None
    if len(data) > max_bytes:
        raise ImageTooLarge(len(data), max_bytes)
    return data
