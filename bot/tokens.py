"""Token counting with no network: a safe estimate by character class.

Every model family tokenizes differently, and one correction factor can't
fix a spread from digits (one token each in Gemma) to CJK (half a token a
character in one vocabulary, two in another). So text is counted by class,
each class at a cost that byte-level BPE and SentencePiece vocabularies
rarely exceed (the test holds it to 10% against Claude's legacy vocabulary):

* a Latin-script word by what it is: one of the 3,000 most frequent English
  words one token, one of the next 17,000 two (english_words.txt, from
  wordfreq); any other word by its length (0.65 a letter: rare names,
  German or Finnish compounds, random letters), a letter with a diacritic
  one token; capitals inside split a word into parts (identifiers, base64),
  all capitals 0.7 a letter;
* each digit one token (Gemma and Llama 2 split digits one by one);
* ASCII punctuation one a mark (a run of one repeated mark merges);
* every other character by its UTF-8 bytes (what byte-level BPE falls back
  to: emoji, symbols, other scripts), and so are rare CJK ideographs;
* the most frequent CJK characters (cjk_frequent.txt: 600 in Chinese, 300
  in Japanese, with kana, CJK punctuation and full-width forms) at a
  per-model cost a character, 1.3 until the model's own is learned (Gemma
  and Qwen under 1; Claude's legacy vocabulary 1.0-1.35 on real Chinese,
  up to 1.4 on random strings of them); the other ideographs of level 1 of
  GB 2312, Big5 and JIS X 0208 at 1.75 times that, the 300 most frequent
  Hangul syllables at 1.75 times; every other CJK character by its bytes.

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
from importlib import resources

# Per message, chat templates add role markers and separators.
MESSAGE_OVERHEAD = 4
PROMPT_OVERHEAD = 3
# The default cost of one of the most frequent CJK characters (cjk_frequent.txt):
# random strings of them cost up to 1.4 in Claude's legacy vocabulary, real
# Chinese text 1.0-1.35 a character; each model then learns its own.
CJK_DEFAULT = 1.3
# Other characters of the standards' level 1 cost more (random strings up to 2.35),
# and Hangul more again (the 300 most frequent syllables up to 2.2); in units of that.
LEVEL1_UNITS = 1.75
HANGUL_UNITS = 1.75
TOP_WORDS = 3000  # one token each; the rest of the list two

_LATIN = "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff"
_CJK = ("\u2e80-\u2fdf\u3000-\u303f\u3040-\u30ff\u3100-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
        "\uac00-\ud7af\uf900-\ufaff\uff00-\uffef\U00020000-\U0003ffff")
_PIECE = re.compile(
    rf"(?P<w> ?[{_LATIN}]+)"  # a word with its leading space
    r"|(?P<d>[0-9]+)"  # digits: one token each
    rf"|(?P<c>[{_CJK}]+)"  # CJK
    r"|(?P<q>'(?:s|t|re|ve|m|ll|d)\b)"  # English contractions
    r"|(?P<p>([!-/:-@\[-`{-~])\2*)"  # ASCII punctuation; a run of one mark together
    r"|(?P<s> +|\t+|[\r\n]+)"  # whitespace runs, each kind apart
    rf"|(?P<o>[^\x00-\x7f{_LATIN}{_CJK}]+)"  # anything else: by its UTF-8 bytes
    r"|[\x00-\x7f]"  # control characters and lone whitespace: one each
)


_CAMEL = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])")


@functools.cache
def _ranks() -> dict[str, int]:
    """Frequent English words, 0 the most frequent."""
    text = resources.files("bot").joinpath("english_words.txt").read_text("utf-8")
    words = [w for w in text.split("\n") if w and not w.startswith("#")]
    return {w: i for i, w in enumerate(words)}


def _standard(codec: str, leads: range, trails: Iterable[int]) -> set[str]:
    """The characters of a national double-byte standard's rows `leads`."""
    trail = list(trails)
    found = set()
    for lead in leads:
        for t in trail:
            try:
                found.add(bytes((lead, t)).decode(codec))
            except UnicodeDecodeError:
                continue
    return found


@functools.cache
def _frequent() -> dict[str, float]:
    """The frequent CJK characters, each with its cost in units of the model's CJK cost."""
    head, hangul = [line for line in resources.files("bot").joinpath("cjk_frequent.txt")
                    .read_text("utf-8").split("\n") if line and not line.startswith("#")]
    euc = range(0xA1, 0xFF)
    # Level 1 of the national standards: frequent, but less so than the list.
    level1 = (_standard("gb2312", range(0xB0, 0xD8), euc)
              | _standard("euc_jp", range(0xB0, 0xD0), euc)
              | _standard("big5", range(0xA4, 0xC7), [*range(0x40, 0x7F), *euc]))
    units = dict.fromkeys(level1, LEVEL1_UNITS)
    units |= dict.fromkeys(map(chr, range(0x3000, 0x3100)), 1.0)  # punctuation, kana
    units |= dict.fromkeys(map(chr, range(0xFF00, 0xFFF0)), 1.0)  # full-width forms
    units |= dict.fromkeys(head, 1.0)
    units |= dict.fromkeys(hangul, HANGUL_UNITS)
    return units


@functools.lru_cache(maxsize=100_000)
def _word(word: str) -> int:
    n = len(word)
    if word.isascii():
        if word.islower() or word[1:].islower():
            rank = _ranks().get(word.lower())
            if rank is not None:
                # A capitalised word is one token only among the most frequent.
                return 1 if rank < (TOP_WORDS if word[0].islower() else TOP_WORDS // 3) else 2
            return 1 if n == 1 else math.ceil(0.65 * n + 0.5)
        if word.isupper():  # acronyms, shouting: capitals merge less
            return 1 if n == 1 else math.ceil(0.7 * n + 0.5)
        # Capitals inside (identifiers, base64): each part on its own.
        return sum(map(_word, _CAMEL.findall(word)))
    plain = sum(c.isascii() for c in word)
    return min(2 * n, math.ceil(0.65 * plain + (n - plain) + 0.5))


def _cjk(run: str) -> tuple[int, float]:
    """(tokens of the rare characters: their UTF-8 bytes, units of the frequent) of a run."""
    units = _frequent()
    got = [u for u in map(units.get, run) if u is not None]
    return len(run.encode("utf-8")) - 3 * len(got), math.fsum(got)


def measure_fresh(text: str) -> tuple[int, float]:
    """(tokens of everything but frequent CJK, frequent CJK units) of `text`.

    `measure` is this, cached; this is for one-off texts (the prefixes tried
    while clipping), which would only push texts that recur out of the cache."""
    base = 0
    cjk = 0.0
    for m in _PIECE.finditer(text):
        kind = m.lastgroup
        if kind == "w":
            piece = m.group()
            base += _word(piece[1:] if piece[0] == " " else piece)
        elif kind == "d":
            base += m.end() - m.start()
        elif kind == "c":
            rare, units = _cjk(m.group())
            base += rare
            cjk += units
        elif kind == "o":
            base += len(m.group().encode("utf-8", "surrogatepass"))
        elif kind == "p":
            n = m.end() - m.start()
            base += 1 if n == 1 else 1 + n // 4
        elif kind == "s":  # indentation merges more than newlines
            n = m.end() - m.start()
            base += 1 + n // (8 if text[m.start()] == " " else 4)
        else:  # contractions, control characters
            base += 1
    return base, cjk


measure = functools.lru_cache(maxsize=50_000)(measure_fresh)
_LATIN_START = re.compile(rf"[{_LATIN}]")


def after_space(text: str) -> tuple[int, float]:
    """`measure` of " " + text from text's own (cached): a word takes the space
    before it in, anything else but a space starts a piece after a lone space."""
    if text and _LATIN_START.match(text):
        return measure(text)
    if not text or text[0] == " ":
        return measure_fresh(" " + text)  # the spaces run together
    base, cjk = measure(text)
    return base + 1, cjk


# `measure` of the "\n\n" (or "\n") between two texts that `joined` adds up.
SEPARATOR = (1, 0.0)


def joined(parts: Iterable[tuple[int, float]]) -> tuple[int, float]:
    """`measure` of texts joined by "\n\n" (or "\n") from their own measures.

    Exact when no text is empty, none but the first starts with "\r" or "\n" and
    none but the last ends with one: no piece of the estimate then spans a join
    (none reaches past a line break, a run of line breaks stops at other
    characters, nothing looks behind, and the one look-ahead, a contraction's
    word end, sees the same at a line break as at the end), and the line breaks
    between are one run. The CJK units are multiples of a quarter: exact sums.
    """
    base, cjk, n = 0, 0.0, -1
    for b, c in parts:
        base += b
        cjk += c
        n += 1
    return base + SEPARATOR[0] * max(n, 0), cjk


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

    def count_fresh(self, text: str) -> int:
        """`count` of a one-off text, past the cache (see measure_fresh)."""
        base, cjk = measure_fresh(text)
        return math.ceil(base * self.factor + cjk * self.cjk)

    def of(self, measured: tuple[int, float]) -> int:
        """`count` of a text from its `measure` (summed parts: see `joined`)."""
        return math.ceil(measured[0] * self.factor + measured[1] * self.cjk)

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
                reported: int | None,
                measured: tuple[int, float] | None = None) -> TokenFactors | None:
        """Learn from the server's count of a prompt; the new factors if they moved.

        `measured`: the prompt's own (base, CJK units) with its overheads, as
        `PromptPlan` keeps them (Prompt.measured), so it is not measured again."""
        if not reported or reported <= 0:
            return None
        if measured is None:
            msgs = list(messages)
            base = PROMPT_OVERHEAD + MESSAGE_OVERHEAD * len(msgs)
            cjk = 0.0
            for m in msgs:
                b, c = measure(m["content"])
                base += b
                cjk += c
        else:
            base, cjk = measured
        old = self.factors(model)
        factor, cjk_cost = old.factor, old.cjk
        if cjk * old.cjk > 0.3 * (base * old.factor + cjk * old.cjk):
            # Mostly CJK: the rest at its factor, the remainder is the CJK cost.
            seen = (reported - base * old.factor) / cjk
            cjk_cost = self._move(old.cjk, seen, 0.3, CJK_DEFAULT * 2)
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
