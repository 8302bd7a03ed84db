"""What the core answers: a Reply value that says what it is, not a bare string stream.

`ChatService.handle` returns one Reply per message. An adapter renders it from
its fields alone and never reads its text to decide anything:

- `kind`: an answer (the model's reply, streaming Markdown deltas), a notice
  (command output, "send me some text"), an error, or a refusal (not allowed,
  rate limited, too long);
- `private`: only the asker should see it (ephemeral on Discord; in a Telegram
  group the answer still shows, but its keyboard works for the asker only);
- `choices`: what the user may pick (models now), rendered per platform;
- `outcome`: how it ended (ok / error / cancelled / refused), final once the
  stream is over;
- `id` and `cancel()`: a handle to stop a streaming answer (the future /stop
  finds the answers of a conversation with `ChatService.answers_in`).

Iterate a Reply (once) for its Markdown deltas, or `await reply.text()` for the
whole of it. A Reply with no text means: say nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from enum import StrEnum


class Kind(StrEnum):
    ANSWER = "answer"  # the model's reply
    NOTICE = "notice"  # the bot speaking: command output, hints
    ERROR = "error"  # something failed on the bot's side
    REFUSAL = "refusal"  # the bot won't: access, rate limit, size


class Outcome(StrEnum):
    PENDING = "pending"  # still streaming
    OK = "ok"
    ERROR = "error"
    CANCELLED = "cancelled"  # stopped: shutdown, the user, or the adapter stopped reading
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class Choice:
    """One thing the user may pick: `key` goes back to the command, `label` is shown."""

    key: str
    label: str
    current: bool = False  # what the user has now


@dataclass(frozen=True, slots=True)
class Choices:
    """A pick the user can make: running `/<command> <key>` applies one option."""

    command: str  # "model"; personas and languages later
    options: tuple[Choice, ...]

    @property
    def current(self) -> Choice | None:
        return next((c for c in self.options if c.current), None)

    def find(self, key: str) -> Choice | None:
        return next((c for c in self.options if c.key == key), None)

    def resolve(self, ref: str) -> Choice | None:
        """The option a button's `key_ref` names, if it is still on offer."""
        return next((c for c in self.options if refers_to(ref, c.key)), None)

    def pick_line(self, choice: Choice) -> str:
        """The command text that picks `choice`."""
        return f"/{self.command} {choice.key}"


def key_ref(key: str, room: int) -> str:
    """What a button carries for `key`: the key when it fits `room` bytes, else a short
    digest of it (platforms bound a button's data: 64 bytes on Telegram, 100 on Discord)."""
    if len(key.encode("utf-8")) <= room and not key.startswith("#"):
        return key
    return "#" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:20]


def refers_to(ref: str, key: str) -> bool:
    """Whether a button's `ref` (from `key_ref`) names `key`."""
    return ref == key or ref == key_ref(key, 0)


# Ids only need to be unique within one process (a /stop finds a reply in memory).
_ids = itertools.count(1)

# How an answer's stream reports its end: called once with the final outcome.
OutcomeOf = Callable[[], Outcome]


class Reply:
    """One reply to one message; see the module docstring."""

    def __init__(self, kind: Kind, text: str = "", *, private: bool = False,
                 choices: Choices | None = None,
                 stream: AsyncGenerator[str, None] | None = None,
                 final: OutcomeOf | None = None,
                 on_cancel: Callable[[], None] | None = None) -> None:
        self.kind = kind
        self.private = private
        self.choices = choices
        self.id = next(_ids)
        self._text = text
        self._stream = stream
        self._final = final
        self._on_cancel = on_cancel
        self._used = False
        self._cancelled = False
        if stream is None:
            self.outcome = _FIXED_OUTCOME[kind]
        else:
            self.outcome = Outcome.PENDING

    # -- constructors for the fixed kinds
    @classmethod
    def notice(cls, text: str, *, private: bool = False,
               choices: Choices | None = None) -> Reply:
        return cls(Kind.NOTICE, text, private=private, choices=choices)

    @classmethod
    def error(cls, text: str, *, private: bool = False) -> Reply:
        return cls(Kind.ERROR, text, private=private)

    @classmethod
    def refusal(cls, text: str = "", *, private: bool = False) -> Reply:
        """A refusal; with no text the bot stays silent."""
        return cls(Kind.REFUSAL, text, private=private)

    @classmethod
    def answer(cls, stream: AsyncGenerator[str, None], final: OutcomeOf, *,
               private: bool = False, on_cancel: Callable[[], None] | None = None) -> Reply:
        """The model's reply as it streams; `final()` says how it ended.

        With `on_cancel`, `cancel()` calls it instead of cutting the reading:
        the stream then ends itself at once (its model call closed, a stopped
        mark as its last delta)."""
        return cls(Kind.ANSWER, private=private, stream=stream, final=final,
                   on_cancel=on_cancel)

    # -- reading it
    @property
    def streaming(self) -> bool:
        return self._stream is not None

    @property
    def silent(self) -> bool:
        """Nothing to show (known up front only for fixed replies)."""
        return self._stream is None and not self._text.strip()

    def __aiter__(self) -> AsyncIterator[str]:
        return self.deltas()

    async def deltas(self) -> AsyncIterator[str]:
        """The Markdown deltas; a Reply is read once."""
        if self._used:
            raise RuntimeError("a Reply is read once")
        self._used = True
        if self._stream is None:
            if self._text:
                yield self._text
            return
        finished = False
        try:
            async with contextlib.aclosing(self._stream) as stream:
                # Checked before asking for more: closing the stream ends the turn as
                # cancelled, with what was shown so far as its text.
                if not self._cancelled:
                    async for delta in stream:
                        yield delta
                        if self._cancelled:
                            break
                    else:
                        finished = True
        finally:
            if finished and self._final is not None:
                self.outcome = self._final()
            else:
                self.outcome = Outcome.CANCELLED

    async def text(self) -> str:
        """The whole reply (streams it to the end)."""
        parts = [delta async for delta in self.deltas()]
        return "".join(parts)

    def cancel(self) -> None:
        """Stop a streaming answer before its next delta; the turn ends as cancelled.

        (It takes effect when the reader next asks for a delta; a /stop that must
        also cut a model call that is thinking can cancel the reading task.)"""
        if self._stream is not None and self.outcome is Outcome.PENDING:
            if self._on_cancel is not None:
                self._on_cancel()
            else:
                self._cancelled = True

    async def aclose(self) -> None:
        """Let go of a reply that will not be read (closes its stream)."""
        if self._stream is not None and not self._used:
            self._used = True
            await self._stream.aclose()
            self.outcome = Outcome.CANCELLED

    def __repr__(self) -> str:
        return (f"Reply({self.kind.value}, id={self.id}, private={self.private}, "
                f"outcome={self.outcome.value}, choices={self.choices is not None})")


_FIXED_OUTCOME = {Kind.NOTICE: Outcome.OK, Kind.ANSWER: Outcome.OK,
                  Kind.ERROR: Outcome.ERROR, Kind.REFUSAL: Outcome.REFUSED}
