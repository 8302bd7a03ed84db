"""The schema: one ordered list of named steps, applied to every backend.

A step is a function of the dialect returning its statements; its name is
recorded in `_migrations` in the same transaction, so it runs once, whole or
not at all (each store's `migrate` runs the list). Never edit or rename a step
that has shipped (databases in the field know it by name): add one at the end
with `@migration("NNN_what")`. A step one backend does not need returns [] there
and is still recorded, so both keep one history.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from storage.dialect import Dialect

MIGRATIONS_TABLE = (
    "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
)


class Migration(NamedTuple):
    name: str
    statements: Callable[[Dialect], list[str]]


MIGRATIONS: list[Migration] = []


def migration(name: str) -> Callable[[Callable[[Dialect], list[str]]],
                                     Callable[[Dialect], list[str]]]:
    """Append the decorated step to MIGRATIONS under `name`."""
    def add(step: Callable[[Dialect], list[str]]) -> Callable[[Dialect], list[str]]:
        if MIGRATIONS and name <= MIGRATIONS[-1].name:
            raise ValueError(f"migration {name} must sort after {MIGRATIONS[-1].name}")
        MIGRATIONS.append(Migration(name, step))
        return step
    return add


def _conversations_and_messages(pk: str, d: Dialect, suffix: str = "") -> list[str]:
    return [
        f"""CREATE TABLE conversations{suffix} (
            id {pk},
            key TEXT NOT NULL UNIQUE,
            platform TEXT NOT NULL,
            user_id TEXT NOT NULL,
            place TEXT NOT NULL,
            created_at TEXT NOT NULL
        )""",
        f"""CREATE TABLE messages{suffix} (
            id {pk},
            conversation_id {d.bigint} NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
            content TEXT NOT NULL,
            created_at TEXT NOT NULL
        )""",
    ]


_HISTORY_INDEXES = [
    "CREATE INDEX conversations_user ON conversations(platform, user_id)",
    # serves "newest N messages of one conversation" from the index alone
    "CREATE INDEX messages_conversation_id ON messages(conversation_id, id)",
]


@migration("001_initial")
def _initial(d: Dialect) -> list[str]:
    # SQLite's first ids were plain rowids (reusable); 004 rebuilds them.
    pk = "INTEGER PRIMARY KEY" if d.is_sqlite else d.serial
    return [
        *_conversations_and_messages(pk, d),
        *_HISTORY_INDEXES,
        """CREATE TABLE user_settings (
            platform TEXT NOT NULL,
            user_id TEXT NOT NULL,
            model TEXT,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (platform, user_id)
        )""",
        f"""CREATE TABLE audit (
            id {pk},
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
            response_time {d.real},
            first_token_time {d.real},
            prompt_tokens {d.bigint},
            completion_tokens {d.bigint},
            history_messages {d.bigint} NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX audit_user ON audit(platform, user_id, id)",
    ]


@migration("002_summaries")
def _summaries(d: Dialect) -> list[str]:
    return [
        f"""CREATE TABLE summaries (
            conversation_id {d.bigint} PRIMARY KEY
                REFERENCES conversations(id) ON DELETE CASCADE,
            text TEXT NOT NULL,
            upto_id {d.bigint} NOT NULL,
            updated_at TEXT NOT NULL
        )""",
        "ALTER TABLE audit ADD COLUMN kind TEXT NOT NULL DEFAULT 'chat'",
        f"ALTER TABLE audit ADD COLUMN summary_used {d.boolean} NOT NULL DEFAULT {d.false}",
    ]


@migration("003_rate_events")
def _rate_events(d: Dialect) -> list[str]:
    # A rate limit shared by several PostgreSQL processes; one SQLite process
    # keeps its moving window in memory.
    if d.is_sqlite:
        return []
    return [
        f"CREATE TABLE rate_events (user_key TEXT NOT NULL, at {d.real} NOT NULL)",
        "CREATE INDEX rate_events_user ON rate_events(user_key, at)",
    ]


@migration("004_never_reuse_ids")
def _never_reuse_ids(d: Dialect) -> list[str]:
    # Ids must never be reused: a summary or cache that names an id from
    # before a /reset or forget must not find someone else's rows. BIGSERIAL
    # never reuses them; SQLite rebuilds its tables with AUTOINCREMENT, with
    # foreign keys off (see sqlite_store.migrate), as its documented table
    # rebuild requires.
    if not d.is_sqlite:
        return []
    return [
        *_conversations_and_messages(d.serial, d, suffix="_v4"),
        "INSERT INTO conversations_v4 SELECT id, key, platform, user_id, place, created_at"
        " FROM conversations",
        "INSERT INTO messages_v4 SELECT id, conversation_id, role, content, created_at"
        " FROM messages",
        "DROP TABLE messages",
        "DROP TABLE conversations",
        "ALTER TABLE conversations_v4 RENAME TO conversations",
        "ALTER TABLE messages_v4 RENAME TO messages",
        *_HISTORY_INDEXES,
    ]


@migration("005_audit_fields")
def _audit_fields(d: Dialect) -> list[str]:
    # Recall, personas and images; and the indexes `logs` reads by.
    return [
        f"ALTER TABLE audit ADD COLUMN recalled {d.bigint} NOT NULL DEFAULT 0",
        "ALTER TABLE audit ADD COLUMN persona TEXT NOT NULL DEFAULT ''",
        f"ALTER TABLE audit ADD COLUMN images {d.bigint} NOT NULL DEFAULT 0",
        'CREATE INDEX IF NOT EXISTS audit_timestamp ON audit("timestamp")',
        "CREATE INDEX IF NOT EXISTS audit_user ON audit(platform, user_id, id)",
    ]


@migration("006_model_info")
def _model_info(d: Dialect) -> list[str]:
    # What the bot learned per model: its real window (reported, or learned
    # from a too-long error) and the token-count correction; and the bot's own
    # token estimate where a server reports no counts.
    return [
        f"CREATE TABLE model_info (model TEXT PRIMARY KEY, context_length {d.bigint},"
        f" learned_window {d.bigint}, token_factor {d.real}, cjk_factor {d.real},"
        " updated_at TEXT NOT NULL)",
        f"ALTER TABLE audit ADD COLUMN est_prompt_tokens {d.bigint}",
        f"ALTER TABLE audit ADD COLUMN est_completion_tokens {d.bigint}",
    ]


@migration("007_erasures")
def _erasures(d: Dialect) -> list[str]:
    # `forget` notes when it erased a user, in its own transaction: a turn or
    # summary that read the user's data before then writes nothing afterwards,
    # in whichever process it runs. Kept a day (see queries.ERASURE_KEEP).
    return [
        "CREATE TABLE erasures (platform TEXT NOT NULL, user_id TEXT NOT NULL,"
        " erased_at TEXT NOT NULL, PRIMARY KEY (platform, user_id))",
        "CREATE INDEX erasures_at ON erasures(erased_at)",
    ]


@migration("008_personas")
def _personas(d: Dialect) -> list[str]:
    # /persona NAME: the pick of one conversation; /persona NAME default: a
    # server's or group's default, set by its admins.
    return [
        "CREATE TABLE conversation_settings (conversation_key TEXT PRIMARY KEY,"
        " platform TEXT NOT NULL, user_id TEXT NOT NULL, persona TEXT NOT NULL,"
        " updated_at TEXT NOT NULL)",
        "CREATE INDEX IF NOT EXISTS conversation_settings_user"
        " ON conversation_settings(platform, user_id)",
        "CREATE TABLE place_settings (platform TEXT NOT NULL, place_id TEXT NOT NULL,"
        " persona TEXT NOT NULL, updated_at TEXT NOT NULL, PRIMARY KEY (platform, place_id))",
    ]


@migration("009_recall")
def _recall(d: Dialect) -> list[str]:
    # The recall index (storage/recall_index.py): the tokenizer's terms per message,
    # and embedding vectors per message and model. SQLite: an FTS5 table whose
    # rowid is the message id (no foreign key: /reset and forget delete its rows
    # themselves) and its vocabulary; PostgreSQL: a tsvector side table with a GIN
    # index, removed with its message by the foreign key.
    if d.is_sqlite:
        return [
            "CREATE VIRTUAL TABLE recall_fts USING fts5("
            'terms, conv, tokenize = "unicode61 remove_diacritics 0")',
            "CREATE VIRTUAL TABLE recall_vocab USING fts5vocab(recall_fts, 'row')",
            "CREATE TABLE recall_vectors ("
            " message_id INTEGER PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,"
            " conversation_id INTEGER NOT NULL, model TEXT NOT NULL, vector BLOB NOT NULL)",
            "CREATE INDEX recall_vectors_conversation"
            " ON recall_vectors(conversation_id, model, message_id)",
        ]
    return [
        "CREATE TABLE recall_terms ("
        " message_id BIGINT PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,"
        " conversation_id BIGINT NOT NULL, terms TSVECTOR NOT NULL)",
        "CREATE INDEX recall_terms_terms ON recall_terms USING GIN (terms)",
        "CREATE INDEX recall_terms_conversation ON recall_terms(conversation_id, message_id)",
        "CREATE TABLE recall_vectors ("
        " message_id BIGINT PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,"
        " conversation_id BIGINT NOT NULL, model TEXT NOT NULL, vector BYTEA NOT NULL)",
        "CREATE INDEX recall_vectors_conversation"
        " ON recall_vectors(conversation_id, model, message_id)",
    ]


@migration("010_notes")
def _notes(d: Dialect) -> list[str]:
    # What a user asked the bot to keep (/remember), per conversation.
    return [
        f"""CREATE TABLE notes (
            id {d.serial},
            conversation_id {d.bigint} NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            text TEXT NOT NULL,
            created_at TEXT NOT NULL
        )""",
        "CREATE INDEX notes_conversation ON notes(conversation_id, id)",
    ]


@migration("011_user_language")
def _user_language(d: Dialect) -> list[str]:
    # The user's /language choice (NULL: follow the platform), next to their model.
    return ["ALTER TABLE user_settings ADD COLUMN language TEXT"]


# The writes of a turn's exchange in one round trip (storage/postgres_store.py): this
# function runs the steps that need a snapshot taken after a lock they wait for (a
# plpgsql function's every statement takes a fresh one; one SQL statement's would
# predate the wait). On the lock connection it also ends the conversation's session
# lock, keeping it as a transaction lock until the exchange commits: the next turn
# waits for the commit, not just for the unlock. Returns the conversation to write
# to (0: the user was erased since the turn began) and whether the session lock was
# still held.
_SAVE_GUARD = """
CREATE OR REPLACE FUNCTION memorybot_save_guard(
    p_conv BIGINT, p_key TEXT, p_platform TEXT, p_user_id TEXT, p_place TEXT,
    p_erase_key TEXT, p_erasure_id TEXT, p_since TEXT, p_now TEXT, p_lock_key TEXT,
    OUT conv BIGINT, OUT unlocked BOOLEAN)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    unlocked := false;
    IF p_lock_key IS NOT NULL
            AND pg_try_advisory_xact_lock(hashtextextended(p_lock_key, 0)) THEN
        unlocked := pg_advisory_unlock(hashtextextended(p_lock_key, 0));
        PERFORM set_config('lock_timeout', '0', false);
    END IF;
    -- Wait for a forget in flight (and keep one from starting until commit).
    PERFORM pg_advisory_xact_lock_shared(hashtextextended(p_erase_key, 0));
    IF EXISTS (SELECT 1 FROM erasures WHERE platform = p_platform
               AND user_id = p_erasure_id AND erased_at >= p_since) THEN
        conv := 0;
        RETURN;
    END IF;
    SELECT id INTO conv FROM conversations WHERE id = p_conv;
    IF conv IS NULL THEN
        -- Erased before this turn began (by another process): anew.
        INSERT INTO conversations (key, platform, user_id, place, created_at)
            VALUES (p_key, p_platform, p_user_id, p_place, p_now)
            ON CONFLICT (key) DO NOTHING RETURNING id INTO conv;
        IF conv IS NULL THEN
            SELECT id INTO conv FROM conversations WHERE key = p_key;
        END IF;
    END IF;
END $$
"""


# What the postings triggers do with the rows a statement added or removed.
_POSTINGS_ADD = """    INSERT INTO recall_postings (conversation_id, term, message_id)
        SELECT n.conversation_id, unnest(tsvector_to_array(n.terms)), n.message_id
        FROM added n ON CONFLICT DO NOTHING;
"""
_POSTINGS_REMOVE = """    DELETE FROM recall_postings p USING removed o
        WHERE p.conversation_id = o.conversation_id
        AND p.term = ANY (tsvector_to_array(o.terms)) AND p.message_id = o.message_id;
"""


def _postings_function(name: str, body: str) -> str:
    return (f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger\nLANGUAGE plpgsql AS $$\n"
            f"BEGIN\n{body}    RETURN NULL;\nEND $$")


# PostgreSQL's words index as postings, newest first per conversation and term: a
# search reads at most a bounded number of each term's newest matches (a GIN index
# finds every match, and a long history has thousands per common word). Kept by
# triggers from recall_terms (its tsvectors stay for ranking), so every path that
# writes or deletes those rows, cascades included, keeps postings in step.
_POSTINGS = [
    # The key comes after the backfill: one sorted build, not a random insert per row
    # (minutes at a million messages). The triggers come first: they lock recall_terms
    # until commit, so no row written meanwhile is missed.
    "CREATE TABLE recall_postings (conversation_id BIGINT NOT NULL, term TEXT NOT NULL,"
    " message_id BIGINT NOT NULL)",
    _postings_function("memorybot_postings_added", _POSTINGS_ADD),
    _postings_function("memorybot_postings_removed", _POSTINGS_REMOVE),
    _postings_function("memorybot_postings_changed", _POSTINGS_REMOVE + _POSTINGS_ADD),
    "CREATE TRIGGER recall_postings_insert AFTER INSERT ON recall_terms"
    " REFERENCING NEW TABLE AS added FOR EACH STATEMENT"
    " EXECUTE FUNCTION memorybot_postings_added()",
    "CREATE TRIGGER recall_postings_delete AFTER DELETE ON recall_terms"
    " REFERENCING OLD TABLE AS removed FOR EACH STATEMENT"
    " EXECUTE FUNCTION memorybot_postings_removed()",
    "CREATE TRIGGER recall_postings_update AFTER UPDATE ON recall_terms"
    " REFERENCING OLD TABLE AS removed NEW TABLE AS added FOR EACH STATEMENT"
    " EXECUTE FUNCTION memorybot_postings_changed()",
    "INSERT INTO recall_postings (conversation_id, term, message_id)"
    " SELECT conversation_id, unnest(tsvector_to_array(terms)), message_id FROM recall_terms",
    "ALTER TABLE recall_postings ADD PRIMARY KEY (conversation_id, term, message_id)",
    # Searches no longer read it; every message paid for it on insert.
    "DROP INDEX IF EXISTS recall_terms_terms",
]


@migration("013_pg_speed")
def _pg_speed(d: Dialect) -> list[str]:
    # PostgreSQL: an exchange's writes (and the unlock) in one round trip; recall
    # by postings. SQLite needs neither (no round trips; FTS5 doclists are ordered).
    if d.is_sqlite:
        return []
    return [_SAVE_GUARD, *_POSTINGS]
