"""Settings from the environment and `.env` (the environment wins).

Every setting has a description: `python -m bot --help` prints them all, and
`.env.example` lists them with their defaults. A bad value stops start-up
with one line naming the setting, the value and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from bot.store import redact_url

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful, friendly assistant in a chat. Answer in the language the user "
    "writes in. Be concise. Use Markdown sparingly."
)
PLATFORMS = ("telegram", "discord", "console")
SECRET_FIELDS = ("OPENAI_API_KEY", "DISCORD_TOKEN", "TELEGRAM_TOKEN", "TELEGRAM_WEBHOOK_SECRET")


class SettingsError(Exception):
    """A setting has a bad value; the message is one line for the operator."""


def _csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _check_platform_ids(name: str, value: str) -> str:
    for item in _csv(value):
        platform, sep, ident = item.partition(":")
        if not sep or platform not in PLATFORMS or not ident:
            raise ValueError(
                f"{item!r} is not platform:id; allowed: comma-separated entries like "
                "telegram:123,discord:456"
            )
    return value


class Settings(BaseSettings):
    """Everything the bot reads from its environment."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=True,
        validate_default=True, env_ignore_empty=True,
    )

    LLM_PROVIDER: Literal["ollama", "openai", "local"] = Field(
        "ollama", description="ollama, openai for any OpenAI-compatible server, or local for "
                              "a GGUF model inside the bot (pip install -e '.[local]')")
    LLM_MODEL: str = Field("llama3.2", min_length=1,
                           description="the model a user gets until they pick one with /model")
    LLM_MODELS: str = Field("", description="comma-separated models users may pick; "
                                            "empty: whatever the provider lists")
    OLLAMA_HOST: str = Field("http://localhost:11434", description="the Ollama server")
    OPENAI_API_KEY: SecretStr | None = Field(None, description="API key of the OpenAI-compatible "
                                                               "server (secret)")
    OPENAI_BASE_URL: str | None = Field(None, description="base URL of the OpenAI-compatible "
                                                          "server; empty: OpenAI's")
    LOCAL_MODEL: str = Field("", description="with LLM_PROVIDER=local: the .gguf file to run; "
                                             "empty: the Gemma 3 270M the local extra installs")
    LOCAL_CONTEXT: int = Field(4096, ge=256, le=1_000_000,
                               description="with LLM_PROVIDER=local: the model's window (n_ctx)")
    LOCAL_THREADS: int | None = Field(None, ge=1, description="with LLM_PROVIDER=local: CPU "
                                      "threads generating; empty: llama.cpp's choice")
    SYSTEM_PROMPT: str = Field(DEFAULT_SYSTEM_PROMPT,
                               description="the system message of every conversation")
    CONTEXT_TOKENS: int = Field(4096, ge=256, le=2_000_000,
                                description="context window the whole prompt must fit; "
                                            "sent to Ollama as num_ctx")
    REPLY_TOKENS: int = Field(512, ge=16, description="kept free for the reply; sent as the "
                                                      "reply limit")
    DATABASE_URL: str = Field("sqlite:///data/bot.db",
                              description="sqlite:///path or postgresql://user@host/db")
    DISCORD_TOKEN: SecretStr | None = Field(None, description="starts the Discord adapter (secret)")
    DISCORD_DEV_GUILD: int | None = Field(None, description="a server id whose slash commands "
                                                            "are synced at once, for development")
    DISCORD_SHARD_COUNT: int | None = Field(None, ge=1, description="total shards; "
                                                                    "empty: discord.py decides")
    DISCORD_SHARD_IDS: str = Field("", description="comma-separated shard ids this process runs")
    DISCORD_API_BASE: str = Field("", description="Discord's REST API base, e.g. a proxy or an "
                                                  "emulator; empty: https://discord.com/api/v10")
    TELEGRAM_TOKEN: SecretStr | None = Field(None, description="starts the Telegram adapter "
                                                               "(secret)")
    TELEGRAM_BASE_URL: str | None = Field(None, description="a self-hosted Bot API server, e.g. "
                                                            "http://127.0.0.1:8081/bot")
    TELEGRAM_WEBHOOK_URL: str = Field("", description="public URL Telegram posts updates to; "
                                                      "empty: long polling")
    TELEGRAM_WEBHOOK_LISTEN: str = Field("127.0.0.1", description="webhook server address")
    TELEGRAM_WEBHOOK_PORT: int = Field(8443, ge=1, le=65535, description="webhook server port")
    TELEGRAM_WEBHOOK_SECRET: SecretStr | None = Field(
        None, description="required with a webhook; requests without it are refused (secret)")
    ALLOWED_USERS: str = Field("", description="comma-separated platform:user_id; "
                                               "empty: everyone")
    ADMIN_USERS: str = Field("", description="comma-separated platform:user_id who may see "
                                             "/stats")
    ALLOWED_PLACES: str = Field("", description="comma-separated platform:place_id (servers, "
                                                "groups); empty: everywhere")
    RATE_LIMIT_PER_MINUTE: int = Field(20, ge=0, description="messages one user may send a "
                                                            "minute; 0: no limit")
    MEMORY_SCOPE: Literal["place", "user"] = Field(
        "place", description="place: one memory per user per DM/server/group; user: one "
                             "memory per user everywhere")
    MEMORY_STRATEGY: Literal["summarize", "truncate"] = Field(
        "summarize", description="summarize: older turns folded into a running summary; "
                                 "truncate: dropped")
    SUMMARY_MODEL: str = Field("", description="the model that writes summaries; empty: the "
                                               "user's model")
    SUMMARY_TOKENS: int = Field(0, ge=0, description="cap on a summary's tokens; 0: a quarter "
                                                     "of the prompt budget")
    MAX_INPUT_CHARS: int = Field(4000, ge=1, description="longer messages are refused")
    RECALL: Literal["on", "off"] = Field(
        "on", description="on: older messages beyond the window that bear on the new message "
                          "are recalled into the prompt; off: window (and summary) only")
    RECALL_TOKENS: int = Field(0, ge=0, description="the most recalled messages may take of the "
                                                    "prompt; 0: a quarter of the prompt budget")
    EMBED_MODEL: str = Field("", description="an embedding model on the model server (e.g. "
                                             "nomic-embed-text, all-minilm); empty: recall by "
                                             "words alone, no embedding calls")
    EMBED_PROVIDER: Literal["", "ollama", "openai"] = Field(
        "", description="ollama or openai: which server computes embeddings; empty: "
                        "LLM_PROVIDER (same host settings as the chat provider)")
    EMBED_TIMEOUT: float = Field(2.0, gt=0, description="seconds the new message's embedding "
                                                        "may take on a turn; then words alone")
    LLM_CONCURRENCY: int = Field(4, ge=1, le=1000, description="model calls running at once")
    LLM_TIMEOUT: float = Field(120.0, gt=0, description="seconds a reply may take to start")
    LLM_STALL_TIMEOUT: float | None = Field(None, gt=0, description="seconds a started reply "
                                            "may go without new text; empty: LLM_TIMEOUT")
    LLM_REPLY_TIMEOUT: float = Field(300.0, gt=0, description="seconds a whole reply may take; "
                                     "then it is cut with a note and recorded error")
    SYSTEM_AS_USER: bool = Field(False, description="1: send the system text at the head of the "
                                 "first user message, for chat templates without a system role")
    LLM_RETRIES: int = Field(2, ge=0, le=10, description="retries, with backoff, of a model "
                                                         "call that failed before any text")
    STREAM_EDIT_INTERVAL: float = Field(1.0, ge=0, description="seconds between edits of a "
                                                               "streaming reply")
    SHUTDOWN_GRACE: float = Field(5.0, ge=0, description="seconds in-flight replies may finish "
                                                         "at shutdown")
    DB_POOL_SIZE: int = Field(10, ge=1, description="PostgreSQL connection pool size")
    SQLITE_SYNCHRONOUS: Literal["NORMAL", "FULL"] = Field(
        "NORMAL", description="NORMAL: a commit survives the process being killed, not a power "
                              "cut; FULL: both, each commit waiting for the disk")
    METRICS_PORT: int | None = Field(None, ge=1, le=65535,
                                     description="serves Prometheus /metrics and /healthz on "
                                                 "this port; empty: off")
    METRICS_LISTEN: str = Field("127.0.0.1", description="address the metrics and health "
                                                         "server listens on")
    AUDIT_RETENTION_DAYS: int = Field(0, ge=0, le=36_500,
                                      description="audit records older than this many days are "
                                                  "deleted at start-up and daily; 0: keep all")
    LOG_LEVEL: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="DEBUG, INFO, WARNING or ERROR")
    LOG_FORMAT: Literal["text", "json"] = Field("text", description="json: one JSON object a "
                                                                    "line")
    PERSONAS_FILE: str = Field("", description="a TOML file of personas (/persona); empty: none")
    PERSONA_DEFAULTS: str = Field("", description="comma-separated platform:place=persona, the "
                                                  "default persona of a server or group")
    LANGUAGE: Literal["auto", "en", "zh-TW", "zh-CN"] = Field(
        "auto", description="the bot's own messages: auto (the user's platform language, else "
                            "LANG), en, zh-TW or zh-CN")

    MAX_IMAGE_BYTES: int = Field(10_000_000, ge=1, description="images larger than this are "
                                 "refused with a clear reply (checked before and while "
                                 "downloading)")
    VISION_MODELS: str = Field("", description="comma-separated models of an OpenAI-compatible "
                                               "server that accept images (Ollama says so "
                                               "itself)")

    @field_validator("RECALL", mode="before")
    @classmethod
    def _on_off(cls, value: object) -> object:
        # on/off as documented; the usual boolean spellings too.
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, str):
            folded = value.strip().lower()
            return {"1": "on", "true": "on", "yes": "on", "0": "off", "false": "off",
                    "no": "off"}.get(folded, folded)
        return value

    @field_validator("ALLOWED_USERS", "ADMIN_USERS", "ALLOWED_PLACES")
    @classmethod
    def _ids(cls, value: str, info: object) -> str:
        return _check_platform_ids(getattr(info, "field_name", ""), value)

    @field_validator("DATABASE_URL")
    @classmethod
    def _db(cls, value: str) -> str:
        if not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("allowed: sqlite:///path/to/file.db or postgresql://user@host/db")
        return value

    @field_validator("PERSONAS_FILE")
    @classmethod
    def _personas(cls, value: str) -> str:
        if value:
            from bot.personas import PersonaError, load_personas

            try:
                load_personas(value)
            except PersonaError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("LANGUAGE", mode="before")
    @classmethod
    def _language(cls, value: object) -> object:
        # zh_TW, zh-tw and ZH-TW all mean zh-TW.
        if isinstance(value, str):
            folded = value.strip().replace("_", "-").lower()
            return {"zh-tw": "zh-TW", "zh-cn": "zh-CN"}.get(folded, folded)
        return value

    @field_validator("LOG_LEVEL", "LOG_FORMAT", "MEMORY_SCOPE", "MEMORY_STRATEGY",
                     "LLM_PROVIDER", "SQLITE_SYNCHRONOUS", "EMBED_PROVIDER", mode="before")
    @classmethod
    def _fold_case(cls, value: object) -> object:
        return value.strip() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _budget(self) -> Settings:
        if self.LLM_PROVIDER == "local" and "LLM_MODEL" not in self.model_fields_set:
            # One model in the bot: call it by its file, not by Ollama's default name.
            self.LLM_MODEL = Path(self.LOCAL_MODEL).stem if self.LOCAL_MODEL \
                else "gemma-3-270m"
        if self.LLM_STALL_TIMEOUT is None:
            # An operator who tightens LLM_TIMEOUT expects a stall cut as fast.
            self.LLM_STALL_TIMEOUT = self.LLM_TIMEOUT
        if self.REPLY_TOKENS >= self.CONTEXT_TOKENS:
            raise ValueError(
                f"REPLY_TOKENS={self.REPLY_TOKENS} must be less than "
                f"CONTEXT_TOKENS={self.CONTEXT_TOKENS}")
        if self.DATABASE_URL.startswith("postgres") and \
                self.DB_POOL_SIZE < self.LLM_CONCURRENCY + 2:
            # Each turn in flight holds a connection for its conversation lock.
            raise ValueError(
                f"DB_POOL_SIZE={self.DB_POOL_SIZE} must be at least LLM_CONCURRENCY + 2 "
                f"({self.LLM_CONCURRENCY + 2}) with PostgreSQL")
        if self.PERSONA_DEFAULTS:
            from bot.personas import PersonaError, load_personas, parse_persona_defaults

            if not self.PERSONAS_FILE:
                raise ValueError("PERSONA_DEFAULTS needs PERSONAS_FILE")
            try:
                parse_persona_defaults(self.PERSONA_DEFAULTS, load_personas(self.PERSONAS_FILE))
            except PersonaError as exc:
                raise ValueError(str(exc)) from None
        return self

    # Parsed forms of the comma-separated settings.
    @property
    def models(self) -> tuple[str, ...]:
        return _csv(self.LLM_MODELS)

    @property
    def vision_models(self) -> tuple[str, ...]:
        return _csv(self.VISION_MODELS)

    @property
    def allowed_users(self) -> frozenset[str]:
        return frozenset(_csv(self.ALLOWED_USERS))

    @property
    def admin_users(self) -> frozenset[str]:
        return frozenset(_csv(self.ADMIN_USERS))

    @property
    def allowed_places(self) -> frozenset[str]:
        return frozenset(_csv(self.ALLOWED_PLACES))

    @property
    def stall_timeout(self) -> float:
        return self.LLM_TIMEOUT if self.LLM_STALL_TIMEOUT is None else self.LLM_STALL_TIMEOUT

    @property
    def prompt_budget(self) -> int:
        """Tokens the whole prompt may take."""
        return self.CONTEXT_TOKENS - self.REPLY_TOKENS

    @property
    def summary_cap(self) -> int:
        return self.SUMMARY_TOKENS or max(64, self.prompt_budget // 4)

    @property
    def recall_on(self) -> bool:
        return self.RECALL == "on"

    @property
    def recall_tokens(self) -> int:
        """What recalled messages may take of the prompt (RECALL_TOKENS, else a quarter)."""
        return min(self.RECALL_TOKENS or self.prompt_budget // 4, self.prompt_budget)

    @property
    def embed_provider(self) -> str:
        return self.EMBED_PROVIDER or self.LLM_PROVIDER

    def secrets(self) -> list[str]:
        """The secret values, so that output can be checked for them."""
        out = []
        for name in SECRET_FIELDS:
            value = getattr(self, name)
            if value is not None and value.get_secret_value():
                out.append(value.get_secret_value())
        return out


def load_settings(env_file: str | Path | None = ".env", **overrides: object) -> Settings:
    """Read the settings, or raise SettingsError with one line for the operator."""
    try:
        return Settings(_env_file=env_file, **overrides)  # type: ignore[call-arg]
    except ValidationError as exc:
        raise SettingsError(_one_line(exc)) from None


def _one_line(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    loc = err.get("loc") or ()
    name = str(loc[0]) if loc else ""
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    value = err.get("input")
    if not name:  # a rule across settings: the message names them itself
        return f"bad setting: {msg}"
    if name in SECRET_FIELDS:
        shown = "<hidden>"
    elif name == "DATABASE_URL" and isinstance(value, str):
        shown = repr(redact_url(value))  # its password, if any, is a secret too
    else:
        shown = repr(value)
    return f"bad setting {name}={shown}: {msg}"


def describe_settings() -> list[tuple[str, str, str]]:
    """(name, default, meaning) for every setting, for --help and .env.example."""
    rows = []
    for name, field in Settings.model_fields.items():
        default = field.default
        if default is None:
            shown = ""
        elif isinstance(default, str) and "\n" in default:
            shown = repr(default)
        else:
            shown = str(default)
        rows.append((name, shown, field.description or ""))
    return rows
