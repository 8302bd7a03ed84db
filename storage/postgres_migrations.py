"""PostgreSQL schema: an ordered list of named steps, recorded in `_migrations`.

The same steps, names, tables, columns and indexes as `sqlite_migrations`, in
PostgreSQL types, so copy-db moves rows both ways unchanged. Timestamps stay
TEXT (the ISO strings the core writes) so they round-trip byte for byte.
Integers are BIGINT because SQLite's INTEGER is 64-bit.

Never edit a step that has shipped; add a new one. Each step runs in the same
transaction as the row that records it, under an advisory lock, so a crash
leaves it whole or absent and two processes starting at once apply it once.
"""

from __future__ import annotations

# Any fixed 64-bit number will do; it only has to be the same in every process.
MIGRATION_LOCK = 0x6D656D6F72796231  # "memoryb1"

MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)
"""

MIGRATIONS: list[tuple[str, str]] = [
    (
        "001_initial",
        """
        CREATE TABLE conversations (
            id BIGSERIAL PRIMARY KEY,
            key TEXT NOT NULL UNIQUE,
            platform TEXT NOT NULL,
            user_id TEXT NOT NULL,
            place TEXT NOT NULL,
            created_at TEXT NOT NULL
        );
        CREATE INDEX conversations_user ON conversations(platform, user_id);
        CREATE TABLE messages (
            id BIGSERIAL PRIMARY KEY,
            conversation_id BIGINT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
            content TEXT NOT NULL,
            created_at TEXT NOT NULL
        );
        -- serves "newest N messages of one conversation" from the index alone
        CREATE INDEX messages_conversation_id ON messages(conversation_id, id);
        CREATE TABLE user_settings (
            platform TEXT NOT NULL,
            user_id TEXT NOT NULL,
            model TEXT,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (platform, user_id)
        );
        CREATE TABLE audit (
            id BIGSERIAL PRIMARY KEY,
            timestamp TEXT NOT NULL,
            platform TEXT NOT NULL,
            user_id TEXT NOT NULL,
            chat_id TEXT NOT NULL,
            conversation TEXT NOT NULL,
            provider TEXT NOT NULL,
            model TEXT NOT NULL,
            user_input TEXT NOT NULL,
            model_response TEXT NOT NULL,
            status TEXT NOT NULL,
            error TEXT NOT NULL,
            response_time DOUBLE PRECISION,
            first_token_time DOUBLE PRECISION,
            prompt_tokens BIGINT,
            completion_tokens BIGINT,
            history_messages BIGINT NOT NULL DEFAULT 0
        );
        CREATE INDEX audit_user ON audit(platform, user_id, id);
        """,
    ),
    (
        "002_summaries",
        """
        CREATE TABLE summaries (
            conversation_id BIGINT PRIMARY KEY
                REFERENCES conversations(id) ON DELETE CASCADE,
            text TEXT NOT NULL,
            upto_id BIGINT NOT NULL,
            updated_at TEXT NOT NULL
        );
        ALTER TABLE audit ADD COLUMN kind TEXT NOT NULL DEFAULT 'chat';
        ALTER TABLE audit ADD COLUMN summary_used BOOLEAN NOT NULL DEFAULT false;
        """,
    ),
    (
        # PostgreSQL only: the rate limit must hold across processes. SQLite
        # (one process) keeps its moving window in memory.
        "003_rate_events",
        """
        CREATE TABLE rate_events (
            user_key TEXT NOT NULL,
            at DOUBLE PRECISION NOT NULL
        );
        CREATE INDEX rate_events_user ON rate_events(user_key, at);
        """,
    ),
    (
        # SQLite rebuilds its tables so ids are never reused; BIGSERIAL never
        # reuses them. Kept so both lists carry the same names.
        "004_never_reuse_ids",
        "SELECT 1",
    ),
    (
        # `logs --since` and retention's batched deletes read a time range.
        "005_audit_timestamp",
        'CREATE INDEX audit_timestamp ON audit("timestamp")',
    ),
]
