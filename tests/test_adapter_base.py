"""The adapter contract: run's order, in-flight tracking, drain then cancel, collect."""

from __future__ import annotations

import asyncio

from adapters.base import Adapter
from bot.reply import Outcome, Reply
from bot.service import ChatService
from tests.conftest import SettingsFactory, incoming
from tests.fakes.model_server import ModelServer


class Recording(Adapter[list[str]]):
    """An adapter whose platform is a list: it records what the contract calls."""

    name = "recording"

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.calls: list[str] = []
        self.listening = asyncio.Event()

    async def connect(self) -> None:
        self.calls.append("connect")
        self._connected = True

    async def listen(self, stop: asyncio.Event) -> None:
        self.calls.append(f"listen connected={self.connected}")
        self.listening.set()
        await stop.wait()

    async def send(self, reply: Reply, to: list[str]) -> None:
        to.append(await self.collect(reply))

    async def disconnect(self) -> None:
        self.calls.append(f"disconnect connected={self.connected}")
        await self.drain(0.2)


async def test_run_connects_listens_and_disconnects(make_settings: SettingsFactory,
                                                    service: ChatService) -> None:
    adapter = Recording(make_settings())
    stop = asyncio.Event()
    task = asyncio.create_task(adapter.run(service, stop))
    async with asyncio.timeout(5):
        await adapter.listening.wait()
        shown: list[str] = []
        await adapter.send(await service.handle(incoming("/help")), shown)
        stop.set()
        await task
    assert adapter.calls == ["connect", "listen connected=True", "disconnect connected=False"]
    assert shown[0].startswith("I'm a chat assistant") and "/help" in shown[0]
    assert not adapter.connected


async def test_drain_lets_replies_finish_then_cancels_the_rest(
        make_settings: SettingsFactory) -> None:
    adapter = Recording(make_settings())
    finishing, release = asyncio.Event(), asyncio.Event()
    started = [asyncio.Event(), asyncio.Event()]
    ended: list[str] = []

    async def reply(i: int, wait: asyncio.Event) -> None:
        with adapter.tracked():
            started[i].set()
            try:
                await wait.wait()
                ended.append(f"{i} done")
            except asyncio.CancelledError:
                ended.append(f"{i} cancelled")
                raise

    quick = asyncio.create_task(reply(0, finishing))
    stuck = asyncio.create_task(reply(1, release))
    async with asyncio.timeout(5):
        for event in started:
            await event.wait()
        assert adapter.in_flight == 2
        finishing.set()
        await adapter.drain(0.3)
    assert ended == ["0 done", "1 cancelled"]
    assert quick.done() and stuck.cancelled() and adapter.in_flight == 0


async def test_drain_with_nothing_in_flight_returns_at_once(
        make_settings: SettingsFactory) -> None:
    adapter = Recording(make_settings())
    async with asyncio.timeout(1):
        await adapter.drain(60)
    assert adapter.in_flight == 0


async def test_an_unread_answer_let_go_is_cancelled_and_never_runs(
        service: ChatService, model_server: ModelServer) -> None:
    reply = await service.handle(incoming("hello"))
    await reply.aclose()
    assert reply.outcome is Outcome.CANCELLED
    assert model_server.requests == [] and await service.store.audit_log(5) == []
