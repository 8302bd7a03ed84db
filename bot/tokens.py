"""Token counting with no network: an estimate close to BPE tokenizers.

tiktoken would fetch its tables from the internet on first use, and every
model family tokenizes differently anyway, so the estimate is built from how
BPE vocabularies behave: a common English word is one token and a long one a
few, digits go in groups of three, punctuation is about one token a mark, and
each CJK character is about one token. `Calibration` then corrects the
estimate per model from the counts the model server reports.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Per message, chat templates add role markers and separators.
MESSAGE_OVERHEAD = 4
PROMPT_OVERHEAD = 3

_CJK = (
    r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
    r"\u3000-\u303f\uff00-\uffef"
)
_PIECE = re.compile(
    rf"[{_CJK}]"  # one CJK character or full-width mark
    rf"|'(?:s|t|re|ve|m|ll|d)\b"  # English contractions
    rf"| ?[^\W\d_{_CJK}]+"  # a word with its leading space
    r"| ?\d{1,3}"  # digits in groups of three
    r"| ?[^\s\w]+"  # a run of punctuation or symbols
    r"|\s+",
    re.UNICODE,
)


def count_tokens(text: str) -> int:
    """Estimated tokens of `text`."""
    total = 0
    for m in _PIECE.finditer(text):
        piece = m.group()
        first = piece[0]
        if len(piece) == 1 and ("\u2e80" <= first <= "\u9fff" or "\uac00" <= first <= "\ud7af"
                                or "\uf900" <= first <= "\ufaff" or "\uff00" <= first <= "\uffef"):
            total += 1
            continue
        core = piece.lstrip(" ")
        if not core:
            total += 1
        elif core.isspace():
            total += 1 if len(core) < 8 else len(core) // 8 + 1
        elif core[0].isalpha():
            if core.isascii():
                total += 1 + max(0, len(core) - 6 + 3) // 4
            else:
                total += (len(core) + 1) // 2
        elif core[0].isdigit():
            total += 1
        else:
            total += min(len(core), 2) if len(core) <= 2 else 1 + (len(core) - 1) // 4
    return total


def count_messages(messages: Iterable[dict[str, str]]) -> int:
    """Estimated tokens of a chat prompt."""
    return PROMPT_OVERHEAD + sum(
        count_tokens(m["content"]) + MESSAGE_OVERHEAD for m in messages
    )


class Calibration:
    """Per-model correction of the estimate from the server's own counts.

    A running ratio of reported ÷ estimated prompt tokens, clamped so one odd
    answer cannot make the trimming reckless. Bounded: one entry per model.
    """

    def __init__(self, low: float = 0.7, high: float = 1.6) -> None:
        self._ratio: dict[str, float] = {}
        self._low, self._high = low, high

    def factor(self, model: str) -> float:
        return self._ratio.get(model, 1.0)

    def observe(self, model: str, estimated: int, reported: int | None) -> None:
        if not reported or estimated <= 0 or len(self._ratio) > 1000:
            return
        seen = min(self._high, max(self._low, reported / estimated))
        old = self._ratio.get(model)
        self._ratio[model] = seen if old is None else old * 0.8 + seen * 0.2
