"""The bot's own words in each user's language: gettext catalogues and choosing the language.

Catalogues are gettext `.po` files under bot/locales/<lang>/LC_MESSAGES/bot.po,
compiled to `.mo` when the package is built or installed (setup.py); a
checkout that was never built compiles them in memory with Babel at load
time. There is no global "current language": a turn asks
`catalogs.for_language(code)` for a Translator and uses its `gettext` and
`ngettext`, whose messages take named `{placeholders}`.
"""

from __future__ import annotations

import gettext as _gettext
import io
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

log = logging.getLogger(__name__)

DOMAIN = "bot"
LOCALES_DIR = Path(__file__).with_name("locales")
LANGUAGES = ("en", "zh-TW", "zh-CN")  # what /language and LANGUAGE accept
DEFAULT_LANGUAGE = "en"
# Each language named in itself, for /language.
LANGUAGE_NAMES = MappingProxyType({"en": "English", "zh-TW": "繁體中文", "zh-CN": "简体中文"})


def N_(msgid: str) -> str:
    """Marks a message for extraction where it is defined; translate it where it is shown."""
    return msgid


def _dir_name(code: str) -> str:
    return code.replace("-", "_")  # gettext's directory names: zh_TW


def normalize(code: str | None) -> str | None:
    """One of LANGUAGES for a spelling of it (zh_tw, ZH-TW, en-US → en), else None."""
    if not code:
        return None
    folded = code.strip().replace("_", "-").lower()
    for lang in LANGUAGES:
        if folded == lang.lower():
            return lang
    if folded.split("-", 1)[0] == "en":
        return "en"
    return None


# ---------------------------------------------------------------- choosing the language

_TRADITIONAL = frozenset({"hant", "tw", "hk", "mo"})


def from_language_tag(language_code: str | None) -> str | None:
    """An IETF language tag (Telegram's `from.language_code`, the tag of a LANG value)
    → a language; None if there is none.

    zh-hant, zh-TW, zh-HK (and zh-MO) → zh-TW; zh-hans, zh-CN, zh (and any
    other Chinese) → zh-CN; anything else → en.
    """
    if not language_code or not language_code.strip():
        return None
    parts = language_code.strip().replace("_", "-").lower().split("-")
    if parts[0] != "zh":
        return "en"
    return "zh-TW" if _TRADITIONAL & set(parts[1:]) else "zh-CN"


def from_lang_env(lang: str | None) -> str | None:
    """The console's LANG (zh_TW.UTF-8, zh_CN.UTF-8, en_US.UTF-8) → a language; None if unset."""
    if not lang:
        return None
    tag = lang.split(".", 1)[0].split("@", 1)[0]
    if tag in ("C", "POSIX", ""):
        return None
    return from_language_tag(tag)


def choose_language(*, chosen: str | None = None, setting: str = "auto",
                    platform: str | None = None, lang_env: str | None = None) -> str:
    """The language of one user's messages.

    The user's /language choice; else the LANGUAGE setting when it names a
    language; else (auto) the platform's signal for the user (already mapped
    by its adapter, e.g. with from_language_tag); else the console's LANG; else en.
    """
    for candidate in (chosen, None if setting == "auto" else setting, platform,
                      from_lang_env(lang_env)):
        found = normalize(candidate)
        if found:
            return found
    return DEFAULT_LANGUAGE


def parse_language(text: str) -> str | None:
    """What a user typed after /language → a language, "auto", or None if unknown."""
    folded = text.strip().lower().replace("_", "-")
    if folded in ("auto", "automatic", "自動", "自动"):
        return "auto"
    aliases = {
        "zh-hant": "zh-TW", "繁體": "zh-TW", "繁體中文": "zh-TW", "繁中": "zh-TW",
        "正體中文": "zh-TW", "tw": "zh-TW", "zh-hk": "zh-TW",
        "zh-hans": "zh-CN", "简体": "zh-CN", "简体中文": "zh-CN", "簡體中文": "zh-CN",
        "简中": "zh-CN", "cn": "zh-CN", "zh": "zh-CN",
        "english": "en", "英文": "en", "英语": "en", "英語": "en",
    }
    return aliases.get(folded) or normalize(folded)


# ---------------------------------------------------------------- catalogues


@dataclass(frozen=True, slots=True)
class Translator:
    """One language's messages. Formatting is str.format with named placeholders."""

    language: str
    translations: _gettext.NullTranslations

    def gettext(self, msgid: str, /, **params: Any) -> str:
        return self._format(self.translations.gettext(msgid), msgid, params)

    def ngettext(self, singular: str, plural: str, n: int, /, **params: Any) -> str:
        english = singular if n == 1 else plural
        return self._format(self.translations.ngettext(singular, plural, n), english, params)

    def _format(self, text: str, english: str, params: Mapping[str, Any]) -> str:
        try:
            return text.format(**params)
        except (KeyError, IndexError, ValueError):
            # A broken translation must not break the reply: say it in English.
            log.warning("translation %s of %r has bad placeholders", self.language, english)
            return english.format(**params)


def _read_catalog(po: Path, mo: Path, code: str) -> _gettext.NullTranslations:
    if mo.is_file() and (not po.is_file() or mo.stat().st_mtime >= po.stat().st_mtime):
        with mo.open("rb") as fh:
            return _gettext.GNUTranslations(fh)
    if not po.is_file():
        return _gettext.NullTranslations()
    # Not built (a plain checkout, or a .po edited since): compile in memory.
    from babel.messages.mofile import write_mo
    from babel.messages.pofile import read_po

    with po.open("rb") as fh:
        catalog = read_po(fh, locale=_dir_name(code), domain=DOMAIN)
    buf = io.BytesIO()
    write_mo(buf, catalog)
    buf.seek(0)
    log.debug("compiled %s from %s at load time", code, po)
    return _gettext.GNUTranslations(buf)


class Catalogs:
    """Every shipped language's catalogue, read once; `for_language` never touches the disk."""

    def __init__(self, translators: Mapping[str, Translator]) -> None:
        self._translators = dict(translators)
        if DEFAULT_LANGUAGE not in self._translators:
            self._translators[DEFAULT_LANGUAGE] = Translator(
                DEFAULT_LANGUAGE, _gettext.NullTranslations())

    @classmethod
    def load(cls, directory: Path = LOCALES_DIR,
             languages: Iterable[str] = LANGUAGES) -> Catalogs:
        translators = {}
        for code in languages:
            folder = directory / _dir_name(code) / "LC_MESSAGES"
            translators[code] = Translator(
                code, _read_catalog(folder / f"{DOMAIN}.po", folder / f"{DOMAIN}.mo", code))
        return cls(translators)

    @property
    def languages(self) -> tuple[str, ...]:
        return tuple(self._translators)

    def in_every_language(self, msgid: str, /, **params: Any) -> dict[str, str]:
        """One message in every language, by language code (for platform menus)."""
        return {code: tr.gettext(msgid, **params) for code, tr in self._translators.items()}

    def for_language(self, code: str | None) -> Translator:
        """The translator for `code` (any spelling normalize accepts); English otherwise."""
        return self._translators.get(normalize(code) or DEFAULT_LANGUAGE,
                                     self._translators[DEFAULT_LANGUAGE])
