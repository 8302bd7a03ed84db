"""Sample records for the storage tests: one conversation and its audit rows."""

from __future__ import annotations

from bot.records import AuditRecord, ConversationRef

REF = ConversationRef(key="telegram:1@dm", platform="telegram", user_id="1", place="dm")


def audit(**kw: object) -> AuditRecord:
    values: dict[str, object] = dict(platform="telegram", user_id="1", chat_id="c",
                                     conversation=REF.key, user_input="hi", model="m",
                                     provider="ollama")
    values.update(kw)
    return AuditRecord(**values)  # type: ignore[arg-type]
