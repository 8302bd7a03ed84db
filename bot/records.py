"""The records the core keeps: conversations, messages, summaries, audit rows."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

# The audit table's columns after `id`, in the order every backend stores them
# (a new field: add it here, to AuditRecord, and as a migration step).
AUDIT_COLUMNS = (
    "timestamp", "platform", "user_id", "chat_id", "conversation", "provider", "model",
    "user_input", "model_response", "status", "error", "response_time", "first_token_time",
    "prompt_tokens", "completion_tokens", "history_messages", "kind", "summary_used",
    "recalled", "persona", "images", "est_prompt_tokens", "est_completion_tokens",
)


class StorageError(Exception):
    """The database cannot be used; the message is one line for the operator."""


class StoreUnavailable(StorageError):
    """The store stopped taking turns for good (its file was deleted or replaced)."""


def utcnow() -> str:
    """UTC timestamp, ISO 8601 with milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utcnow_precise() -> str:
    """UTC timestamp with microseconds: erasures and turn starts compare at this grain
    (a turn begun a millisecond after a `forget` is not the forget's to void)."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class ConversationRef:
    """Who a conversation belongs to; `key` is stable and human-readable."""

    key: str
    platform: str
    user_id: str
    place: str  # "dm", a server/group id, or "*" with MEMORY_SCOPE=user


@dataclass(frozen=True, slots=True)
class StoredMessage:
    id: int
    role: str  # "user" or "assistant"
    content: str


@dataclass(frozen=True, slots=True)
class Summary:
    text: str
    upto_id: int  # the newest message the summary covers
    updated_at: str


@dataclass(frozen=True, slots=True)
class Note:
    """A note the user asked the bot to keep (/remember)."""

    id: int
    text: str
    created_at: str


@dataclass(frozen=True, slots=True)
class TurnContext:
    """What one turn reads before the model call."""

    model_choice: str | None  # the user's /model pick, if any
    summary: Summary | None
    history: list[StoredMessage]  # newest messages after the summary, oldest first
    language_choice: str | None = None  # the user's /language pick, if any


@dataclass(slots=True)
class AuditRecord:
    """One row of the audit log: an exchange, a refusal, or a summary call."""

    platform: str
    user_id: str
    chat_id: str
    conversation: str
    user_input: str
    status: str = "ok"  # ok, error, rejected, cancelled
    kind: str = "chat"  # chat or summary
    provider: str = ""
    model: str = ""
    model_response: str = ""
    error: str = ""
    response_time: float | None = None
    first_token_time: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    history_messages: int = 0
    summary_used: bool = False
    recalled: int = 0  # older messages recalled into the prompt
    persona: str = ""  # empty: none
    images: int = 0  # images sent to the model
    # The bot's own estimate, only where the server reported no counts (its
    # prompt_tokens / completion_tokens then stay None: unknown).
    est_prompt_tokens: int | None = None
    est_completion_tokens: int | None = None
    timestamp: str = field(default_factory=utcnow)
    # When the user's data in this record was read (the turn's start, or a
    # summary pass's): a `forget` after it voids the record. Not a column.
    read_at: str = field(default_factory=utcnow_precise)

    @property
    def since(self) -> str:
        """The moment a later erasure of this user must void the record from."""
        return self.read_at

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["read_at"]
        return d

    def values(self) -> tuple[Any, ...]:
        """The record as a row, in AUDIT_COLUMNS order."""
        return tuple(getattr(self, column) for column in AUDIT_COLUMNS)
