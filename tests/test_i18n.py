"""The catalogues: every message in code has an entry, placeholders agree, scripts stay apart."""

from __future__ import annotations

import gettext
import io
import logging
import os
import shutil
import string
from pathlib import Path

import pytest
from babel.messages.catalog import Catalog
from babel.messages.extract import extract_from_dir
from babel.messages.frontend import parse_mapping_cfg
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.discord.inbound import from_discord
from bot.i18n import (
    LANGUAGES,
    LOCALES_DIR,
    Catalogs,
    Translator,
    choose_language,
    from_lang_env,
    normalize,
    parse_language,
)
from bot.i18n import from_language_tag as from_telegram  # what the Telegram adapter calls
from bot.settings import SettingsError, load_settings

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "i18n"
Key = str  # a msgid (the singular one for plural messages)


def catalogue(code: str) -> Catalog:
    with (LOCALES_DIR / code.replace("-", "_") / "LC_MESSAGES" / "bot.po").open("rb") as fh:
        return read_po(fh, locale=code.replace("-", "_"))


CATALOGUES = {code: catalogue(code) for code in LANGUAGES}


def extracted(root: Path, cfg: Path) -> dict[Key, tuple[str, int, tuple[str, ...]]]:
    """Babel's extraction with babel.cfg: msgid → (file, line, all its msgids)."""
    with cfg.open(encoding="utf-8") as fh:
        method_map, options_map = parse_mapping_cfg(fh)
    found: dict[Key, tuple[str, int, tuple[str, ...]]] = {}
    for filename, line, message, _comments, _context in extract_from_dir(
            str(root), method_map, options_map):
        ids = (message,) if isinstance(message, str) else tuple(m for m in message if m)
        found[ids[0]] = (filename, line, ids)
    return found


def missing_from_catalogues(found: dict[Key, tuple[str, int, tuple[str, ...]]]) -> list[str]:
    problems = []
    for key, (filename, line, ids) in sorted(found.items()):
        for code, cat in CATALOGUES.items():
            entry = cat.get(key)
            if entry is None:
                problems.append(f"{filename}:{line}: {key!r} has no entry in {code}")
                continue
            if len(ids) > 1 and (not entry.pluralizable or entry.id[1] != ids[1]):
                problems.append(f"{filename}:{line}: {key!r}: plural differs in {code}")
            if code != "en" and not _translated(entry.string):
                problems.append(f"{filename}:{line}: {key!r} is not translated in {code}")
    return problems


def _translated(msgstr: str | tuple[str, ...] | list[str]) -> bool:
    strings = [msgstr] if isinstance(msgstr, str) else list(msgstr)
    return bool(strings) and all(s.strip() for s in strings)


def test_every_message_in_the_code_has_an_entry_in_every_catalogue() -> None:
    found = extracted(ROOT, ROOT / "babel.cfg")
    assert missing_from_catalogues(found) == []


def test_the_check_catches_a_message_without_an_entry(tmp_path: Path) -> None:
    """The extraction above really sees calls like tr.gettext(...), ngettext and N_."""
    (tmp_path / "bot").mkdir()
    shutil.copy(FIXTURES / "sample_code.py", tmp_path / "bot" / "sample_code.py")
    found = extracted(tmp_path, ROOT / "babel.cfg")
    assert set(found) == {
        "Sorry, this bot is private.",
        "You're sending messages too fast. Please try again in {seconds} second.",
        "The model server is busy. Please try again in a moment.",
        "A message nobody translated.",
    }
    problems = missing_from_catalogues(found)
    assert len(problems) == len(LANGUAGES)
    assert all("'A message nobody translated.' has no entry in" in p for p in problems)
    assert problems[0].startswith(str(Path("bot") / "sample_code.py") + ":")


def test_the_catalogues_hold_the_same_messages() -> None:
    ids = {code: {m.id if isinstance(m.id, str) else m.id[0] for m in cat if m.id}
           for code, cat in CATALOGUES.items()}
    assert ids["zh-TW"] == ids["en"] == ids["zh-CN"]
    assert len(ids["en"]) >= 100


def test_every_chinese_entry_is_translated_and_not_fuzzy() -> None:
    for code in ("zh-TW", "zh-CN"):
        for message in CATALOGUES[code]:
            if not message.id:
                continue
            assert _translated(message.string), (code, message.id)
            assert not message.fuzzy, (code, message.id)


def _fields(text: str) -> list[tuple[str, str]]:
    return sorted((name, spec or "") for _, name, spec, _ in string.Formatter().parse(text)
                  if name is not None)


def test_placeholders_match_across_languages() -> None:
    for message in CATALOGUES["en"]:
        if not message.id:
            continue
        ids = [message.id] if isinstance(message.id, str) else list(message.id)
        expected = _fields(ids[0])
        assert all(_fields(i) == expected for i in ids), ids
        assert all(name.isidentifier() for name, _ in expected), ids  # named, not {0} or {}
        for code in ("zh-TW", "zh-CN"):
            entry = CATALOGUES[code].get(ids[0])
            strings = [entry.string] if isinstance(entry.string, str) else list(entry.string)
            for translated in strings:
                assert _fields(translated) == expected, (code, ids[0], translated)


# Characters that differ between the scripts, as (Traditional, Simplified) pairs.
SCRIPT_PAIRS = [
    ("設", "设"), ("訊", "讯"), ("記", "记"), ("憶", "忆"), ("這", "这"), ("個", "个"),
    ("們", "们"), ("說", "说"), ("請", "请"), ("會", "会"), ("對", "对"), ("話", "话"),
    ("時", "时"), ("為", "为"), ("選", "选"), ("擇", "择"), ("換", "换"), ("圖", "图"),
    ("語", "语"), ("錯", "错"), ("誤", "误"), ("問", "问"), ("題", "题"), ("開", "开"),
    ("關", "关"), ("發", "发"), ("點", "点"), ("讀", "读"), ("寫", "写"), ("長", "长"),
    ("過", "过"), ("機", "机"), ("數", "数"), ("條", "条"), ("則", "则"), ("應", "应"),
    ("還", "还"), ("沒", "没"), ("從", "从"), ("裡", "里"), ("後", "后"), ("內", "内"),
    ("處", "处"), ("務", "务"), ("單", "单"), ("統", "统"), ("計", "计"), ("預", "预"),
    ("復", "复"), ("據", "据"), ("傳", "传"), ("連", "连"), ("筆", "笔"), ("見", "见"),
]


def _texts(code: str) -> str:
    out = []
    for message in CATALOGUES[code]:
        if message.id:
            out += [message.string] if isinstance(message.string, str) else list(message.string)
    return "".join(out)


def test_traditional_and_simplified_stay_apart() -> None:
    traditional, simplified = _texts("zh-TW"), _texts("zh-CN")
    for trad, simp in SCRIPT_PAIRS:
        assert simp not in traditional, f"zh-TW uses the Simplified {simp}"
        assert trad not in simplified, f"zh-CN uses the Traditional {trad}"
    # Each region's own words, not the other script's characters for the same word.
    for word in ("設定", "訊息", "記憶", "伺服器", "預設", "指令"):
        assert word in traditional, word
    for word in ("设置", "消息", "记忆", "服务器", "默认", "命令"):
        assert word in simplified, word
    assert "设定" not in simplified and "讯息" not in simplified


# ------------------------------------------------------------------ the translator

CATALOGS = Catalogs.load()


@pytest.mark.parametrize(("code", "expected"), [
    ("en", "Done: I forgot this conversation (1 message). New start!"),
    ("zh-TW", "好了，我已經忘掉這段對話（1 則訊息）。重新開始吧！"),
    ("zh_cn", "好了，我已经忘掉这段对话（1 条消息）。重新开始吧！"),
    ("fr", "Done: I forgot this conversation (1 message). New start!"),
    (None, "Done: I forgot this conversation (1 message). New start!"),
])
def test_each_language_gets_its_own_words(code: str | None, expected: str) -> None:
    tr = CATALOGS.for_language(code)
    assert tr.ngettext("Done: I forgot this conversation ({count} message). New start!",
                       "Done: I forgot this conversation ({count} messages). New start!",
                       1, count=1) == expected


def test_plurals_and_named_placeholders() -> None:
    en, tw = CATALOGS.for_language("en"), CATALOGS.for_language("zh-TW")
    single = "You're sending messages too fast. Please try again in {seconds} second."
    plural = "You're sending messages too fast. Please try again in {seconds} seconds."
    assert en.ngettext(single, plural, 1, seconds=1).endswith("in 1 second.")
    assert en.ngettext(single, plural, 5, seconds=5).endswith("in 5 seconds.")
    assert tw.ngettext(single, plural, 5, seconds=5) == "你傳訊息的速度太快了，請 5 秒後再試。"
    assert tw.gettext("That message is {length:,} characters long; the limit is {limit:,}. "
                      "Please send something shorter.", length=12345, limit=4000) \
        == "這則訊息有 12,345 個字元，上限是 4,000。請傳短一點的內容。"
    # Not in the catalogue: the English text, formatted.
    assert tw.gettext("Hello {name}", name="Ana") == "Hello Ana"


def test_a_broken_translation_falls_back_to_english(caplog: pytest.LogCaptureFixture) -> None:
    cat = Catalog(locale="zh_TW")
    cat.add("Done: your model is now `{model}`.", "好了：`{modle}`")
    buf = io.BytesIO()
    write_mo(buf, cat)
    buf.seek(0)
    tr = Translator("zh-TW", gettext.GNUTranslations(buf))
    with caplog.at_level(logging.WARNING, logger="bot.i18n"):
        shown = tr.gettext("Done: your model is now `{model}`.", model="qwen2.5")
    assert shown == "Done: your model is now `qwen2.5`."
    assert "bad placeholders" in caplog.text


def test_catalogues_load_from_po_when_not_built_and_prefer_a_fresh_mo(tmp_path: Path) -> None:
    shutil.copytree(LOCALES_DIR, tmp_path / "locales",
                    ignore=shutil.ignore_patterns("*.mo"))
    folder = tmp_path / "locales" / "zh_TW" / "LC_MESSAGES"
    assert Catalogs.load(tmp_path / "locales").for_language("zh-TW").gettext("Commands:") \
        == "指令："
    cat = Catalog(locale="zh_TW")
    cat.add("Commands:", "（來自 .mo）")
    with (folder / "bot.mo").open("wb") as fh:
        write_mo(fh, cat)
    po_time = (folder / "bot.po").stat().st_mtime
    os.utime(folder / "bot.mo", (po_time + 10, po_time + 10))
    assert Catalogs.load(tmp_path / "locales").for_language("zh-TW").gettext("Commands:") \
        == "（來自 .mo）"
    os.utime(folder / "bot.po", (po_time + 20, po_time + 20))  # edited since it was built
    assert Catalogs.load(tmp_path / "locales").for_language("zh-TW").gettext("Commands:") \
        == "指令："


# ------------------------------------------------------------------ choosing the language


@pytest.mark.parametrize(("code", "expected"), [
    ("zh-hant", "zh-TW"), ("zh-TW", "zh-TW"), ("zh-HK", "zh-TW"), ("zh-Hant-TW", "zh-TW"),
    ("zh-hans", "zh-CN"), ("zh-CN", "zh-CN"), ("zh", "zh-CN"), ("zh-SG", "zh-CN"),
    ("en", "en"), ("en-US", "en"), ("fr", "en"), ("ja", "en"), ("", None), (None, None),
])
def test_telegram_language_codes(code: str | None, expected: str | None) -> None:
    assert from_telegram(code) == expected


@pytest.mark.parametrize(("locale", "expected"), [
    ("zh-TW", "zh-TW"), ("zh-CN", "zh-CN"), ("en-US", "en"), ("en-GB", "en"), ("ja", "en"),
    (None, None),
])
def test_discord_locales(locale: str | None, expected: str | None) -> None:
    assert from_discord(locale) == expected


def test_discord_locale_objects() -> None:
    import discord

    assert from_discord(discord.Locale.taiwan_chinese) == "zh-TW"
    assert from_discord(discord.Locale.chinese) == "zh-CN"
    assert from_discord(discord.Locale.japanese) == "en"


@pytest.mark.parametrize(("lang", "expected"), [
    ("zh_TW.UTF-8", "zh-TW"), ("zh_HK.UTF-8", "zh-TW"), ("zh_CN.UTF-8", "zh-CN"),
    ("zh_CN", "zh-CN"), ("en_US.UTF-8", "en"), ("de_DE@euro", "en"), ("C.UTF-8", None),
    ("POSIX", None), ("", None), (None, None),
])
def test_console_lang(lang: str | None, expected: str | None) -> None:
    assert from_lang_env(lang) == expected


def test_the_order_of_choice() -> None:
    # The user's own /language wins over everything.
    assert choose_language(chosen="zh-CN", setting="en", platform="zh-TW",
                           lang_env="en_US.UTF-8") == "zh-CN"
    # LANGUAGE naming a language fixes it for everyone without a choice.
    assert choose_language(setting="zh-TW", platform="en") == "zh-TW"
    # auto: the platform's signal, then LANG, then English.
    assert choose_language(setting="auto", platform="zh-CN", lang_env="zh_TW.UTF-8") == "zh-CN"
    assert choose_language(setting="auto", platform=None, lang_env="zh_TW.UTF-8") == "zh-TW"
    assert choose_language() == "en"


@pytest.mark.parametrize(("typed", "expected"), [
    ("zh-TW", "zh-TW"), ("zh_tw", "zh-TW"), ("繁體中文", "zh-TW"), ("zh-hant", "zh-TW"),
    ("ZH-CN", "zh-CN"), ("简体", "zh-CN"), ("zh", "zh-CN"), ("en", "en"), ("English", "en"),
    ("auto", "auto"), ("klingon", None), ("", None),
])
def test_what_users_type_after_language(typed: str, expected: str | None) -> None:
    assert parse_language(typed) == expected


def test_the_language_setting() -> None:
    assert load_settings(env_file=None, LANGUAGE="zh_tw").LANGUAGE == "zh-TW"
    assert load_settings(env_file=None).LANGUAGE == "auto"
    with pytest.raises(SettingsError) as info:
        load_settings(env_file=None, LANGUAGE="fr")
    assert str(info.value).startswith("bad setting LANGUAGE='fr': ")
    assert "\n" not in str(info.value)


def test_every_language_of_one_message_for_platform_menus() -> None:
    assert CATALOGS.in_every_language("Forget this conversation") == {
        "en": "Forget this conversation", "zh-TW": "忘掉這段對話", "zh-CN": "忘掉这段对话"}


@settings(deadline=None)  # a loaded machine must not fail a pure function
@given(st.text(max_size=20))
def test_any_platform_code_maps_to_a_shipped_language(code: str) -> None:
    assert from_telegram(code) in (None, *LANGUAGES)
    assert from_discord(code) in (None, *LANGUAGES)
    assert normalize(code) in (None, *LANGUAGES)
    assert choose_language(platform=from_telegram(code)) in LANGUAGES
