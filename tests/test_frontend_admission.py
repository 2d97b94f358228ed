"""The front door under load: admission queue, readiness, API key, first-byte timeout, stop, busy ports.

Real frontends, real simulated engines (:class:`pdkit.sim.server.SimWorker`) and real sockets on
loopback.  Stand-ins, named as such: ``hung_engine`` (an HTTP server that sends headers and then
nothing, because no real engine hangs on cue) and ``header_echo_engine`` (records the headers it got).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from loopback import frontend, post, serve, sim

from pdkit import prom
from pdkit.frontend import server as server_mod
from pdkit.frontend.server import Frontend
from pdkit.frontend.testing import announce, wait_until
from pdkit.protocol import Load
from pdkit.sim.server import SimWorker

LONG = "The quick brown fox jumps over the lazy dog. " * 12


async def successes(http: aiohttp.ClientSession, w: SimWorker) -> float:
    async with http.get(w.url + "/metrics") as r:
        return prom.total(await r.text(), "vllm:request_success_total")


def record_max_inflight(fe: Frontend) -> dict[str, int]:
    """Wraps the frontend's slot hold to record each worker's highest in-flight count (a probe, no fake)."""
    peak: dict[str, int] = {}
    hold = fe._hold

    def probe(w: Any) -> Any:
        out = hold(w)
        peak[w.worker_id] = max(peak.get(w.worker_id, 0), w.inflight)
        return out

    fe._hold = probe  # type: ignore[method-assign]
    return peak


async def test_burst_of_600_is_queued_not_refused_and_cap_holds() -> None:
    async with AsyncExitStack() as st:
        p, d = await sim(st, "prefill"), await sim(st, "decode")
        fe = await frontend(st, {"p": ("prefill", p.url), "d": ("decode", d.url)}, max_inflight_per_worker=8)
        peak = record_max_inflight(fe)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

            async def one(i: int) -> int:
                body = {"prompt": f"{i} {LONG}", "max_tokens": 3, "stream": i % 2 == 0}
                async with http.post(fe.url + "/v1/completions", json=body) as r:
                    await r.read()
                    return r.status

            statuses = await asyncio.gather(*(one(i) for i in range(600)))
            assert statuses.count(200) == 600, {s: statuses.count(s) for s in set(statuses)}
            assert peak == {"p": 8, "d": 8}  # the queue filled every slot and never went past the cap
            # every prefill that ran had its decode: the engines' own success counters agree
            assert await successes(http, p) == await successes(http, d) == 600
        m = fe.metrics.render().decode()
        assert prom.total(m, "pdkit_admission_queue_wait_seconds_count", role="prefill") == 600
        assert prom.total(m, "pdkit_admission_rejections_total") == 0
        assert prom.total(m, "pdkit_admission_queue_depth") == 0


async def test_queue_full_and_queue_timeout_give_503_naming_key_and_flag(http: aiohttp.ClientSession) -> None:
    async with AsyncExitStack() as st:
        a = await sim(st, "agg", time_scale=1.0)
        fe = await frontend(st, {"a": ("agg", a.url)}, mode="agg", max_inflight_per_worker=1, max_queued=1,
                            queue_timeout_s=0.5)  # fmt: skip
        async with http.post(
            fe.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3000, "stream": True}
        ) as r:
            await r.content.readany()  # holds the only slot
            queued = asyncio.create_task(post(http, fe.url + "/v1/completions", {"prompt": "hi", "max_tokens": 2}))
            await wait_until(lambda: fe.admission.depth("agg") == 1)
            status, headers, body = await post(http, fe.url + "/v1/completions", {"prompt": "hi"})
            assert status == 503 and headers["Retry-After"] == "1"
            message = json.loads(body)["error"]["message"]
            assert "frontend.max_queued" in message and "--max-queued" in message
            status, headers, body = await queued  # waited 0.5 s for the slot the stream holds
            assert status == 503 and "Retry-After" in headers
            message = json.loads(body)["error"]["message"]
            assert "frontend.queue_timeout_s" in message and "--queue-timeout-s" in message
            r.close()
        m = fe.metrics.render().decode()
        assert prom.total(m, "pdkit_admission_rejections_total", reason="queue_full") == 1
        assert prom.total(m, "pdkit_admission_rejections_total", reason="queue_timeout") == 1


async def test_full_decode_refuses_before_any_prefill_runs(http: aiohttp.ClientSession) -> None:
    async with AsyncExitStack() as st:
        p, d = await sim(st, "prefill"), await sim(st, "decode", time_scale=1.0)
        fe = await frontend(st, {"p": ("prefill", p.url), "d": ("decode", d.url)}, max_inflight_per_worker=1,
                            max_queued=0)  # fmt: skip
        body = {"prompt": LONG, "max_tokens": 3000, "stream": True}
        async with http.post(fe.url + "/v1/completions", json=body) as r:
            await r.content.readany()  # decoding: holds the decode slot, the prefill slot is free again
            assert fe.registry.workers["p"].inflight == 0
            status, _, _ = await post(http, fe.url + "/v1/completions", {"prompt": LONG, "max_tokens": 2})
            assert status == 503
            assert await successes(http, p) == 1  # no prefill was spent on the refused request
            r.close()


async def test_fifo_order_disconnect_leaves_queue_and_stop_answers_queued_503(http: aiohttp.ClientSession) -> None:
    async with AsyncExitStack() as st:
        a = await sim(st, "agg", time_scale=1.0)
        fe = await frontend(st, {"a": ("agg", a.url)}, mode="agg", max_inflight_per_worker=1)
        order: list[int] = []

        async def queued(i: int) -> int:
            status, _, _ = await post(http, fe.url + "/v1/completions", {"prompt": f"r{i}", "max_tokens": 2})
            order.append(i)
            return status

        async with http.post(
            fe.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3000, "stream": True}
        ) as r:
            await r.content.readany()
            tasks = []
            for i in range(4):
                tasks.append(asyncio.create_task(queued(i)))
                await wait_until(lambda n=i + 1: len(fe.admission) == n)  # type: ignore[misc]
            tasks[1].cancel()  # this client hangs up while queued: it leaves the queue
            await wait_until(lambda: len(fe.admission) == 3)
            r.close()  # the slot frees: the others run one at a time, oldest first
            assert [await t for t in (tasks[0], tasks[2], tasks[3])] == [200, 200, 200]
        assert order == [0, 2, 3]

        async with http.post(
            fe.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3000, "stream": True}
        ) as r:
            await r.content.readany()
            waiting = asyncio.create_task(post(http, fe.url + "/v1/completions", {"prompt": "x"}))
            await wait_until(lambda: len(fe.admission) == 1)
            stopping = asyncio.create_task(fe.stop(grace_s=30))
            status, headers, body = await waiting  # at once, while the stream still runs
            assert status == 503 and "shutting down" in body and "Retry-After" in headers
            assert not stopping.done()
            r.close()
            await stopping
        assert prom.total(fe.metrics.render().decode(), "pdkit_admission_rejections_total", reason="draining") == 1


async def test_stream_outliving_the_stop_grace_ends_with_an_error_event(http: aiohttp.ClientSession) -> None:
    async with AsyncExitStack() as st:
        a = await sim(st, "agg", time_scale=1.0)
        fe = await frontend(st, {"a": ("agg", a.url)}, mode="agg")
        async with http.post(
            fe.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3000, "stream": True}
        ) as r:
            first = await r.content.readany()
            await fe.stop(grace_s=0.2)
            rest = await r.read()
        events = [e[len("data: ") :] for e in (first + rest).decode().split("\n\n") if e.startswith("data: ")]
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
        assert err["code"] == 503 and "shutting down" in err["message"]
        assert prom.total(fe.metrics.render().decode(), "pdkit_requests_total", status="shutdown_cut") == 1


async def test_readiness_needs_every_role_live_and_healthy(http: aiohttp.ClientSession) -> None:
    async with AsyncExitStack() as st:
        p, d = await sim(st, "prefill"), await sim(st, "decode")
        fe = await frontend(st, {})

        async def readiness() -> tuple[int, dict[str, Any]]:
            async with http.get(fe.url + "/readiness") as r:
                return r.status, await r.json()

        async with http.get(fe.url + "/health") as h:
            assert h.status == 200  # liveness: the process serves
        assert await readiness() == (503, {"ready": False, "mode": "disagg", "live": {"prefill": 0, "decode": 0},
                                           "missing": ["prefill", "decode"]})  # fmt: skip
        cd = await announce(fe.zmq_endpoint, d.url, "decode", "d", interval_s=0.05)
        st.push_async_callback(cd.close)
        status, data = await readiness()
        assert status == 503 and data["missing"] == ["prefill"]
        cp = await announce(fe.zmq_endpoint, p.url, "prefill", "p", interval_s=0.05)
        st.push_async_callback(cp.close)
        status, data = await readiness()
        assert status == 200 and data["missing"] == [] and data["live"] == {"prefill": 1, "decode": 1}
        cp.load = Load(healthy=False, unhealthy_reason="engine /health timed out")
        await wait_until(lambda: not fe.registry.workers["p"].load.healthy)
        status, data = await readiness()
        assert status == 503 and data["missing"] == ["prefill"]
        async with http.get(fe.url + "/workers") as r:
            entry = next(w for w in (await r.json())["workers"] if w["worker_id"] == "p")
        assert entry["healthy"] is False and entry["load"]["unhealthy_reason"] == "engine /health timed out"


async def test_unhealthy_worker_gets_no_new_requests(http: aiohttp.ClientSession) -> None:
    async with AsyncExitStack() as st:
        a, b = await sim(st, "agg"), await sim(st, "agg")
        fe = await frontend(st, {"a": ("agg", a.url)}, mode="agg")
        cb = await announce(fe.zmq_endpoint, b.url, "agg", "b", interval_s=0.05)
        st.push_async_callback(cb.close)
        cb.load = Load(healthy=False, unhealthy_reason="wedged")
        await wait_until(lambda: not fe.registry.workers["b"].load.healthy)
        for _ in range(4):
            status, _, _ = await post(http, fe.url + "/v1/completions", {"prompt": "hi", "max_tokens": 2})
            assert status == 200
        assert await successes(http, a) == 4 and await successes(http, b) == 0
        await cb.stop_heartbeats()
        fe.registry.remove("a", "test")  # only the unhealthy one left: 503 at once, naming the reason
        status, _, body = await post(http, fe.url + "/v1/completions", {"prompt": "hi"})
        assert status == 503 and "wedged" in json.loads(body)["error"]["message"]


async def test_api_key_guards_v1_and_the_header_reaches_the_engine(http: aiohttp.ClientSession) -> None:
    seen: list[str | None] = []

    async def header_echo_engine(request: web.Request) -> web.Response:  # stand-in: records headers
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"choices": [{"index": 0, "text": "ok", "finish_reason": "length"}]})

    async with AsyncExitStack() as st:
        url = await serve(st, header_echo_engine)
        fe = await frontend(st, {"a": ("agg", url)}, mode="agg", api_key="s3cret")
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            status, _, body = await post(http, fe.url + "/v1/completions", {"prompt": "x"}, headers=headers)
            assert status == 401 and json.loads(body) == {"error": "Unauthorized"}
        async with http.get(fe.url + "/v1/models") as r:
            assert r.status == 401
        ok = {"Authorization": "Bearer s3cret"}
        status, _, _ = await post(http, fe.url + "/v1/completions", {"prompt": "x"}, headers=ok)
        assert status == 200 and seen == ["Bearer s3cret"]  # forwarded: engines may check their own key
        for path in ("/health", "/readiness", "/metrics"):
            async with http.get(fe.url + path) as r:
                assert r.status == 200, path


async def test_decode_without_first_byte_in_time_is_retried_elsewhere(http: aiohttp.ClientSession) -> None:
    async def hung_engine(request: web.Request) -> web.StreamResponse:  # stand-in: headers, then silence
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await asyncio.sleep(3600)
        return resp

    async with AsyncExitStack() as st:
        url = await serve(st, hung_engine)
        b = await sim(st, "agg")
        # round robin sorts by id: "a-hung" is tried first
        fe = await frontend(st, {"a-hung": ("agg", url), "b": ("agg", b.url)}, mode="agg",
                            decode_first_byte_timeout_s=0.3)  # fmt: skip
        status, _, body = await post(http, fe.url + "/v1/completions", {"prompt": "x", "max_tokens": 3, "stream": True})
        assert status == 200 and body.endswith("data: [DONE]\n\n")
        m = fe.metrics.render().decode()
        assert prom.total(m, "pdkit_retries_total", role="agg", reason="first_byte_timeout") == 1
        assert fe.registry.workers["a-hung"].inflight == 0


async def test_context_length_is_counted_exactly_only_when_the_cheap_bound_does_not_fit(
    http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, int, bool]] = []

    real = server_mod.check_context_length

    def recorder(prompt_tokens: int, body: dict[str, Any], max_model_len: int, *, exact: bool) -> bool:
        calls.append((prompt_tokens, max_model_len, exact))  # a probe around the validation module
        return real(prompt_tokens, body, max_model_len, exact=exact)

    monkeypatch.setattr(server_mod, "check_context_length", recorder)
    async with AsyncExitStack() as st:
        a = await sim(st, "agg")
        fe = await frontend(st, {"a": ("agg", a.url)}, mode="agg", max_model_len=400)
        assert (await post(http, fe.url + "/v1/completions", {"prompt": "hi", "max_tokens": 2}))[0] == 200
        assert [c for c in calls if c[2]] == []  # 2 bytes + allowance + 2 tokens fit: no tokenizing
        assert (await post(http, fe.url + "/v1/completions", {"prompt": LONG, "max_tokens": 2}))[0] == 200
        from pdkit.model_files import default_model_dir
        from pdkit.prompt_tokens import load_prompt_tokenizer

        want = len(load_prompt_tokenizer(str(default_model_dir())).request_ids({"prompt": LONG}, False))
        assert [c for c in calls if c[2]] == [(want, 400, True)]


def _held_port() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s, s.getsockname()[1]


def _free_port() -> int:
    s, port = _held_port()
    s.close()
    return port


@pytest.mark.parametrize(
    ("flag", "key"),
    # the KV-events port binds nothing any more: the frontend connects to each worker's own publisher
    [("--port", "frontend.port"), ("--zmq-port", "frontend.zmq_port")],
)
def test_busy_port_exits_2_naming_flag_and_key(flag: str, key: str) -> None:
    holder, busy = _held_port()
    try:
        ports = {"--port": _free_port(), "--zmq-port": _free_port(), "--kv-events-port": _free_port(), flag: busy}
        argv = [sys.executable, "-m", "pdkit.cli", "frontend"]
        for name, port in ports.items():
            argv += [name, str(port)]
        # the timeout only guards against the old hang; the exit itself comes within a few seconds
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, env={**os.environ})
    finally:
        holder.close()
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("pdkit frontend:")]
    assert len(lines) == 1 and str(busy) in lines[0] and flag in lines[0] and key in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


# Issue 18's invalid bodies: vLLM 0.26 answers 400 for each; the frontend must too, before any prefill.
INVALID_BODIES = [
    {"max_tokens": "abc"},
    {"max_tokens": 8, "min_tokens": 9},
    {"temperature": "hot"},
    {"temperature": -3},
    {"top_p": 5},
    {"presence_penalty": 99},
    {"top_k": -5},
    {"seed": "x"},
    {"frequency_penalty": "a"},
    {"logit_bias": "x"},
    {"user": 5},
    {"max_tokens": 100_000},  # beyond max_model_len
]


@pytest.mark.parametrize("api", ["completions", "chat"])
async def test_an_invalid_request_costs_no_prefill_token(http: aiohttp.ClientSession, api: str) -> None:
    async with AsyncExitStack() as st:
        p, d = await sim(st, "prefill"), await sim(st, "decode")
        fe = await frontend(st, {"p": ("prefill", p.url), "d": ("decode", d.url)}, max_model_len=8192)
        path, base = (
            ("/v1/completions", {"prompt": LONG}) if api == "completions" else
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]})
        )  # fmt: skip
        for bad in INVALID_BODIES:
            status, _, text = await post(http, fe.url + path, {**base, **bad})
            assert status == 400, (bad, text)
            assert json.loads(text)["error"]["code"] == 400
        async with http.get(p.url + "/metrics") as r:
            assert prom.total(await r.text(), "vllm:prompt_tokens_total") == 0  # not one prefill token spent
        assert (await post(http, fe.url + path, {**base, "max_tokens": 4}))[0] == 200  # and valid ones still work
        async with http.get(p.url + "/metrics") as r:
            assert prom.total(await r.text(), "vllm:prompt_tokens_total") > 0  # the counter is the real one
