"""bot/embeddings.py through the real ollama and openai clients against the stand-in."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from bot.embeddings import Embedder
from tests.fakes.model_server import ModelServer, closed_port_url


def _embedder(srv: ModelServer, kind: str, **kw: object) -> Embedder:
    if kind == "ollama":
        return Embedder("ollama", "llama3.2", host=srv.url, **kw)  # type: ignore[arg-type]
    return Embedder("openai", "llama3.2", base_url=srv.url + "/v1", api_key="k",
                    **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["ollama", "openai"])
async def test_batches_of_inputs_come_back_in_order(model_server: ModelServer,
                                                    kind: str) -> None:
    model_server.embeddings.phrases = {"tainan": [1.0, 0.0, 0.0], "sister lives": [0.9, 0.1, 0]}
    emb = _embedder(model_server, kind, batch=2)
    try:
        texts = ["My sister moved to Tainan", "where my sister lives now", "ramen", "x"]
        got = await emb.embed(texts)
    finally:
        await emb.close()
    assert got is not None and len(got) == 4
    assert got[0] == pytest.approx([1.0, 0.0, 0.0])  # the phrase map, exactly (float32)
    a, b = np.array(got[0]), np.array(got[1])
    assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.98  # similar on purpose
    assert len(got[2]) == model_server.embeddings.dim
    # What crossed the wire: two batched requests with `input` as a list, the real route.
    reqs = model_server.embeddings.requests
    route = "/api/embed" if kind == "ollama" else "/v1/embeddings"
    assert [r["route"] for r in reqs] == [route, route]
    assert [r["input"] for r in reqs] == [texts[:2], texts[2:]]
    assert all(r["model"] == "llama3.2" for r in reqs)


async def test_hashed_vectors_are_deterministic_and_word_sensitive(
        model_server: ModelServer) -> None:
    emb = _embedder(model_server, "ollama")
    try:
        first = await emb.embed(["red apple pie", "red apple", "blue sky"])
        again = await emb.embed(["red apple pie"])
    finally:
        await emb.close()
    assert first is not None and again is not None
    assert first[0] == again[0]
    v = [np.array(x) for x in first]
    assert v[0] @ v[1] > v[0] @ v[2]


@pytest.mark.parametrize("kind", ["ollama", "openai"])
async def test_errors_return_none_not_an_exception(model_server: ModelServer,
                                                   kind: str) -> None:
    model_server.embeddings.fault = "http500"
    emb = _embedder(model_server, kind)
    try:
        assert await emb.embed(["hello"]) is None
        assert emb.failures == 1
        model_server.embeddings.fault = None
        assert await emb.embed_one("hello") is not None
    finally:
        await emb.close()


@pytest.mark.parametrize("kind", ["ollama", "openai"])
async def test_a_hanging_server_times_out_to_none(model_server: ModelServer, kind: str) -> None:
    model_server.embeddings.fault = "hang"
    emb = _embedder(model_server, kind, timeout=0.3)
    try:
        async with asyncio.timeout(5):
            assert await emb.embed(["hello"]) is None
    finally:
        await emb.close()
    assert len(model_server.embeddings.requests) == 1


async def test_unknown_model_and_refused_connection_return_none(
        model_server: ModelServer) -> None:
    emb = Embedder("ollama", "no-such-model", host=model_server.url)
    down = Embedder("openai", "m", base_url=await closed_port_url() + "/v1")
    try:
        assert await emb.embed(["hello"]) is None
        assert await down.embed(["hello"]) is None
        assert await emb.embed([]) == []
    finally:
        await emb.close()
        await down.close()


async def test_legacy_ollama_route_answers_with_the_real_field(
        model_server: ModelServer) -> None:
    import ollama

    client = ollama.AsyncClient(host=model_server.url)
    got = await client.embeddings(model="llama3.2", prompt="hello there")
    assert len(got.embedding) == model_server.embeddings.dim
    assert model_server.embeddings.requests[-1] == {
        "route": "/api/embeddings", "model": "llama3.2", "input": "hello there"}
