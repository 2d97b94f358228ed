"""Failure handling of the frontend, end to end on CPU with simulated workers over real sockets.

Dead workers are registered URLs whose port is closed (a real connection refusal).  The only stand-in
is ``broken_upstream``: an HTTP server that sends one SSE event and drops the connection, because no
real engine can be made to break a stream on cue.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import AsyncExitStack

import aiohttp
import pytest
from aiohttp import web
from loopback import closed_port_url, frontend, post, serve, sim, text_of

from pdkit import prom
from pdkit.frontend.testing import announce, sse_text, wait_until

LONG = "The quick brown fox jumps over the lazy dog. " * 12


async def test_dead_prefill_worker_retried_on_another(http: aiohttp.ClientSession) -> None:
    async with AsyncExitStack() as st:
        p, d = await sim(st, "prefill"), await sim(st, "decode")
        # round robin sorts by id: "a-dead" is tried first
        fe = await frontend(
            st, {"a-dead": ("prefill", closed_port_url()), "b-p": ("prefill", p.url), "d": ("decode", d.url)}
        )
        status, _, body = await post(http, fe.url + "/v1/completions", {"prompt": LONG, "max_tokens": 5})
        assert status == 200, body
        m = fe.metrics.render().decode()
        assert prom.total(m, "pdkit_retries_total", role="prefill", reason="connect_error") == 1
        assert prom.total(m, "pdkit_fallbacks_total") == 0
        assert (
            prom.total(
                await text_of(http, d.url + "/metrics"), "pdkit_sim:kv_transfer_bytes_total", direction="received"
            )
            > 0
        )


async def test_all_prefills_dead_falls_back_to_local_prefill(http: aiohttp.ClientSession) -> None:
    async with AsyncExitStack() as st:
        d, ref = await sim(st, "decode"), await sim(st, "agg")
        fe = await frontend(st, {"p": ("prefill", closed_port_url()), "d": ("decode", d.url)})
        req = {"prompt": LONG, "max_tokens": 6}
        status, _, body = await post(http, fe.url + "/v1/completions", req)
        assert status == 200, body
        _, _, want = await post(http, ref.url + "/v1/completions", req)
        assert json.loads(body)["choices"][0]["text"] == json.loads(want)["choices"][0]["text"]
        m = fe.metrics.render().decode()
        assert prom.total(m, "pdkit_fallbacks_total", reason="connect_error") == 1
        assert (
            prom.total(
                await text_of(http, d.url + "/metrics"), "pdkit_sim:kv_transfer_bytes_total", direction="received"
            )
            == 0
        )


async def test_no_prefill_worker_registered_prefills_on_decode(http: aiohttp.ClientSession) -> None:
    async with AsyncExitStack() as st:
        d = await sim(st, "decode")
        fe = await frontend(st, {"d": ("decode", d.url)})
        status, _, _ = await post(
            http, fe.url + "/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}], "max_tokens": 3}
        )
        assert status == 200
        assert prom.total(fe.metrics.render().decode(), "pdkit_fallbacks_total", reason="no_prefill_worker") == 1


async def test_prefill_timeout_aborts_it_and_prefills_locally(http: aiohttp.ClientSession) -> None:
    async with AsyncExitStack() as st:
        slow = await sim(st, "prefill", time_scale=2000)  # one prefill step takes ~16 s
        d = await sim(st, "decode")
        fe = await frontend(st, {"p": ("prefill", slow.url), "d": ("decode", d.url)}, prefill_timeout_s=0.3)
        status, _, body = await post(http, fe.url + "/v1/completions", {"prompt": LONG, "max_tokens": 4})
        assert status == 200, body
        assert prom.total(fe.metrics.render().decode(), "pdkit_fallbacks_total", reason="timeout") == 1

        async def prefill_idle() -> bool:  # the timed-out prefill request was aborted, not left running
            m = await text_of(http, slow.url + "/metrics")
            return prom.total(m, "vllm:num_requests_running") + prom.total(m, "vllm:num_requests_waiting") == 0

        await wait_until(prefill_idle, timeout=20)


async def test_dead_decode_worker_retried_with_the_same_kv(http: aiohttp.ClientSession) -> None:
    async with AsyncExitStack() as st:
        p, d = await sim(st, "prefill"), await sim(st, "decode")
        fe = await frontend(
            st, {"p": ("prefill", p.url), "a-dead": ("decode", closed_port_url()), "b-d": ("decode", d.url)}
        )
        for stream in (False, True):
            status, _, body = await post(
                http, fe.url + "/v1/completions", {"prompt": LONG, "max_tokens": 5, "stream": stream}
            )
            assert status == 200, body
        m = fe.metrics.render().decode()
        assert prom.total(m, "pdkit_retries_total", role="decode", reason="connect_error") >= 1
        assert prom.total(m, "pdkit_fallbacks_total") == 0  # connection refused: the KV lease is untouched
        assert (
            prom.total(
                await text_of(http, d.url + "/metrics"), "pdkit_sim:kv_transfer_bytes_total", direction="received"
            )
            > 0
        )


@pytest.mark.parametrize("decoders", [("d0", "d1"), ("d",)], ids=["another_decoder", "only_decoder"])
@pytest.mark.parametrize("stream", [False, True])
async def test_failed_kv_load_retried_with_local_prefill(
    http: aiohttp.ClientSession, stream: bool, decoders: tuple[str, ...]
) -> None:
    """The prefill's lease expires before the decode reads it: the decode fails the request (HTTP 500, or
    an error event in a 200 stream, as vLLM does); nothing reached the client, so another decode
    worker serves it with a local prefill -- or, in 1P1D, the same one does (no 502 for the client)."""
    async with AsyncExitStack() as st:
        p = await sim(st, "prefill", kv_lease_s=1e-6)
        ref = await sim(st, "agg")
        workers = {"p": ("prefill", p.url)}
        for wid in decoders:
            workers[wid] = ("decode", (await sim(st, "decode")).url)
        fe = await frontend(st, workers)
        req = {"prompt": LONG, "max_tokens": 6, "stream": stream}
        status, _, body = await post(http, fe.url + "/v1/completions", req)
        assert status == 200, body
        _, _, want = await post(http, ref.url + "/v1/completions", req)
        if stream:
            assert sse_text(body) == sse_text(want) and '"error"' not in body
        else:
            assert json.loads(body)["choices"][0]["text"] == json.loads(want)["choices"][0]["text"]
        m = fe.metrics.render().decode()
        reason = "stream_error_event" if stream else "status_500"
        assert prom.total(m, "pdkit_retries_total", role="decode", reason=reason) == 1
        assert prom.total(m, "pdkit_fallbacks_total", reason=f"decode_{reason}") == 1
        assert all(fe.registry.workers[wid].inflight == 0 for wid in decoders)


async def test_only_decode_worker_failing_twice_gives_one_clear_502(http: aiohttp.ClientSession) -> None:
    """The same-worker retry happens once: an upstream that keeps failing ends with its own error."""
    async with AsyncExitStack() as st:
        p = await sim(st, "prefill")
        calls: list[int] = []

        async def handler(request: web.Request) -> web.Response:
            calls.append(1)
            return web.Response(status=503, text='{"error": {"message": "engine overloaded"}}')

        url = await serve(st, handler)
        fe = await frontend(st, {"p": ("prefill", p.url), "d": ("decode", url)})
        status, _, body = await post(http, fe.url + "/v1/completions", {"prompt": LONG, "max_tokens": 3})
        assert status == 503 and "engine overloaded" in body  # the worker's own error, passed through
        assert len(calls) == 2  # with the prefill's KV, then once more prefilling locally; not more


async def test_client_disconnect_aborts_upstream(http: aiohttp.ClientSession) -> None:
    async with AsyncExitStack() as st:
        p = await sim(st, "prefill")
        d = await sim(st, "decode", time_scale=1.0)  # ~7 ms per token: 4000 tokens would take ~30 s
        fe = await frontend(st, {"p": ("prefill", p.url), "d": ("decode", d.url)})
        async with http.post(
            fe.url + "/v1/completions", json={"prompt": LONG, "max_tokens": 4000, "stream": True}
        ) as r:
            assert r.status == 200
            await r.content.readany()
            r.close()  # hang up mid-stream

        async def decode_idle() -> bool:
            m = await text_of(http, d.url + "/metrics")
            return prom.total(m, "vllm:num_requests_running") + prom.total(m, "vllm:num_requests_waiting") == 0

        await wait_until(decode_idle, timeout=15)
        await wait_until(lambda: fe.registry.workers["d"].inflight == 0)
        m = fe.metrics.render().decode()
        assert prom.total(m, "pdkit_client_disconnects_total") == 1
        assert prom.total(m, "pdkit_requests_total", status="client_disconnect") == 1


async def test_saturation_and_no_workers_give_503_with_retry_after(http: aiohttp.ClientSession) -> None:
    # max_queued=0: no admission queue, so a request over the cap is refused at once (queue full)
    async with AsyncExitStack() as st:
        fe = await frontend(st, {}, mode="agg", max_inflight_per_worker=1, max_queued=0)
        status, headers, body = await post(http, fe.url + "/v1/completions", {"prompt": "hi"})
        assert status == 503 and headers["Retry-After"] == "1"
        err = json.loads(body)["error"]
        assert (
            err["code"] == 503 and "no agg worker is registered" in err["message"] and "pdkit worker" in err["message"]
        )

        a = await sim(st, "agg", time_scale=1.0)
        c = await announce(fe.zmq_endpoint, a.url, "agg", "a", interval_s=0.05)
        st.push_async_callback(c.close)
        async with http.post(
            fe.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3000, "stream": True}
        ) as r:
            await r.content.readany()  # holds the worker's only slot
            status, headers, body = await post(http, fe.url + "/v1/completions", {"prompt": "hi"})
            assert status == 503 and "Retry-After" in headers
            message = json.loads(body)["error"]["message"]
            assert "frontend.max_queued" in message and "--max-queued" in message
            assert "--max-inflight-per-worker" in message
            r.close()
        m = fe.metrics.render().decode()
        assert prom.total(m, "pdkit_requests_total", mode="agg", status="503") == 2


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b"", "empty"),
        (b'{"max_tokens": 3}', "prompt"),
        (b'{"prompt": "x", "stream": "yes"}', "stream"),
        (b'{"prompt": [1, "a"]}', "prompt"),
    ],
)
async def test_malformed_requests_get_vllm_style_400(http: aiohttp.ClientSession, raw: bytes, words: str) -> None:
    async with AsyncExitStack() as st:
        fe = await frontend(st, {}, mode="agg")
        async with http.post(fe.url + "/v1/completions", data=raw, headers={"Content-Type": "application/json"}) as r:
            assert r.status == 400
            data = await r.json()
        assert set(data["error"]) == {"message", "type", "param", "code"}
        assert data["error"]["type"] == "BadRequestError" and data["error"]["code"] == 400
        assert words in data["error"]["message"]


async def test_chat_without_messages_and_unknown_model(http: aiohttp.ClientSession) -> None:
    async with AsyncExitStack() as st:
        a = await sim(st, "agg")
        fe = await frontend(st, {"a": ("agg", a.url)}, mode="agg")
        status, _, body = await post(http, fe.url + "/v1/chat/completions", {"messages": []})
        assert status == 400 and json.loads(body)["error"]["param"] == "messages"
        status, _, body = await post(http, fe.url + "/v1/completions", {"model": "gpt-9", "prompt": "x"})
        assert status == 404 and json.loads(body)["error"]["type"] == "NotFoundError"
        # an engine's own 400 (here: more logprobs than vLLM's default max of 20) is relayed as is
        status, _, body = await post(http, fe.url + "/v1/completions", {"prompt": "x", "logprobs": 21})
        assert status == 400 and "error" in json.loads(body)


async def broken_upstream(stack: AsyncExitStack) -> str:
    """Stand-in (no real engine breaks on cue): one SSE event, then the connection drops."""

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunk = {"choices": [{"index": 0, "text": " hello", "finish_reason": None}]}
        await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        assert request.transport is not None
        request.transport.abort()
        return resp

    return await serve(stack, handler)


async def test_error_after_first_byte_ends_stream_with_error_event(http: aiohttp.ClientSession) -> None:
    async with AsyncExitStack() as st:
        url = await broken_upstream(st)
        fe = await frontend(st, {"a": ("agg", url)}, mode="agg")
        status, _, body = await post(http, fe.url + "/v1/completions", {"prompt": "x", "stream": True})
        assert status == 200
        events = [e[len("data: ") :] for e in body.split("\n\n") if e.startswith("data: ")]
        assert json.loads(events[0])["choices"][0]["text"] == " hello"
        err = json.loads(events[1])["error"]
        assert err["code"] == 502 and "broke after the first byte" in err["message"]
        assert events[-1] == "[DONE]"
        m = fe.metrics.render().decode()
        assert prom.total(m, "pdkit_stream_errors_total") == 1
        assert prom.total(m, "pdkit_requests_total", status="stream_error") == 1


async def test_stop_drains_in_flight_and_refuses_new(http: aiohttp.ClientSession) -> None:
    async with AsyncExitStack() as st:
        a = await sim(st, "agg", time_scale=1.0)
        fe = await frontend(st, {"a": ("agg", a.url)}, mode="agg")
        async with http.post(fe.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 40, "stream": True}) as r:
            first = await r.content.readany()
            stopping = asyncio.create_task(fe.stop(grace_s=30))
            await wait_until(lambda: fe._draining)
            status, headers, body = await post(http, fe.url + "/v1/completions", {"prompt": "hi"})
            assert status == 503 and "shutting down" in body and "Retry-After" in headers
            async with http.get(fe.url + "/health") as h:
                assert h.status == 503
            rest = await r.read()
        assert sse_text((first + rest).decode()).count(" ") == 40  # the in-flight stream completed
        await stopping
