"""Personas: named system prompts and Ollama Modelfile parameters from PERSONAS_FILE.

A persona is a TOML table (or an Ollama Modelfile it names) with a system
prompt, an optional model, and sampling parameters under their Modelfile
names. This module loads and validates the file (one-line errors naming the
file, the persona and the field), maps a persona's parameters onto each
provider's request, parses PERSONA_DEFAULTS, and holds the current personas
in a PersonaBook that can reload from disk (SIGHUP) without losing the old
ones on a bad edit.
"""

from __future__ import annotations

import asyncio
import logging
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

log = logging.getLogger(__name__)

# Ollama's runtime parameters by their Modelfile names, with the type a
# Modelfile value is read as. From Ollama's Modelfile reference ("Valid
# Parameters and Values") plus the options its API also takes.
PARAMETER_TYPES: dict[str, type] = {
    "num_ctx": int,
    "repeat_last_n": int,
    "repeat_penalty": float,
    "temperature": float,
    "seed": int,
    "stop": str,  # repeatable: each PARAMETER stop adds one
    "num_predict": int,
    "draft_num_predict": int,
    "top_k": int,
    "top_p": float,
    "min_p": float,
    "typical_p": float,
    "presence_penalty": float,
    "frequency_penalty": float,
    "num_keep": int,
}
# Ollama itself warns about and ignores these; a Modelfile with them still works.
DEPRECATED_PARAMETERS = frozenset({
    "penalize_newline", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mlock",
    "mirostat", "mirostat_tau", "mirostat_eta", "tfs_z",
})
# Modelfile instructions that shape a model built with `ollama create`, not a
# request: a persona has nothing to do with them.
IGNORED_INSTRUCTIONS = frozenset({
    "template", "adapter", "license", "draft", "renderer", "parser", "requires",
})
RESERVED_NAMES = frozenset({"off", "default"})  # words /persona itself uses
NAME_RE = re.compile(r"^[\w-]{1,32}$")
ROLES = frozenset({"system", "user", "assistant"})


class PersonaError(Exception):
    """PERSONAS_FILE or PERSONA_DEFAULTS is bad; the message is one line for the operator."""


class _Fields(BaseModel):
    """What a persona table may hold; anything else is refused."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    description: str = ""
    system: str | None = Field(None, min_length=1)
    model: str | None = Field(None, min_length=1)
    modelfile: str | None = Field(None, min_length=1)
    num_ctx: int | None = Field(None, ge=1)
    repeat_last_n: int | None = Field(None, ge=-1)
    repeat_penalty: float | None = Field(None, gt=0)
    temperature: float | None = Field(None, ge=0)
    seed: int | None = None
    stop: tuple[str, ...] | None = None
    num_predict: int | None = Field(None, ge=-2)
    draft_num_predict: int | None = Field(None, ge=0)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0, le=1)
    min_p: float | None = Field(None, ge=0, le=1)
    typical_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    num_keep: int | None = Field(None, ge=-1)

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, value: object) -> object:
        # `stop = "User:"` reads as naturally as a list of one.
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list):
            return tuple(value)
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and any(not s for s in value):
            raise ValueError("a stop sequence may not be empty")
        return value

    @field_validator("num_predict")
    @classmethod
    def _predict(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("must be at least 1, or -1 (no limit) / -2 (fill the window)")
        return value


@dataclass(frozen=True, slots=True)
class Persona:
    """One persona, validated; parameters hold only what was set."""

    name: str
    description: str
    system: str
    model: str | None
    parameters: Mapping[str, Any]  # Modelfile name → value (stop: a tuple)
    messages: tuple[tuple[str, str], ...] = ()  # Modelfile MESSAGE examples (role, text)

    @property
    def num_predict(self) -> int | None:
        return self.parameters.get("num_predict")

    def reply_tokens(self, default: int, available: int) -> int:
        """The reply limit: num_predict (else `default`), never beyond `available`."""
        return reply_tokens(self.num_predict, default, available)

    def example_messages(self) -> list[dict[str, str]]:
        """The Modelfile's MESSAGE lines as chat messages, to go after the system prompt."""
        return [{"role": role, "content": text} for role, text in self.messages]


def reply_tokens(num_predict: int | None, default: int, available: int) -> int:
    """Tokens the reply may take: the asked-for limit within what the window leaves.

    `num_predict` -1 (no limit) and -2 (fill the context) mean all that is
    available; `available` is the window minus the prompt. Always at least 1.
    """
    wanted = default if num_predict is None else num_predict
    if wanted < 0:
        wanted = available
    return max(1, min(wanted, available))


# ---------------------------------------------------------------- provider mapping

# Ollama takes every parameter under its own name in `options`.
OPENAI_FIELDS = ("temperature", "top_p", "seed", "stop", "presence_penalty",
                 "frequency_penalty")
# Not sent to OpenAI-compatible servers: OpenAI has no such field and refuses
# unknown ones. repeat_penalty is NOT mapped to frequency_penalty: it divides
# the logit of any token seen in the last repeat_last_n tokens (multiplicative,
# presence-based, windowed), while frequency_penalty subtracts a constant times
# the count over the whole text (additive, count-based, range -2..2); no
# rescaling turns one into the other, so a "mapped" value would change the
# output in ways the persona's author never asked for.
OPENAI_UNSUPPORTED = ("repeat_penalty", "repeat_last_n", "top_k", "min_p", "typical_p",
                      "num_ctx", "num_keep", "draft_num_predict")


def ollama_options(persona: Persona | None, *, num_ctx: int, num_predict: int) -> dict[str, Any]:
    """The `options` of an Ollama /api/chat request.

    `num_ctx` and `num_predict` are the caller's (already within the model's
    window); a persona's own num_ctx may only lower num_ctx.
    """
    options: dict[str, Any] = {}
    if persona is not None:
        options.update({k: list(v) if k == "stop" else v
                        for k, v in persona.parameters.items()})
        if persona.parameters.get("num_ctx"):
            num_ctx = min(num_ctx, persona.parameters["num_ctx"])
    options["num_ctx"] = num_ctx
    options["num_predict"] = num_predict
    return options


def openai_fields(persona: Persona | None, *, max_tokens: int,
                  token_field: Literal["max_tokens", "max_completion_tokens"] = "max_tokens",
                  ) -> dict[str, Any]:
    """Keyword arguments for `chat.completions.create` on an OpenAI-compatible server.

    `max_tokens` is what vLLM, llama.cpp server, LM Studio and LiteLLM read;
    OpenAI's own reasoning models want `max_completion_tokens` instead.
    """
    fields: dict[str, Any] = {}
    if persona is not None:
        for name in OPENAI_FIELDS:
            value = persona.parameters.get(name)
            if value is not None:
                fields[name] = list(value) if name == "stop" else value
    fields[token_field] = max_tokens
    return fields


# ---------------------------------------------------------------- Modelfile


@dataclass(frozen=True, slots=True)
class Modelfile:
    """What a persona takes from an Ollama Modelfile."""

    model: str | None
    system: str | None
    parameters: dict[str, Any]
    messages: tuple[tuple[str, str], ...]


class ModelfileError(ValueError):
    """A Modelfile line the bot can't read; the message names the line."""


_INSTRUCTION = re.compile(r"\s*([A-Za-z]+)(?:[ \t]+|$)")
_COMMENT_TAIL = re.compile(r"\s+#.*$")


def _value(text: str, pos: int, line: int) -> tuple[str, bool, int]:
    """The argument starting at `pos`: (value, was quoted, position of its line's end).

    As in Ollama's parser, a value is the rest of the line, unless it opens a
    quote (three double quotes, or one): then it runs to the first line end where it also
    closes, so `"He said "hi""` keeps its inner quotes and a quoted value may
    span lines.
    """
    for quote in ('"""', '"'):
        if not text.startswith(quote, pos):
            continue
        cut = pos
        while True:
            cut = text.find("\n", cut + 1)
            cut = len(text) if cut < 0 else cut
            chunk = text[pos:cut].strip()
            for candidate in (chunk, _COMMENT_TAIL.sub("", chunk)):
                if len(candidate) >= 2 * len(quote) and candidate.endswith(quote):
                    return candidate[len(quote):-len(quote)], True, cut
            if cut >= len(text):
                raise ModelfileError(f"line {line}: {quote} is never closed")
    end = text.find("\n", pos)
    end = len(text) if end < 0 else end
    return text[pos:end].strip(), False, end


def _typed(name: str, raw: str, line: int) -> Any:
    kind = PARAMETER_TYPES[name]
    if kind is str:
        return raw
    try:
        return kind(raw)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise ModelfileError(f"line {line}: PARAMETER {name} {raw!r} is not {what}") from None


def parse_modelfile(text: str, source: str = "Modelfile") -> Modelfile:
    """Read FROM, SYSTEM, PARAMETER and MESSAGE from an Ollama Modelfile.

    Instructions are case-insensitive and the last FROM / SYSTEM wins, as in
    Ollama. Two leniencies beyond Ollama, so that Modelfiles written from
    common tutorials work: a `# comment` after an unquoted PARAMETER value is
    dropped, and a MESSAGE without a valid role is skipped (logged), not fatal.
    """
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    model: str | None = None
    system: str | None = None
    params: dict[str, Any] = {}
    messages: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        line_no = text.count("\n", 0, pos) + 1
        end = text.find("\n", pos)
        end = len(text) if end < 0 else end
        stripped = text[pos:end].strip()
        if not stripped or stripped.startswith("#"):
            pos = end + 1
            continue
        match = _INSTRUCTION.match(text, pos, end)
        if match is None:
            raise ModelfileError(f"line {line_no}: not an instruction: {stripped[:40]!r}")
        word = match.group(1).lower()
        pos = match.end()
        if word == "parameter":
            pname, _, _ = text[pos:end].partition(" ")
            pname = pname.split("\t", 1)[0].strip()
            pos += len(pname)
            while pos < end and text[pos] in " \t":
                pos += 1
            raw, quoted, pos = _value(text, pos, line_no)
            if not quoted:
                raw = _COMMENT_TAIL.sub("", raw)
            if not pname or not raw:
                raise ModelfileError(f"line {line_no}: PARAMETER needs a name and a value")
            if pname in DEPRECATED_PARAMETERS:
                log.warning("%s line %d: parameter %s is deprecated; ignored",
                            source, line_no, pname)
            elif pname not in PARAMETER_TYPES:
                raise ModelfileError(f"line {line_no}: unknown PARAMETER {pname!r}; known: "
                                     + ", ".join(PARAMETER_TYPES))
            elif pname == "stop":
                params.setdefault("stop", []).append(raw)
            else:
                params[pname] = _typed(pname, raw, line_no)
        elif word == "message":
            role, _, _ = text[pos:end].partition(" ")
            if role.lower() in ROLES:
                pos += len(role)
                while pos < end and text[pos] in " \t":
                    pos += 1
                content, _, pos = _value(text, pos, line_no)
                messages.append((role.lower(), content))
            else:
                log.warning("%s line %d: MESSAGE without a role (system, user or "
                            "assistant); skipped", source, line_no)
                _, _, pos = _value(text, pos, line_no)
        elif word in ("from", "system") or word in IGNORED_INSTRUCTIONS:
            value, quoted, pos = _value(text, pos, line_no)
            if word == "from":
                model = _COMMENT_TAIL.sub("", value) if not quoted else value
            elif word == "system":
                system = value.strip()
        else:
            raise ModelfileError(f"line {line_no}: unknown instruction {match.group(1)!r}")
        pos += 1
    return Modelfile(model=model or None, system=system or None, parameters=params,
                     messages=tuple(messages))


def _looks_like_path(model: str) -> bool:
    # FROM may name a GGUF file or a Safetensors directory: not a model to ask for.
    return model.startswith((".", "/", "~", "\\")) or model.lower().endswith(
        (".gguf", ".bin", ".safetensors"))


# ---------------------------------------------------------------- the TOML file


@dataclass(frozen=True, slots=True)
class Personas:
    """The personas of one file, by lower-cased name, in the file's order."""

    source: str
    by_name: Mapping[str, Persona]

    def get(self, name: str) -> Persona | None:
        return self.by_name.get(name.strip().lower())

    def __iter__(self) -> Iterator[Persona]:
        return iter(self.by_name.values())

    def __len__(self) -> int:
        return len(self.by_name)

    def names(self) -> list[str]:
        return [p.name for p in self.by_name.values()]


EMPTY = Personas(source="", by_name=MappingProxyType({}))


def _field_error(where: str, name: str, exc: ValidationError, source: str = "") -> PersonaError:
    err = exc.errors(include_url=False)[0]
    loc = [str(p) for p in err.get("loc", ()) if not isinstance(p, int)]
    field = loc[0] if loc else "?"
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        msg = "unknown field; allowed: " + ", ".join(_Fields.model_fields)
    elif err.get("type") == "missing":
        msg = "missing"
    else:
        msg = f"{err.get('input')!r}: {msg}"
    return PersonaError(f"{where}: persona {name!r}: field {field!r}{source}: {msg}")


def _persona(where: str, base: Path, name: str, table: object) -> Persona:
    if not isinstance(table, dict):
        raise PersonaError(f"{where}: {name!r} is not a persona table; write [{name}] "
                           "with description, system, ...")
    if not NAME_RE.match(name) or name.lower() in RESERVED_NAMES:
        raise PersonaError(f"{where}: persona {name!r}: the name must be 1-32 letters, "
                           "digits, - or _, and not 'off' or 'default'")
    try:
        fields = _Fields.model_validate(table)
    except ValidationError as exc:
        raise _field_error(where, name, exc) from None
    values = fields.model_dump(exclude_none=True)
    from_file = Modelfile(None, None, {}, ())
    if fields.modelfile:
        path = (base / Path(fields.modelfile).expanduser())
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = "no such file" if isinstance(exc, FileNotFoundError) else str(exc)
            raise PersonaError(f"{where}: persona {name!r}: field 'modelfile': "
                               f"{fields.modelfile}: {reason}") from None
        try:
            from_file = parse_modelfile(text, str(path))
        except ModelfileError as exc:
            raise PersonaError(f"{where}: persona {name!r}: field 'modelfile': "
                               f"{fields.modelfile} {exc}") from None
        # The Modelfile's values pass the same checks as the TOML's.
        try:
            _Fields.model_validate(from_file.parameters)
        except ValidationError as exc:
            raise _field_error(where, name, exc, f" (from {fields.modelfile})") from None
    # TOML keys override the Modelfile.
    params = {k: tuple(v) if k == "stop" else v for k, v in from_file.parameters.items()}
    params.update({k: v for k, v in values.items() if k in PARAMETER_TYPES})
    system = fields.system or from_file.system
    if not system:
        raise PersonaError(f"{where}: persona {name!r}: field 'system': missing (set system, "
                           "or a modelfile with SYSTEM)")
    model = fields.model or from_file.model
    if model and not fields.model and _looks_like_path(model):
        raise PersonaError(f"{where}: persona {name!r}: field 'modelfile': the FROM of "
                           f"{fields.modelfile} is a file ({model}); set model = \"...\" to "
                           "the model's name on the server")
    return Persona(name=name, description=fields.description.strip(), system=system.strip(),
                   model=model, parameters=MappingProxyType(params),
                   messages=from_file.messages)


def load_personas(path: str | Path) -> Personas:
    """Read and validate PERSONAS_FILE; PersonaError (one line) if anything is wrong."""
    path = Path(path).expanduser()
    where = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PersonaError(f"{where}: no such file") from None
    except OSError as exc:
        raise PersonaError(f"{where}: cannot read: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise PersonaError(f"{where}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise PersonaError(f"{where}: not valid TOML: {exc}") from None
    if not data:
        raise PersonaError(f"{where}: no personas in the file")
    by_name: dict[str, Persona] = {}
    for name, table in data.items():
        persona = _persona(where, path.parent, name, table)
        key = name.lower()
        if key in by_name:
            raise PersonaError(f"{where}: persona {name!r}: the same name as "
                               f"{by_name[key].name!r} (names are compared ignoring case)")
        by_name[key] = persona
    return Personas(source=where, by_name=MappingProxyType(by_name))


# ---------------------------------------------------------------- defaults per place

DEFAULT_PLATFORMS = ("discord", "telegram")


def parse_persona_defaults(value: str, personas: Personas | None = None
                           ) -> dict[tuple[str, str], str]:
    """PERSONA_DEFAULTS → {(platform, place id): persona name}.

    Checked against `personas` when given, so that a default naming a persona
    the file lacks stops start-up.
    """
    out: dict[tuple[str, str], str] = {}
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        place, sep, name = item.partition("=")
        platform, colon, ident = place.strip().partition(":")
        name, ident = name.strip(), ident.strip()
        if not sep or not colon or platform not in DEFAULT_PLATFORMS or not ident or not name:
            raise PersonaError(f"PERSONA_DEFAULTS: {item!r} is not platform:place=persona; "
                               "allowed: entries like discord:123=teacher,telegram:-100456=coach")
        if (platform, ident) in out:
            raise PersonaError(f"PERSONA_DEFAULTS: {platform}:{ident} is given twice")
        if personas is not None:
            persona = personas.get(name)
            if persona is None:
                known = ", ".join(personas.names()) or "none"
                raise PersonaError(f"PERSONA_DEFAULTS: {item!r}: no persona {name!r} in "
                                   f"{personas.source or 'PERSONAS_FILE'} (personas: {known})")
            name = persona.name
        out[(platform, ident)] = name
    return out


# ---------------------------------------------------------------- the holder


class PersonaBook:
    """The current personas; `reload` swaps in a fresh read of the file, or keeps the old.

    Readers take `book.current` once per turn: a reload replaces the whole
    snapshot, so a turn never sees half of an old file and half of a new one.
    """

    def __init__(self, path: str | Path | None, defaults: str = "") -> None:
        self.path = Path(path).expanduser() if path else None
        self._defaults_text = defaults
        self.current: Personas = load_personas(self.path) if self.path else EMPTY
        self.defaults = parse_persona_defaults(defaults, self.current if self.path else None)

    def get(self, name: str) -> Persona | None:
        return self.current.get(name)

    def default_for(self, platform: str, place_id: str | None) -> Persona | None:
        """The operator's default persona for a server or group (PERSONA_DEFAULTS)."""
        if place_id is None:
            return None
        name = self.defaults.get((platform, place_id))
        return self.current.get(name) if name else None

    def _read(self) -> tuple[Personas, dict[tuple[str, str], str]]:
        assert self.path is not None
        fresh = load_personas(self.path)
        return fresh, parse_persona_defaults(self._defaults_text, fresh)

    def _apply(self, read: tuple[Personas, dict[tuple[str, str], str]] | PersonaError) -> bool:
        if isinstance(read, PersonaError):
            log.error("personas not reloaded, keeping the %d loaded: %s",
                      len(self.current), read)
            return False
        self.current, self.defaults = read
        log.info("personas reloaded from %s: %s", self.path, ", ".join(read[0].names()))
        return True

    def reload(self) -> bool:
        """Re-read the file; on any error keep the old personas, log one line, return False."""
        if self.path is None:
            return False
        try:
            return self._apply(self._read())
        except PersonaError as exc:
            return self._apply(exc)

    async def reload_async(self) -> bool:
        """`reload` with the file read off the event loop; the swap happens on it."""
        if self.path is None:
            return False
        try:
            read = await asyncio.to_thread(self._read)
        except PersonaError as exc:
            return self._apply(exc)
        return self._apply(read)
