"""Cleaning what users send before anything else sees it."""

from __future__ import annotations

import re
import unicodedata

# C0/C1 controls except tab and newline; NUL would also break PostgreSQL text.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_INVISIBLE = {"Cf", "Zs", "Zl", "Zp", "Cc", "Mn"}


def clean_text(text: str) -> str:
    """Valid Unicode with no control characters, line ends normalised."""
    # Lone surrogates (from a platform's broken UTF-16) cannot be stored as
    # UTF-8: replace them rather than fail later in the database driver.
    text = _SURROGATE.sub("\ufffd", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub("", text).strip()


def is_blank(text: str) -> bool:
    """True when nothing visible is left (whitespace, zero-width, direction marks)."""
    return all(unicodedata.category(ch) in _INVISIBLE or ch.isspace() for ch in text)


def storable(text: str) -> str:
    """What any database can hold: no NUL (PostgreSQL refuses it), no lone surrogate.

    For text the model wrote: unlike user input, its formatting is kept.
    """
    return _SURROGATE.sub("\ufffd", text.replace("\x00", ""))
