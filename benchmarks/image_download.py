"""Image downloads: how long a capped download of a 10 MB picture takes on loopback, how
much of a lying 64 MB body is sent before the cap stops it, and what the base64 of a
10 MB picture costs (Ollama's and OpenAI's forms).

    .venv/bin/python -m benchmarks.image_download
"""

from __future__ import annotations

import asyncio
import base64
import statistics
import time

import httpx
from aiohttp import web

from bot.images import Image, ImageTooLarge, download

LIMIT = 10_000_000
PICTURE = bytes(range(256)) * (LIMIT // 256)  # just under 10 MB
LIE = 64_000_000


async def main() -> None:
    sent = {"lie": 0}

    async def honest(request: web.Request) -> web.Response:
        return web.Response(body=PICTURE)

    async def liar(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()  # chunked: no Content-Length to refuse it by
        await response.prepare(request)
        piece = b"\0" * 65_536
        try:
            while sent["lie"] < LIE:
                await response.write(piece)
                sent["lie"] += len(piece)
        except ConnectionError:
            pass
        return response

    app = web.Application()
    app.add_routes([web.get("/honest", honest), web.get("/liar", liar)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    async with httpx.AsyncClient() as client:
        times = []
        for _ in range(5):
            started = time.perf_counter()
            data = await download(client, f"{base}/honest", LIMIT)
            times.append(time.perf_counter() - started)
        assert data == PICTURE
        started = time.perf_counter()
        try:
            await download(client, f"{base}/liar", LIMIT)
        except ImageTooLarge:
            pass
        stopped = time.perf_counter() - started
    await runner.cleanup()
    image = Image(PICTURE, "image/jpeg")
    started = time.perf_counter()
    base64.b64encode(image.data)
    b64 = time.perf_counter() - started
    print(f"10 MB capped download, median of 5: {statistics.median(times) * 1000:.0f} ms")
    print(f"lying 64 MB chunked body: stopped after {stopped * 1000:.0f} ms, "
          f"{sent['lie'] / 1e6:.1f} MB sent by the server")
    print(f"base64 of 10 MB (done in a worker thread at download): {b64 * 1000:.0f} ms, "
          f"{len(image.data_url()) / 1e6:.1f} MB as a data: URL")


if __name__ == "__main__":
    asyncio.run(main())
