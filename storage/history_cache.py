"""Recently loaded messages by id, per conversation, so a turn reads only what is new.

A busy bot writes every conversation's messages among everyone else's, so
loading one conversation's history touches one table page per message (about
2 µs each, a few hundred µs a turn on the database's thread). A turn instead
reads the ids of its window from the (conversation, id) index alone, a few
adjacent pages, and only the rows it has not seen yet.

It can never serve a stale message: a stored message is never changed and its
id is never reused (migration 004), and the ids always come from the
database, so a message deleted meanwhile (/reset, forget, in any process) is
simply not asked for. Bounded by the characters it keeps, least recently used
conversation first. Owned by the event loop; the database's thread only looks
ids up in a conversation's mapping during that conversation's turn (single
dict look-ups and inserts are atomic under the GIL).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from bot.records import StoredMessage

DEFAULT_MAX_CHARS = 16_000_000  # characters of message text kept, all conversations
SLACK = 16  # messages a conversation may keep beyond its last window before a rebuild
EMPTY: Mapping[int, StoredMessage] = MappingProxyType({})


class HistoryCache:
    def __init__(self, max_chars: int = DEFAULT_MAX_CHARS) -> None:
        self.max_chars = max_chars
        # conversation → (its messages by id, their characters), least recent first
        self._by_conversation: OrderedDict[int, tuple[dict[int, StoredMessage], list[int]]] = \
            OrderedDict()
        self._chars = 0

    def known(self, conversation_id: int) -> Mapping[int, StoredMessage]:
        """The conversation's cached messages by id (read-only; may be empty)."""
        got = self._by_conversation.get(conversation_id)
        return got[0] if got is not None else EMPTY

    def keep(self, conversation_id: int, window: list[StoredMessage], *,
             all_known: bool) -> None:
        """The conversation's window as just loaded; `all_known`: every message of it
        came from `known`. What the window no longer holds goes, SLACK at a time."""
        got = self._by_conversation.get(conversation_id)
        if got is not None and all_known and len(got[0]) - len(window) <= SLACK:
            self._by_conversation.move_to_end(conversation_id)
            return
        self.drop(conversation_id)
        chars = sum(len(m.content) for m in window)
        if chars > self.max_chars:
            return
        self._by_conversation[conversation_id] = ({m.id: m for m in window}, [chars])
        self._grew(chars)

    def add(self, conversation_id: int, messages: Iterable[StoredMessage]) -> None:
        """Messages just stored, if the conversation is kept (its next turn needs them)."""
        got = self._by_conversation.get(conversation_id)
        if got is None:
            return
        by_id, chars = got
        n = 0
        for m in messages:
            by_id[m.id] = m
            n += len(m.content)
        chars[0] += n
        self._grew(n)

    def drop(self, conversation_id: int) -> None:
        got = self._by_conversation.pop(conversation_id, None)
        if got is not None:
            self._chars -= got[1][0]

    def clear(self) -> None:
        self._by_conversation.clear()
        self._chars = 0

    def __len__(self) -> int:
        return sum(len(m) for m, _ in self._by_conversation.values())

    def _grew(self, chars: int) -> None:
        self._chars += chars
        while self._chars > self.max_chars and self._by_conversation:
            _, (_, gone) = self._by_conversation.popitem(last=False)
            self._chars -= gone[0]
