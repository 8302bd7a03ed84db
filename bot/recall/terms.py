"""The one tokenizer for the recall index and its queries: words and CJK bigrams.

Latin (and any spaced) script: NFKC-folded, lowercased words, with a light
English plural/possessive folding so "sisters" finds "sister". CJK text has
no spaces, so a run of Han characters becomes its overlapping bigrams, as
Lucene's CJKAnalyzer does (拉麵店 → 拉麵 麵店), and a lone character stands
for itself; kana and hangul runs are bigrammed the same way. Particles (的 了
嗎 …) end a run, so no bigram straddles one. Question words and other
function words carry no topic and are dropped from both sides.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator

# One run of CJK (Han, kana, hangul) or one run of other letters/digits.
_CJK = (r"\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"
        r"\uf900-\ufaff\U00020000-\U0002fa1f")
_RUN = re.compile(rf"(?P<cjk>[{_CJK}]+)|(?P<word>[^\W_{_CJK}]+)")
MAX_WORD = 40  # longer "words" are hashes or junk: they find nothing useful

STOP_WORDS = frozenset("""
a about above after again all am an and any are as at be because been before being
below between both but by can could did do does doing done down during each else ever
few for from further get got had has have having he her here hers herself him himself
his how i if in into is it its itself just let like me more most my myself no nor not
now of off on once only or other our ours ourselves out over own please same she should
so some such than that the their theirs them themselves then there these they this
those through to too under until up very was we were what when where which while who
whom whose why will with would yes yet you your yours yourself yourselves
tell remember know think said say told again ok okay oh hey hi hello thanks thank
s t d ll m re ve don didn doesn isn wasn aren weren
""".split())

# Chinese function words and question words, as the bigrams/characters they become.
STOP_CJK = frozenset("""
什麼 什么 甚麼 哪裡 哪里 哪裏 哪兒 哪儿 哪個 哪个 怎麼 怎么 怎樣 怎样 為什 为什 多少 幾個 几个
現在 现在 知道 記得 记得 告訴 告诉 還記 还记 一下 可以 是不 不是 就是 還是 还是 然後 然后
我們 我们 你們 你们 他們 他们 她們 她们 這個 这个 那個 那个 這樣 这样 那樣 那样 一個 一个
我的 你的 他的 她的 的是 了嗎 了吗 是什 麼時 么时 時候 时候 有沒 有没 沒有 没有 請問 请问
的 了 嗎 吗 呢 吧 啊 呀 是 我 你 他 她 它 在 和 與 与 也 都 就 還 还 很 嗯 喔 哦 把 被 給 给
誰 谁 幾 几 哪 麼 么 這 这 那 有 個 个 說 说 要 會 会 能 想 對 对 不 得 地 著 着 過 过
""".split())

# Particles end a run: a bigram across one ("的沙" in 我的沙發) is noise, not a word.
_PARTICLES = re.compile("[的了嗎吗呢吧啊呀嗯喔哦]+")


def _fold_word(word: str) -> str:
    # Plural and possessive folding only; real stemming would merge too much.
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("sses", "xes", "ches", "shes", "zzes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _terms(text: str) -> Iterator[str]:
    folded = unicodedata.normalize("NFKC", text).lower()
    for m in _RUN.finditer(folded):
        word = m.group("word")
        if word is not None:
            if len(word) <= MAX_WORD and word not in STOP_WORDS:
                yield _fold_word(word)
            continue
        for run in _PARTICLES.split(m.group("cjk")):
            if len(run) == 1:
                if run not in STOP_CJK:
                    yield run
                continue
            for i in range(len(run) - 1):
                gram = run[i:i + 2]
                if gram not in STOP_CJK:
                    yield gram


def index_terms(text: str) -> list[str]:
    """The terms a stored message is indexed under, repeats kept (term frequency)."""
    return list(_terms(text))


def query_terms(text: str, limit: int = 32) -> list[str]:
    """The distinct terms of a query, in order of first appearance, at most `limit`."""
    seen: dict[str, None] = {}
    for term in _terms(text):
        seen.setdefault(term, None)
        if len(seen) >= limit:
            break
    return list(seen)
