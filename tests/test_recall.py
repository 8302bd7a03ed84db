"""The recall building blocks: terms, rank fusion, the vector cache, fitting."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.recall import (
    RECALL_HEADER,
    RecallMessage,
    VectorCache,
    fit_recalled,
    index_terms,
    query_terms,
    reciprocal_rank_fusion,
)
from bot.recall.fitting import Around
from bot.recall.vectors import from_blob, to_blob
from bot.tokens import MESSAGE_OVERHEAD, count_tokens

# -- terms


def test_latin_words_are_lowercased_and_stop_words_dropped() -> None:
    assert query_terms("Where does my Sister live NOW?") == ["sister", "live"]
    assert index_terms("My sister moved to Tainan last spring.") == [
        "sister", "moved", "tainan", "last", "spring"]


def test_plurals_and_possessives_fold_to_one_term() -> None:
    assert query_terms("my sisters' cities") == ["sister", "city"]
    assert query_terms("Anna's glasses, boxes") == ["anna", "glass", "box"]


def test_cjk_becomes_overlapping_bigrams_so_words_are_found() -> None:
    stored = index_terms("我昨天吃了拉麵，小明也來了")
    assert "拉麵" in stored and "小明" in stored
    assert "天吃" in stored  # bigrams overlap; no dictionary needed
    # The same tokenizer builds the query: the shared bigrams are what match.
    assert "拉麵" in query_terms("拉麵好吃嗎？")
    assert "小明" in query_terms("小明是誰")


def test_chinese_question_words_and_lone_function_characters_are_dropped() -> None:
    terms = query_terms("我妹妹現在住在哪裡？")
    assert "妹妹" in terms and "住在" in terms
    assert not {"現在", "哪裡", "我"} & set(terms)
    assert query_terms("的") == []
    assert query_terms("貓") == ["貓"]  # a lone content character stands for itself


def test_mixed_script_and_full_width_forms_fold() -> None:
    assert query_terms("ＩＫＥＡ的沙發") == ["ikea", "沙發"]
    assert query_terms("iPhone15 很貴") == ["iphone15", "很貴"]


def test_query_terms_are_distinct_and_capped() -> None:
    text = " ".join(f"word{i}" for i in range(100)) + " word1 word1"
    terms = query_terms(text, limit=10)
    assert terms == [f"word{i}" for i in range(10)]


@given(st.text(max_size=300))
@settings(max_examples=300, deadline=None)
def test_terms_are_clean_tokens_for_any_text(text: str) -> None:
    for term in index_terms(text):
        # No spaces, quotes or operators: safe for FTS5 and tsvector literals alike.
        assert term and not any(c.isspace() or c in "\"'():*^" for c in term)
        assert term == term.lower()
    assert set(query_terms(text, limit=1000)) == set(index_terms(text))


# -- fusion


def test_rrf_rewards_agreement_between_rankings() -> None:
    words = [1, 2, 3, 4]
    meaning = [9, 3, 8, 1]
    fused = [item for item, _ in reciprocal_rank_fusion([words, meaning])]
    # 1 and 3 are in both; 3 is second and fourth, 1 first and fourth → 1 first, then 3.
    assert fused[:2] == [1, 3]
    assert set(fused) == {1, 2, 3, 4, 8, 9}


def test_rrf_scores_weights_and_limit() -> None:
    fused = reciprocal_rank_fusion([[5, 6], [6]], k=60, weights=[1.0, 2.0], limit=1)
    assert fused == [(6, pytest.approx(1 / 62 + 2 / 61))]
    with pytest.raises(ValueError):
        reciprocal_rank_fusion([[1]], weights=[1.0, 2.0])
    assert reciprocal_rank_fusion([[], []]) == []


@given(st.lists(st.lists(st.integers(0, 50), unique=True, max_size=20), max_size=4))
def test_rrf_scores_are_sorted_and_cover_every_item(rankings: list[list[int]]) -> None:
    fused = reciprocal_rank_fusion(rankings)
    scores = [s for _, s in fused]
    assert scores == sorted(scores, reverse=True)
    assert {i for i, _ in fused} == {i for r in rankings for i in r}


# -- the vector cache


def _unit(i: int, dim: int = 8) -> np.ndarray:
    v = np.zeros(dim, np.float32)
    v[i % dim] = 1.0
    return v


def test_cache_search_finds_the_most_similar_below_the_bound() -> None:
    cache = VectorCache()
    vectors = np.stack([_unit(i) for i in range(8)])
    assert cache.add(1, "m", list(range(10, 18)), vectors) == 8
    query = _unit(3) + 0.1 * _unit(4)
    assert [i for i, _ in cache.search(1, query, before_id=100, limit=2)] == [13, 14]
    # The window's messages (id >= before_id) are never returned.
    assert {i for i, _ in cache.search(1, query, before_id=13, limit=8)} == {10, 11, 12}
    assert cache.search(1, query, before_id=10, limit=5) == []
    assert cache.search(2, query, before_id=100, limit=5) == []  # another conversation
    assert cache.search(1, np.ones(3), before_id=100, limit=5) == []  # wrong dimension


def test_outliers_only_keeps_a_standout_match_and_drops_near_random_tops() -> None:
    # A model that can't tell this language's sentences apart: every vector near one
    # direction plus noise, so every similarity is high and the top is only noise.
    rng = np.random.default_rng(7)
    common = rng.normal(size=32).astype(np.float32)
    rows = np.stack([common + 0.5 * rng.normal(size=32).astype(np.float32)
                     for _ in range(300)])
    query = common + 0.5 * rng.normal(size=32).astype(np.float32)
    cache = VectorCache()
    cache.add(1, "m", list(range(1, 301)), rows)
    plain = cache.search(1, query, before_id=10**9, limit=5)
    assert len(plain) == 5 and plain[0][1] > 0.5  # high cosine, and meaningless
    assert cache.search(1, query, before_id=10**9, limit=5, outliers_only=True) == []
    # A real paraphrase of the query stands out from that background: it alone is kept.
    cache.add(1, "m", [301], (query + 0.1 * rng.normal(size=32).astype(np.float32))[None, :])
    got = cache.search(1, query, before_id=10**9, limit=5, outliers_only=True)
    assert [i for i, _ in got] == [301]
    # Too few messages to know the background: no gate at all.
    small = VectorCache()
    small.add(1, "m", list(range(1, 9)), rows[:8])
    assert len(small.search(1, query, before_id=10**9, limit=5, outliers_only=True)) == 5


def test_cache_refresh_asks_only_for_rows_newer_than_it_holds() -> None:
    import asyncio

    cache = VectorCache()
    asked: list[int] = []
    table = [(i, to_blob(_unit(i))) for i in range(1, 6)]

    async def load(after_id: int) -> list[tuple[int, bytes]]:
        asked.append(after_id)
        return [r for r in table if r[0] > after_id]

    async def go() -> None:
        assert await cache.refresh(7, "m", load) == 5
        table.append((9, to_blob(_unit(2))))
        assert await cache.refresh(7, "m", load) == 1
        assert await cache.refresh(7, "m", load) == 0

    asyncio.run(go())
    assert asked == [0, 5, 9]
    assert cache.rows(7) == 6
    assert cache.newest_id(7, "m") == 9
    assert cache.newest_id(7, "other-model") == 0
    # Re-adding old rows adds nothing (no duplicates).
    assert cache.add(7, "m", [3], np.stack([_unit(3)])) == 0


def test_cache_is_bounded_lru_over_conversations() -> None:
    dim = 16
    row = dim * 4 + 8
    cache = VectorCache(max_bytes=row * 100)
    for conv in range(5):
        cache.add(conv, "m", list(range(1, 41)), np.random.default_rng(conv).random(
            (40, dim), dtype=np.float32))
        cache.search(0, np.ones(dim), 1000, 1)  # conversation 0 stays recently used
    assert cache.nbytes <= cache.max_bytes
    assert 0 in cache and 4 in cache
    assert 1 not in cache  # the least recently used went first


def test_a_conversation_bigger_than_the_bound_keeps_its_newest_rows() -> None:
    dim = 4
    cache = VectorCache(max_bytes=(dim * 4 + 8) * 10)
    cache.add(1, "m", list(range(1, 101)), np.ones((100, dim), np.float32))
    assert cache.nbytes <= cache.max_bytes
    assert cache.rows(1) == 10 and cache.covers_from(1) == 91
    assert {i for i, _ in cache.search(1, np.ones(dim), 1000, 100)} == set(range(91, 101))


def test_a_different_model_replaces_the_vectors() -> None:
    cache = VectorCache()
    cache.add(1, "a", [1, 2], np.stack([_unit(1), _unit(2)]))
    cache.add(1, "b", [3], np.stack([_unit(3, dim=4)]))
    assert cache.rows(1) == 1 and cache.newest_id(1, "b") == 3
    cache.drop(1)
    assert 1 not in cache and cache.nbytes == 0


def test_blobs_round_trip_as_little_endian_float32() -> None:
    v = [0.5, -1.25, 3.0]
    blob = to_blob(v)
    assert blob == np.array(v, dtype="<f4").tobytes() and len(blob) == 12
    assert from_blob(blob).tolist() == v


# -- fitting


def _msg(i: int, role: str, text: str, day: int = 3) -> RecallMessage:
    return RecallMessage(i, role, text, f"2026-11-{day:02d}T10:00:00.000Z")


def test_block_keeps_date_and_speaker_oldest_first_with_neighbours() -> None:
    q1, a1 = _msg(10, "user", "My sister moved to Tainan last spring."), _msg(11, "assistant",
                                                                              "Nice city!")
    q2, a2 = _msg(50, "user", "I had ramen", day=9), _msg(51, "assistant", "Yum", day=9)
    before = _msg(9, "assistant", "What's new?")
    ranked = [Around(q2, None, a2), Around(a1, q1, None), Around(q1, before, a1)]
    got = fit_recalled(ranked, budget=500)
    assert got.text.splitlines() == [
        RECALL_HEADER,
        "[2026-11-03] you: What's new?",
        "[2026-11-03] user: My sister moved to Tainan last spring.",
        "[2026-11-03] you: Nice city!",
        "[2026-11-09] user: I had ramen",
        "[2026-11-09] you: Yum",
    ]
    assert got.ids == [9, 10, 11, 50, 51]
    assert got.hit_ids == [50, 11, 10]
    assert count_tokens(got.text) + MESSAGE_OVERHEAD <= got.tokens <= 500


def test_budget_is_never_exceeded_and_best_hits_win() -> None:
    long_text = "word " * 60
    ranked = [Around(_msg(i, "user", f"hit {i} " + long_text), _msg(i - 1, "assistant", "x"),
                     _msg(i + 1, "assistant", "y")) for i in range(100, 200, 10)]
    got = fit_recalled(ranked, budget=200)
    assert 0 < got.tokens <= 200
    assert count_tokens(got.text) + MESSAGE_OVERHEAD <= 200
    assert got.hit_ids[0] == 100  # the best hit made it
    assert fit_recalled(ranked, budget=10).text == ""  # the header alone doesn't fit


def test_a_hit_too_long_for_the_room_is_clipped_not_dropped() -> None:
    hit = _msg(5, "user", "The code for the garage is 4417. " + "blah " * 500)
    got = fit_recalled([Around(hit)], budget=120)
    assert "4417" in got.text and got.text.endswith("…")
    assert got.tokens <= 120


@given(st.lists(st.tuples(st.sampled_from(["user", "assistant"]),
                          st.text(min_size=1, max_size=400)), min_size=1, max_size=30),
       st.integers(0, 2000), st.floats(0.7, 1.6))
@settings(max_examples=150, deadline=None)
def test_fit_stays_within_budget_for_any_messages(
        msgs: list[tuple[str, str]], budget: int, factor: float) -> None:
    rows = [_msg(i, role, text) for i, (role, text) in enumerate(msgs)]
    ranked = [Around(m, rows[i - 1] if i else None, rows[i + 1] if i + 1 < len(rows) else None)
              for i, m in enumerate(rows)][::-1]
    got = fit_recalled(ranked, budget, factor=factor)
    assert got.tokens <= budget
    assert got.ids == sorted(set(got.ids))
    if got.text:
        import math
        # The reported cost is what the prompt is charged: never less than a recount.
        assert math.ceil((count_tokens(got.text) + MESSAGE_OVERHEAD) * factor) <= got.tokens


def test_lower_hits_go_in_before_the_neighbours_of_other_lower_hits() -> None:
    def around(i: int) -> Around:
        return Around(_msg(i, "user", f"hit number {i} " + "more " * 10),
                      _msg(i - 1, "assistant", "before " * 10),
                      _msg(i + 1, "assistant", "after " * 10))

    ranked = [around(i) for i in (10, 20, 30, 40)]
    # Room for six lines (the seventh, 21, needs 244 by the current estimate):
    # the first hit with both neighbours, then the other hits alone (their neighbours
    # would have taken the room of the later hits).
    got = fit_recalled(ranked, budget=230, paired=1)
    assert got.hit_ids == [10, 20, 30, 40]
    assert got.ids == [9, 10, 11, 20, 30, 40]
    assert got.tokens <= 230
    # Paired all the way, the same room holds fewer hits.
    assert fit_recalled(ranked, budget=230, paired=4).hit_ids == [10, 20]


def test_neighbours_that_cannot_fit_are_not_counted_whole() -> None:
    # Hits fill the room; each long neighbour is seen not to fit from its beginning
    # (a cold count costs about 20 µs a line, and a turn offers up to 50 of them).
    counted: list[str] = []

    def counter(text: str) -> int:
        counted.append(text)
        return count_tokens(text)

    long_text = "a long neighbour about the garden and the weather " * 20
    ranked = [Around(_msg(i, "user", f"hit number {i} about the garage code"),
                     _msg(i - 1, "assistant", long_text), _msg(i + 1, "assistant", long_text))
              for i in range(10, 400, 10)]
    got = fit_recalled(ranked, budget=300, counter=counter)
    assert got.hit_ids and len(got.messages) == len(got.hit_ids)  # no neighbour fitted
    assert not [t for t in counted if long_text in t]
