"""Upstream keep-alive: vLLM's uvicorn closes idle connections after 5 s.  The frontend must not turn a
pooled connection that the engine already closed into a failed request.  The upstream here is a stub
that closes idle connections after 0.2 s, as uvicorn does after 5 s; the frontend is the real one over
real HTTP and ZMQ."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from pdkit import prom
from pdkit.frontend.server import Frontend
from pdkit.frontend.settings import FrontendSettings
from pdkit.frontend.testing import announce


async def _completion(request: web.Request) -> web.Response:
    await request.read()
    body = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "synth",
            "choices": [{"index": 0, "text": "ok", "finish_reason": "length", "logprobs": None}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}  # fmt: skip
    return web.json_response(body)


@pytest.fixture
async def quick_closing_upstream() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/v1/completions", _completion)
    runner = web.AppRunner(app, keepalive_timeout=0.2)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock)
    await site.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    await runner.cleanup()


async def test_request_after_idle_pause_survives_a_closed_pooled_connection(quick_closing_upstream: str) -> None:
    fe = Frontend(FrontendSettings(port=0, zmq_port=0, mode="agg", heartbeat_interval_s=0.1))
    await fe.start()
    client = await announce(fe.zmq_endpoint, quick_closing_upstream, "agg", "agg-0", interval_s=0.05)
    try:
        async with aiohttp.ClientSession() as http:
            body = {"model": "synth", "prompt": "hi", "max_tokens": 1}
            for _ in range(3):
                async with http.post(f"{fe.url}/v1/completions", json=body) as resp:
                    assert resp.status == 200, await resp.text()
                await asyncio.sleep(0.5)  # the upstream closes the idle pooled connection meanwhile
            async with http.get(f"{fe.url}/metrics") as resp:
                text = await resp.text()
        assert prom.total(text, "pdkit_requests_total", status="200") == 3
    finally:
        await client.close()
        await fe.stop(1.0)
