"""Helpers for tests that run real pdkit servers (frontend, simulated workers) on loopback.

Why a module: the frontend, seeding and failure tests each built the same simulated worker, the same
ZMQ-announced frontend and the same small HTTP readers; one copy here keeps their settings (hash seed,
time scale, heartbeat and liveness timing) the same everywhere, so a change of timing is made once.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
from aiohttp import web

from pdkit.frontend.server import Frontend
from pdkit.frontend.settings import FrontendSettings
from pdkit.frontend.testing import announce
from pdkit.routing.kv_index import KvIndex
from pdkit.sim.server import SimWorker
from pdkit.sim.settings import SimSettings


async def sim(stack: AsyncExitStack, role: str, **kw: Any) -> SimWorker:
    """A simulated worker of ``role`` on loopback, stopped with ``stack``; no simulated delays by default."""
    kw.setdefault("time_scale", 0)
    settings = SimSettings(role=role, hash_seed="0", **kw)  # type: ignore[arg-type]
    return await stack.enter_async_context(SimWorker(settings))


async def frontend(
    stack: AsyncExitStack, workers: dict[str, tuple[str, str]], *, announce_kw: dict[str, Any] | None = None, **kw: Any
) -> Frontend:
    """A frontend with ``workers`` (id -> (role, url)) announced over ZMQ; ``announce_kw`` adds WorkerInfo fields."""
    kw.setdefault("policy", "round_robin")
    # fast heartbeats, but a liveness a busy 2-core CI host cannot trip by accident (none of these tests
    # is about liveness; a reaped worker would turn their 200s and 503s into "no worker registered")
    kw.setdefault("liveness_timeout_s", 5.0)
    fe = Frontend(FrontendSettings(port=0, zmq_port=0, heartbeat_interval_s=0.1, **kw))
    await fe.start()
    stack.push_async_callback(fe.stop, 1.0)
    for wid, (role, url) in workers.items():
        c = await announce(fe.zmq_endpoint, url, role, wid, interval_s=0.05, **(announce_kw or {}))
        stack.push_async_callback(c.close)
    return fe


async def post(http: aiohttp.ClientSession, url: str, body: Any, **kw: Any) -> tuple[int, dict[str, str], str]:
    """POST ``body`` as JSON; (status, headers, body text)."""
    async with http.post(url, json=body, **kw) as r:
        return r.status, dict(r.headers), await r.text()


async def post_json(http: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    """POST ``body`` as JSON; (status, parsed JSON answer whatever its content type)."""
    async with http.post(url, json=body) as r:
        return r.status, await r.json(content_type=None)


async def text_of(http: aiohttp.ClientSession, url: str) -> str:
    """GET ``url``'s body as text (metrics pages, health)."""
    async with http.get(url) as r:
        return await r.text()


def closed_port_url() -> str:
    """The URL of a loopback port nothing listens on (a worker that died before it answered)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def sse_events(raw: bytes) -> list[Any]:
    """The ``data:`` payloads of an SSE body, parsed; the final ``[DONE]`` is kept as a string."""
    out: list[Any] = []
    for block in raw.split(b"\n\n"):
        line = block.strip()
        if line.startswith(b"data: "):
            payload = line[len(b"data: ") :]
            out.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return out


def sse_summary(raw: bytes, chat: bool) -> dict[str, Any]:
    """What a client reads from an OpenAI stream (``chat``: /v1/chat/completions deltas, else completion
    texts): text, token ids, finish/stop reason, usage, the (id, object, model) triples seen and how many
    ``[DONE]`` markers came. Asserts the stream ends with ``[DONE]`` and carries no error event."""
    text, ids, finish, stop, usage, rids = "", [], None, None, None, set()
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    for ev in events[:-1]:
        assert "error" not in ev, ev
        rids.add((ev["id"], ev["object"], ev["model"]))
        if ev.get("usage") and not ev["choices"]:
            usage = ev["usage"]
        for c in ev["choices"]:
            text += (c["delta"].get("content") or "") if chat else c["text"]
            ids += c.get("token_ids") or []
            if c.get("finish_reason") is not None:
                finish, stop = c["finish_reason"], c.get("stop_reason")
    return {"text": text, "ids": ids, "finish": finish, "stop": stop, "usage": usage, "rids": rids,
            "dones": events.count("[DONE]")}  # fmt: skip


async def serve(stack: AsyncExitStack, handler: Any) -> str:
    """A stand-in engine on loopback answering ``POST /v1/completions`` with ``handler``; its base URL."""
    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    stack.push_async_callback(runner.cleanup)
    return f"http://127.0.0.1:{runner.addresses[0][1]}"


async def bring_kv_links_up(http: aiohttp.ClientSession, fe: Frontend, sims: dict[str, SimWorker]) -> None:
    """Send one-token requests to each worker until the frontend's KV index has heard from it.

    ZMQ drops what a PUB->SUB link misses before it is connected, so a test that counts KV events must
    first see each link carry one.
    """
    for wid, w in sims.items():
        for i in range(500):
            body = {"model": "synth", "prompt": f"link check {wid} {i} " * 3, "max_tokens": 1}
            async with http.post(w.url + "/v1/completions", json=body) as r:
                assert r.status == 200
            st = fe.kv.index.worker(wid)
            if st is not None and st.last_seq is not None:
                break
            await asyncio.sleep(0.01)


async def wait_for(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll until ``cond`` holds (a bound on waiting, not an assertion on timing)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.01)


async def index_synced(index: KvIndex, w: SimWorker, wid: str) -> None:
    """Wait until ``index`` has applied everything the simulated worker's KV event publisher sent."""
    assert await asyncio.to_thread(w.publisher.wait_idle)

    def done() -> bool:
        st = index.worker(wid)
        return st is not None and st.last_seq == w.publisher.next_seq - 1

    await wait_for(done, f"{wid} synced")
