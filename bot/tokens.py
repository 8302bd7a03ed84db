"""Token counting with no network: a safe estimate by character class.

Every model family tokenizes differently, and one correction factor can't
fix a spread from digits (one token each in Gemma) to CJK (half a token a
character in one vocabulary, two in another). So text is counted by class,
each class at a cost that no common byte-level BPE or SentencePiece
vocabulary exceeds by more than 10%:

* an English-like word: one token up to seven letters, two up to twelve;
  long letter soups (base64, hashes) 0.6 a letter;
* each digit one token (Gemma and Llama 2 split digits one by one);
* ASCII punctuation one a mark (a run of one repeated mark merges);
* every other non-ASCII character by its UTF-8 bytes (what byte-level BPE
  falls back to);
* CJK apart, 1.5 a character to start with, so that each model can learn
  its own cost per CJK character (Gemma's is under 1, Claude's legacy
  vocabulary's 1.3 on real text).

`Calibration` then lowers (or raises) the estimate per model from the counts
the model server reports, and is persisted so a restart keeps it. Servers
with their own tokenizer (/tokenize) are asked instead where it matters.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

# Per message, chat templates add role markers and separators.
MESSAGE_OVERHEAD = 4
PROMPT_OVERHEAD = 3
# The default cost of one CJK character in real text (Claude's legacy vocabulary 1.3,
# Llama 3 about 1.1, Gemma and Qwen under 1); each model then learns its own.
CJK_DEFAULT = 1.5

_CJK_RANGES = (
    (0x2E80, 0x2FDF),  # radicals
    (0x3000, 0x303F),  # CJK punctuation
    (0x3040, 0x30FF),  # kana
    (0x3100, 0x31FF),  # bopomofo, katakana extensions
    (0x3400, 0x4DBF),  # extension A
    (0x4E00, 0x9FFF),  # unified ideographs
    (0xAC00, 0xD7AF),  # hangul syllables
    (0xF900, 0xFAFF),  # compatibility ideographs
    (0xFF00, 0xFFEF),  # full-width forms
)

_PIECE = re.compile(
    r"(?P<soup>[A-Za-z]*[0-9][A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*)"  # letters and digits mixed
    r"|'(?:s|t|re|ve|m|ll|d)\b"  # English contractions
    r"| ?[A-Za-z]+"  # an ASCII word with its leading space
    r"|[0-9]"  # one digit
    r"|([!-/:-@\[-`{-~])\1*"  # ASCII punctuation; a run of one mark together
    r"| +|\t+|[\r\n]+|\s"  # whitespace runs, each kind apart
    r"|[^\x00-\x7f]"  # any other character, one at a time
    r"|[\x00-\x7f]"  # control characters: one each
)


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def _word(word: str) -> int:
    n = len(word)
    if not (word.islower() or word.isupper() or word[1:].islower()):
        return math.ceil(0.8 * n)  # mixed case inside: base64, identifiers, soups
    # English-like: a word of up to seven letters is one token. (German,
    # Finnish, Indonesian or Swahili words take about one per three letters:
    # up to half more than this; the per-model correction learns it.)
    if n <= 7:
        return 1
    if n <= 12:
        return 2
    return 2 + math.ceil(0.6 * (n - 12))


@functools.lru_cache(maxsize=50_000)
def measure(text: str) -> tuple[int, int]:
    """(tokens of everything but CJK, CJK characters) of `text`."""
    base = cjk = 0
    for m in _PIECE.finditer(text):
        piece = m.group()
        first = piece[0]
        if m.lastgroup == "soup":  # hex, base64, ids: no word merges across digits
            digits = sum(c.isdigit() for c in piece)
            base += digits + math.ceil(0.8 * (len(piece) - digits))
        elif first == " " and len(piece) > 1 and piece[1].isalpha():
            base += _word(piece[1:])
        elif (first.isascii() and first.isalpha()) or first == "'":
            base += _word(piece)
        elif first == " ":
            base += 1 + len(piece) // 8
        elif first == "\t":
            base += 1 + len(piece) // 4
        elif first in "\r\n":
            base += 1 + len(piece) // 4
        elif first.isascii():
            # digits, punctuation (a run of one repeated mark merges), other ASCII
            base += 1 if len(piece) == 1 else 1 + len(piece) // 4
        elif _is_cjk(ord(first)):
            cjk += 1
        else:
            base += len(first.encode("utf-8", "surrogatepass"))
    return base, cjk


def count_tokens(text: str) -> int:
    """Estimated tokens of `text` before any per-model correction."""
    base, cjk = measure(text)
    return base + math.ceil(cjk * CJK_DEFAULT)


def count_messages(messages: Iterable[dict[str, str]]) -> int:
    """Estimated tokens of a chat prompt."""
    return PROMPT_OVERHEAD + sum(
        count_tokens(m["content"]) + MESSAGE_OVERHEAD for m in messages
    )


@dataclass(frozen=True, slots=True)
class TokenFactors:
    """One model's correction: all non-CJK tokens × factor, + cjk per CJK char."""

    factor: float = 1.0
    cjk: float = CJK_DEFAULT

    def count(self, text: str) -> int:
        base, cjk = measure(text)
        return math.ceil(base * self.factor + cjk * self.cjk)

    def count_messages(self, messages: Iterable[dict[str, str]]) -> int:
        return PROMPT_OVERHEAD + sum(self.count(m["content"]) + MESSAGE_OVERHEAD
                                     for m in messages)


class Calibration:
    """Per-model correction of the estimate from the server's own counts.

    It rises at once when the server counts more than estimated (an
    overshoot would overflow the window) and falls slowly when it counts
    less; clamped so one odd answer can't make the trimming reckless.
    Bounded: one entry per model.
    """

    def __init__(self, low: float = 0.3, high: float = 3.0) -> None:
        self._by_model: dict[str, TokenFactors] = {}
        self._low, self._high = low, high

    def factors(self, model: str) -> TokenFactors:
        return self._by_model.get(model, TokenFactors())

    def factor(self, model: str) -> float:
        return self.factors(model).factor

    def known(self, model: str) -> bool:
        return model in self._by_model

    def set(self, model: str, factors: TokenFactors) -> None:
        if len(self._by_model) < 1000 or model in self._by_model:
            self._by_model[model] = factors

    def observe(self, model: str, messages: Iterable[dict[str, str]],
                reported: int | None) -> TokenFactors | None:
        """Learn from the server's count of a prompt; the new factors if they moved."""
        if not reported or reported <= 0:
            return None
        msgs = list(messages)
        base = PROMPT_OVERHEAD + MESSAGE_OVERHEAD * len(msgs)
        cjk = 0
        for m in msgs:
            b, c = measure(m["content"])
            base += b
            cjk += c
        old = self.factors(model)
        factor, cjk_cost = old.factor, old.cjk
        if cjk * old.cjk > 0.3 * (base * old.factor + cjk * old.cjk):
            # Mostly CJK: the rest at its factor, the remainder is the CJK cost.
            seen = (reported - base * old.factor) / cjk
            cjk_cost = self._move(old.cjk, seen, 0.3, CJK_DEFAULT * 1.2)
        else:
            seen = (reported - cjk * old.cjk) / max(base, 1)
            factor = self._move(old.factor, seen, self._low, self._high)
        new = TokenFactors(round(factor, 4), round(cjk_cost, 4))
        if new == old and self.known(model):
            return None
        self.set(model, new)
        return new

    @staticmethod
    def _move(old: float, seen: float, low: float, high: float) -> float:
        seen = min(high, max(low, seen))
        # Up at once (with 3% to spare), down a fifth of the way.
        return seen * 1.03 if seen > old else old * 0.8 + seen * 0.2
