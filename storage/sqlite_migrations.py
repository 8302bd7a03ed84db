"""SQLite schema: an ordered list of named steps, recorded in `_migrations`.

Never edit a step that has shipped; add a new one. Each step runs in the same
transaction as the row that records it, so a crash leaves it whole or absent.
"""

from __future__ import annotations

MIGRATIONS: list[tuple[str, str]] = [
    (
        "001_initial",
        """
        CREATE TABLE conversations (
            id INTEGER PRIMARY KEY,
            key TEXT NOT NULL UNIQUE,
            platform TEXT NOT NULL,
            user_id TEXT NOT NULL,
            place TEXT NOT NULL,
            created_at TEXT NOT NULL
        );
        CREATE INDEX conversations_user ON conversations(platform, user_id);
        CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
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
            id INTEGER PRIMARY KEY,
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
            response_time REAL,
            first_token_time REAL,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            history_messages INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX audit_user ON audit(platform, user_id, id);
        """,
    ),
    (
        "002_summaries",
        """
        CREATE TABLE summaries (
            conversation_id INTEGER PRIMARY KEY
                REFERENCES conversations(id) ON DELETE CASCADE,
            text TEXT NOT NULL,
            upto_id INTEGER NOT NULL,
            updated_at TEXT NOT NULL
        );
        ALTER TABLE audit ADD COLUMN kind TEXT NOT NULL DEFAULT 'chat';
        ALTER TABLE audit ADD COLUMN summary_used INTEGER NOT NULL DEFAULT 0;
        """,
    ),
    (
        # PostgreSQL's table for a rate limit shared by several processes;
        # one SQLite process keeps its window in memory. Kept so both lists
        # carry the same names.
        "003_rate_events",
        "SELECT 1",
    ),
    (
        # Ids must never be reused: a summary or cache that names an id from
        # before a /reset or forget must not find someone else's rows.
        # Runs with foreign keys off (see SQLiteStore._migrate), as SQLite's
        # documented table rebuild requires.
        "004_never_reuse_ids",
        """
        CREATE TABLE conversations_v4 (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            key TEXT NOT NULL UNIQUE,
            platform TEXT NOT NULL,
            user_id TEXT NOT NULL,
            place TEXT NOT NULL,
            created_at TEXT NOT NULL
        );
        INSERT INTO conversations_v4 SELECT id, key, platform, user_id, place, created_at
            FROM conversations;
        CREATE TABLE messages_v4 (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
            content TEXT NOT NULL,
            created_at TEXT NOT NULL
        );
        INSERT INTO messages_v4 SELECT id, conversation_id, role, content, created_at
            FROM messages;
        DROP TABLE messages;
        DROP TABLE conversations;
        ALTER TABLE conversations_v4 RENAME TO conversations;
        ALTER TABLE messages_v4 RENAME TO messages;
        CREATE INDEX conversations_user ON conversations(platform, user_id);
        CREATE INDEX messages_conversation_id ON messages(conversation_id, id);
        """,
    ),
    (
        # `logs --since` and retention's batched deletes read a time range.
        "005_audit_timestamp",
        "CREATE INDEX audit_timestamp ON audit(timestamp)",
    ),
]
