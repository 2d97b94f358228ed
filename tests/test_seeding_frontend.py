"""First-token seeding wired into the frontend: a real Frontend + simulated P/D workers over loopback.

Why this file: with ``seed_first_token`` on a disaggregated request must give the client
exactly what an aggregated worker gives -- text, token ids, finish and stop reason, usage; streamed or
not; completions and chat -- while the decode never samples the first token again, a request the first
token ends never reaches the decode worker, and a decode that fails before its first byte is served
elsewhere (or by a local prefill of prompt + first token) in the same stream without a duplicated or
lost token.  The reference is an aggregated simulated worker of the same seeds; the simulator serves
seeded decodes as vLLM 0.26 does (docs/seeding.md).  The simulator has no push mode (NIXL pull only),
and never samples EOS, so those two cases are covered by tests/test_seeding_vllm.py and the GPU script.
The only stand-in is ``broken_decode``: a server that breaks a stream after its first event on cue.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import loopback
import pytest
from aiohttp import web
from loopback import closed_port_url, sim, sse_events, sse_summary

from pdkit import prom
from pdkit.frontend.server import SEED_HEADER, Frontend
from pdkit.frontend.settings import FrontendSettings
from pdkit.frontend.testing import announce
from pdkit.sim.server import SimWorker

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
LENGTHS = (15, 16, 17, 31, 32, 33, 700)  # around the block size (16), and a long prompt


async def frontend(stack: AsyncExitStack, workers: dict[str, tuple[str, str]], **kw: Any) -> Frontend:
    """A disagg frontend with ``workers`` (id -> (role, url)) announced over ZMQ (round robin by id)."""
    kw.setdefault("seed_first_token", True)  # forced on whatever the workers register: these tests are about seeding
    return await loopback.frontend(stack, workers, announce_kw={"block_size": 16}, **kw)


async def deployment(stack: AsyncExitStack, **kw: Any) -> tuple[Frontend, SimWorker, SimWorker, SimWorker]:
    """(frontend, prefill, decode, agg reference): 1P1D behind the frontend, the agg worker beside it."""
    p, d, a = await sim(stack, "prefill"), await sim(stack, "decode"), await sim(stack, "agg")
    fe = await frontend(stack, {"p": ("prefill", p.url), "d": ("decode", d.url)}, **kw)
    return fe, p, d, a


def summary(path: str, data: Any, stream: bool) -> dict[str, Any]:
    """What a client reads: text, token ids, finish/stop reason, usage (streamed or whole)."""
    if not stream:
        c = data["choices"][0]
        text = c["message"]["content"] if path == CHAT else c["text"]
        return {"text": text, "ids": c.get("token_ids"), "finish": c["finish_reason"],
                "stop": c.get("stop_reason"), "usage": data["usage"]}  # fmt: skip
    streamed = sse_summary(data, chat=path == CHAT)
    assert streamed.pop("dones") == 1
    del streamed["rids"]
    return streamed


async def call(http: aiohttp.ClientSession, url: str, path: str, body: dict[str, Any], **kw: Any) -> Any:
    async with http.post(url + path, json=body, **kw) as r:
        assert r.status == 200, await r.text()
        return await r.read() if body.get("stream") else await r.json()


async def metrics_of(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url + "/metrics") as r:
        return await r.text()


def completion_body(n_tokens: int, **kw: Any) -> dict[str, Any]:
    return {"prompt": [1000 + (7 * i) % 5000 for i in range(n_tokens)], "max_tokens": 8, "temperature": 0, **kw}


def chat_body(words: int, **kw: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": " ".join(["tell"] * words)}], "max_tokens": 8, **kw}


def seeded(fe: Frontend, outcome: str) -> float:
    return prom.total(fe.metrics.render().decode(), "pdkit_frontend_seeded_hops_total", outcome=outcome)


# ------------------------------------------------------------------------------ equality with agg


@pytest.mark.parametrize("stream", [False, True])
async def test_seeded_completions_equal_agg_token_for_token(http: aiohttp.ClientSession, stream: bool) -> None:
    async with AsyncExitStack() as st:
        fe, _, d, a = await deployment(st)
        extra: dict[str, Any] = {"return_token_ids": True, "stream": stream}
        if stream:
            extra["stream_options"] = {"include_usage": True}
        for n in LENGTHS:
            body = completion_body(n, **extra)
            want = summary(COMPLETIONS, await call(http, a.url, COMPLETIONS, body), stream)
            got = summary(COMPLETIONS, await call(http, fe.url, COMPLETIONS, body), stream)
            assert got == want, n
            assert len(got["ids"]) == 8 and got["usage"]["prompt_tokens"] == n
        assert seeded(fe, "seeded") == len(LENGTHS) and seeded(fe, "fallback") == seeded(fe, "refused") == 0
        m = await metrics_of(http, d.url)
        # the decode sampled tokens 2..8 of every request: the first one was the prefill's
        assert prom.total(m, "vllm:generation_tokens_total") == 7 * len(LENGTHS)
        assert prom.total(m, "pdkit_sim:kv_transfer_bytes_total", direction="received") > 0
        assert prom.total(m, "pdkit_sim:kv_transfer_failures_total") == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_seeded_chat_equals_agg(http: aiohttp.ClientSession, stream: bool) -> None:
    async with AsyncExitStack() as st:
        fe, _, _, a = await deployment(st)
        for words in (1, 5, 12, 300):
            body = chat_body(words, stream=stream, max_tokens=6)
            if stream:
                body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
            want = summary(CHAT, await call(http, a.url, CHAT, body), stream)
            raw = await call(http, fe.url, CHAT, body)
            assert summary(CHAT, raw, stream) == want, words
            if stream:
                events = sse_events(raw)
                assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
                assert len({(e["id"], e["created"], e["model"]) for e in events[:-1]}) == 1  # one answer
            else:
                assert raw["object"] == "chat.completion" and raw["kv_transfer_params"] is None
        assert seeded(fe, "seeded") == 4


@pytest.mark.parametrize("stream", [False, True])
async def test_push_workers_decode_chat_unseeded_and_completions_seeded(
    http: aiohttp.ClientSession, stream: bool
) -> None:
    """Workers registered with ``nixl_mode: push`` (vLLM 0.26 names it nowhere else): a chat request falls
    back to the unseeded decode after its prefill (vLLM's push pairs the hops by request id, which a
    seeded chat request cannot satisfy: tests/test_seeding_push_ids.py), a completions request is seeded.
    The simulator moves KV by pull whatever is announced: what is checked is the frontend's choice."""
    async with AsyncExitStack() as st:
        p, d, a = await sim(st, "prefill"), await sim(st, "decode"), await sim(st, "agg")
        workers = {"p": ("prefill", p.url), "d": ("decode", d.url)}
        fe = await loopback.frontend(
            st, workers, announce_kw={"block_size": 16, "nixl_mode": "push"}, seed_first_token=True
        )
        chat = chat_body(12, stream=stream, max_tokens=6)
        want = summary(CHAT, await call(http, a.url, CHAT, chat), stream)
        assert summary(CHAT, await call(http, fe.url, CHAT, chat), stream) == want
        assert seeded(fe, "fallback") == 1 and seeded(fe, "seeded") == 0
        body = completion_body(40, stream=stream, return_token_ids=True)
        want = summary(COMPLETIONS, await call(http, a.url, COMPLETIONS, body), stream)
        assert summary(COMPLETIONS, await call(http, fe.url, COMPLETIONS, body), stream) == want
        assert seeded(fe, "seeded") == 1


@pytest.mark.parametrize(
    ("setting", "decode_fields", "seeded_hops"),
    [
        (None, {"engine": "sim"}, 1),  # the simulator serves seeded decodes: seeded by default
        (None, {"engine": "vllm", "engine_version": "0.26.0"}, 1),  # proven on a GPU (Stack.seeding_proven)
        (None, {"engine": "vllm", "engine_version": "0.32.0"}, 0),  # not yet proven on a GPU: unseeded
        (None, {"engine": "vllm", "engine_version": "0.26.1"}, 0),  # a release pdkit does not know
        (None, {"engine": "vllm"}, 0),  # no version registered: nothing to go by
        (True, {"engine": "vllm", "engine_version": "0.32.0"}, 1),  # forced on
        (False, {"engine": "sim"}, 0),  # forced off
    ],
)
async def test_default_seeds_where_the_decode_workers_stack_has_it_proven(
    http: aiohttp.ClientSession, setting: bool | None, decode_fields: dict[str, Any], seeded_hops: int
) -> None:
    """``seed_first_token`` unset (the default) seeds a request when its decode worker's registered engine
    is the simulator or a vLLM release whose row in pdkit/stack.py has ``seeding_proven``; either way the
    answer equals the aggregated one."""
    async with AsyncExitStack() as st:
        p, d, a = await sim(st, "prefill"), await sim(st, "decode"), await sim(st, "agg")
        fe = Frontend(FrontendSettings(port=0, zmq_port=0, mode="disagg", policy="round_robin",
                                       heartbeat_interval_s=0.1, liveness_timeout_s=5.0,
                                       seed_first_token=setting))  # fmt: skip
        await fe.start()
        st.push_async_callback(fe.stop, 1.0)
        for wid, role, url, fields in (("p", "prefill", p.url, {}), ("d", "decode", d.url, decode_fields)):
            c = await announce(fe.zmq_endpoint, url, role, wid, interval_s=0.05, block_size=16, **fields)
            st.push_async_callback(c.close)
        body = completion_body(40, stream=True, return_token_ids=True)
        want = summary(COMPLETIONS, await call(http, a.url, COMPLETIONS, body), True)
        assert summary(COMPLETIONS, await call(http, fe.url, COMPLETIONS, body), True) == want
        assert seeded(fe, "seeded") == seeded_hops


async def test_first_byte_is_the_prefills_token_and_counts_as_ttft(http: aiohttp.ClientSession) -> None:
    """The client reads the first token before the decode has been asked for anything."""
    async with AsyncExitStack() as st:
        p, a = await sim(st, "prefill"), await sim(st, "agg")
        d = await sim(st, "decode", time_scale=1.0)  # ~7 ms per decode step: the decode is slow to answer
        fe = await frontend(st, {"p": ("prefill", p.url), "d": ("decode", d.url)})
        body = completion_body(64, max_tokens=4, stream=True)
        want = summary(COMPLETIONS, await call(http, a.url, COMPLETIONS, body), True)
        async with http.post(fe.url + COMPLETIONS, json=body) as r:
            first = await r.content.readuntil(b"\n\n")
            rest = await r.read()
        ev = json.loads(first[len(b"data: ") :])
        assert ev["choices"][0]["text"] and want["text"].startswith(ev["choices"][0]["text"])
        assert summary(COMPLETIONS, first + rest, True) == want
        m = fe.metrics.render().decode()
        assert prom.total(m, "pdkit_time_to_first_token_seconds_count", mode="disagg") == 1


async def test_stop_strings_across_the_seed_equal_agg(http: aiohttp.ClientSession) -> None:
    async with AsyncExitStack() as st:
        fe, _, _, a = await deployment(st)
        plain = await call(http, a.url, COMPLETIONS, completion_body(30, max_tokens=3, logprobs=0))
        t1, t2 = plain["choices"][0]["logprobs"]["tokens"][:2]
        # (the simulator ignores include_stop_str_in_output, so only the default is compared here)
        for stop in (t1[-1:] + t2[:2], t2[1:3]):
            body = completion_body(30, max_tokens=6, stream=True, stop=["qqqq", stop])
            body["stream_options"] = {"include_usage": True}
            want = summary(COMPLETIONS, await call(http, a.url, COMPLETIONS, body), True)
            assert want["finish"] == "stop"
            assert summary(COMPLETIONS, await call(http, fe.url, COMPLETIONS, body), True) == want
        assert seeded(fe, "seeded") == 2


# ------------------------------------------------------------------------------ ends at the prefill


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
@pytest.mark.parametrize("stream", [False, True])
async def test_max_tokens_one_never_reaches_the_decode(http: aiohttp.ClientSession, path: str, stream: bool) -> None:
    async with AsyncExitStack() as st:
        fe, p, d, a = await deployment(st)
        body = (completion_body(40) if path == COMPLETIONS else chat_body(9)) | {"max_tokens": 1, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        want = summary(path, await call(http, a.url, path, body), stream)
        assert summary(path, await call(http, fe.url, path, body), stream) == want
        assert seeded(fe, "ended_at_prefill") == 1 and seeded(fe, "seeded") == 0
        m = await metrics_of(http, d.url)
        assert prom.total(m, "vllm:request_success_total") == 0 and prom.total(m, "vllm:prompt_tokens_total") == 0
        # no remote decode was asked for, so the prefill keeps no KV lease for one
        pm = await metrics_of(http, p.url)
        assert "pdkit_sim:kv_leases_active " in pm and prom.total(pm, "pdkit_sim:kv_leases_active") == 0


async def test_a_stop_string_in_the_first_token_ends_at_the_prefill(http: aiohttp.ClientSession) -> None:
    async with AsyncExitStack() as st:
        fe, _, d, a = await deployment(st)
        plain = await call(http, a.url, COMPLETIONS, completion_body(30, max_tokens=2, logprobs=0))
        t1 = plain["choices"][0]["logprobs"]["tokens"][0]
        body = completion_body(30, stream=True, stop=[t1[1:3]])
        want = summary(COMPLETIONS, await call(http, a.url, COMPLETIONS, body), True)
        assert summary(COMPLETIONS, await call(http, fe.url, COMPLETIONS, body), True) == want
        assert seeded(fe, "ended_at_prefill") == 1
        assert prom.total(await metrics_of(http, d.url), "vllm:request_success_total") == 0


async def test_a_request_ended_at_the_prefill_frees_the_prefills_kv_at_once(http: aiohttp.ClientSession) -> None:
    """The prefill leased its blocks for a decode that will not run (the first token hit a stop string);
    the frontend's release request (an unknown model with the prefill's params, which the decode's serving
    layer refuses and cleans up after, as vLLM does) frees them long before the 30 s lease runs out."""
    async with AsyncExitStack() as st:
        fe, p, d, a = await deployment(st)
        plain = await call(http, a.url, COMPLETIONS, completion_body(30, max_tokens=2, logprobs=0))
        t1 = plain["choices"][0]["logprobs"]["tokens"][0]
        await call(http, fe.url, COMPLETIONS, completion_body(30, stream=True, stop=[t1[1:3]]))
        assert seeded(fe, "ended_at_prefill") == 1
        for _ in range(200):  # the release is fire and forget: give it a moment
            if prom.total(await metrics_of(http, p.url), "pdkit_sim:kv_leases_active") == 0:
                break
            await asyncio.sleep(0.02)
        pm = await metrics_of(http, p.url)
        assert (
            prom.total(pm, "pdkit_sim:kv_leases_active") == 0
            and prom.total(pm, "pdkit_sim:kv_leases_expired_total") == 0
        )
        dm = await metrics_of(http, d.url)
        assert prom.total(dm, "vllm:request_success_total") == 0 and prom.total(dm, "vllm:prompt_tokens_total") == 0


# ------------------------------------------------------------------------------ decode faults


@pytest.mark.parametrize("stream", [False, True])
async def test_dead_decode_worker_retried_elsewhere_with_the_same_seeded_body(
    http: aiohttp.ClientSession, stream: bool
) -> None:
    async with AsyncExitStack() as st:
        p, d, a = await sim(st, "prefill"), await sim(st, "decode"), await sim(st, "agg")
        workers = {"p": ("prefill", p.url), "a-dead": ("decode", closed_port_url()), "b-d": ("decode", d.url)}
        fe = await frontend(st, workers)
        body = completion_body(33, stream=stream, return_token_ids=True)
        want = summary(COMPLETIONS, await call(http, a.url, COMPLETIONS, body), stream)
        assert summary(COMPLETIONS, await call(http, fe.url, COMPLETIONS, body), stream) == want
        m = fe.metrics.render().decode()
        assert prom.total(m, "pdkit_retries_total", role="decode", reason="connect_error") == 1
        assert prom.total(m, "pdkit_fallbacks_total") == 0 and seeded(fe, "seeded") == 1
        dm = await metrics_of(http, d.url)
        assert prom.total(dm, "pdkit_sim:kv_transfer_bytes_total", direction="received") > 0  # the prefill's KV
        assert prom.total(dm, "vllm:generation_tokens_total") == 7


@pytest.mark.parametrize("decoders", [("d0", "d1"), ("d",)], ids=["another_decoder", "only_decoder"])
@pytest.mark.parametrize("stream", [False, True])
async def test_failed_kv_load_reprefills_prompt_and_first_token(
    http: aiohttp.ClientSession, stream: bool, decoders: tuple[str, ...]
) -> None:
    """The prefill's lease expires before the decode reads it: the decode fails before its first byte;
    the next try (another decoder, or the only one again) prefills prompt + first token itself, and the
    client's stream -- which already holds the first token -- continues without repeating it."""
    async with AsyncExitStack() as st:
        p, a = await sim(st, "prefill", kv_lease_s=1e-6), await sim(st, "agg")
        workers = {"p": ("prefill", p.url)}
        ds = {}
        for wid in decoders:
            ds[wid] = await sim(st, "decode")
            workers[wid] = ("decode", ds[wid].url)
        fe = await frontend(st, workers)
        body = completion_body(48, max_tokens=7, stream=stream, return_token_ids=True)
        if stream:
            body["stream_options"] = {"include_usage": True}
        want = summary(COMPLETIONS, await call(http, a.url, COMPLETIONS, body), stream)
        got = summary(COMPLETIONS, await call(http, fe.url, COMPLETIONS, body), stream)
        assert got == want and len(got["ids"]) == 7  # no duplicated, no lost token
        m = fe.metrics.render().decode()
        reason = "stream_error_event" if stream else "status_500"
        assert prom.total(m, "pdkit_retries_total", role="decode", reason=reason) == 1
        assert prom.total(m, "pdkit_fallbacks_total", reason=f"decode_{reason}") == 1
        assert seeded(fe, "seeded") == 1
        assert all(fe.registry.workers[wid].inflight == 0 for wid in decoders)
        # the local prefill covered prompt + first token: 49 prompt tokens, none received over "NIXL"
        served = [w for w in ds.values() if prom.total(await metrics_of(http, w.url), "vllm:generation_tokens_total")]
        assert len(served) == 1
        sm = await metrics_of(http, served[0].url)
        assert prom.total(sm, "vllm:prompt_tokens_total") >= 49
        assert prom.total(sm, "vllm:generation_tokens_total") == 6


async def broken_decode(stack: AsyncExitStack, seen: list[dict[str, Any]]) -> str:
    """Stand-in (no real engine breaks on cue): one SSE token event, then the connection drops."""

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(await request.json())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunk = {"id": "x", "created": 1, "model": "m", "choices": [{"index": 0, "text": " hello",
                 "token_ids": [5], "finish_reason": None}]}  # fmt: skip
        await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        assert request.transport is not None
        request.transport.abort()
        return resp

    app = web.Application()
    app.router.add_post(COMPLETIONS, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    stack.push_async_callback(runner.cleanup)
    return f"http://127.0.0.1:{runner.addresses[0][1]}"


async def test_decode_breaking_after_its_first_byte_ends_with_an_error_event(http: aiohttp.ClientSession) -> None:
    async with AsyncExitStack() as st:
        p = await sim(st, "prefill")
        seen: list[dict[str, Any]] = []
        fe = await frontend(st, {"p": ("prefill", p.url), "d": ("decode", await broken_decode(st, seen))})
        body = completion_body(20, stream=True)
        raw = await call(http, fe.url, COMPLETIONS, body)
        events = sse_events(raw)
        assert len(seen) == 1 and seen[0]["prompt"][:-1] == body["prompt"] and seen[0]["max_tokens"] == 7
        assert events[0]["choices"][0]["text"]  # the prefill's token
        assert events[1]["choices"][0]["text"] == " hello" and events[1]["id"] == events[0]["id"]
        assert events[2]["error"]["code"] == 502 and events[-1] == "[DONE]" and len(events) == 4
        m = fe.metrics.render().decode()
        assert prom.total(m, "pdkit_stream_errors_total") == 1
        assert prom.total(m, "pdkit_requests_total", status="stream_error") == 1


async def test_every_decode_failing_after_the_first_token_ends_with_an_error_event(
    http: aiohttp.ClientSession,
) -> None:
    async with AsyncExitStack() as st:
        p = await sim(st, "prefill")
        fe = await frontend(st, {"p": ("prefill", p.url), "d": ("decode", closed_port_url())})
        raw = await call(http, fe.url, COMPLETIONS, completion_body(20, stream=True))
        events = sse_events(raw)
        assert events[0]["choices"][0]["text"] and "error" in events[1] and events[-1] == "[DONE]"
        assert "every decode worker tried failed" in events[1]["error"]["message"]
        assert fe.registry.workers["p"].inflight == fe.registry.workers["d"].inflight == 0


# ------------------------------------------------------------------------------ refused / switched off


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (completion_body(40, n=2, temperature=0.8), {}),
        (completion_body(40, echo=True), {}),
        (completion_body(40), {SEED_HEADER: "off"}),
    ],
    ids=["n2", "echo", "header_off"],
)
async def test_refused_requests_take_the_unseeded_path(
    http: aiohttp.ClientSession, body: dict[str, Any], headers: dict[str, str]
) -> None:
    async with AsyncExitStack() as st:
        fe, _, d, a = await deployment(st)
        want = await call(http, a.url, COMPLETIONS, body)
        got = await call(http, fe.url, COMPLETIONS, body, headers=headers)
        assert len(got["choices"]) == len(want["choices"]) and got["usage"] == want["usage"]
        if body["temperature"] == 0:
            assert [c["text"] for c in got["choices"]] == [c["text"] for c in want["choices"]]
        assert seeded(fe, "refused") == 1 and seeded(fe, "seeded") == 0
        # unseeded: the decode samples every token itself, the first one included
        assert prom.total(await metrics_of(http, d.url), "vllm:generation_tokens_total") >= 8 * len(want["choices"])


async def test_switched_off_counts_nothing_and_decodes_unseeded(http: aiohttp.ClientSession) -> None:
    async with AsyncExitStack() as st:
        fe, _, d, a = await deployment(st, seed_first_token=False)
        body = completion_body(40, stream=True)
        want = summary(COMPLETIONS, await call(http, a.url, COMPLETIONS, body), True)
        assert summary(COMPLETIONS, await call(http, fe.url, COMPLETIONS, body), True) == want
        assert sum(seeded(fe, o) for o in ("seeded", "ended_at_prefill", "refused", "fallback")) == 0
        assert prom.total(await metrics_of(http, d.url), "vllm:generation_tokens_total") == 8


async def test_no_prefill_worker_falls_back_to_a_local_unseeded_prefill(http: aiohttp.ClientSession) -> None:
    async with AsyncExitStack() as st:
        d, a = await sim(st, "decode"), await sim(st, "agg")
        fe = await frontend(st, {"p": ("prefill", closed_port_url()), "d": ("decode", d.url)})
        body = completion_body(40, stream=True)
        want = summary(COMPLETIONS, await call(http, a.url, COMPLETIONS, body), True)
        assert summary(COMPLETIONS, await call(http, fe.url, COMPLETIONS, body), True) == want
        assert seeded(fe, "fallback") == 1


async def test_a_hung_decode_is_replaced_by_a_local_prefill_of_prompt_and_first_token(
    http: aiohttp.ClientSession,
) -> None:
    """A decode that sends no first byte in time (here: a very slow one) may have read the KV: the next
    decode worker prefills prompt + first token itself, in the stream that already holds the first token."""
    async with AsyncExitStack() as st:
        p, b, a = await sim(st, "prefill"), await sim(st, "decode"), await sim(st, "agg")
        slow = await sim(st, "decode", time_scale=2000)  # one decode step takes far longer than the deadline
        workers = {"p": ("prefill", p.url), "a-slow": ("decode", slow.url), "b": ("decode", b.url)}
        fe = await frontend(st, workers, decode_first_byte_timeout_s=0.5)
        body = completion_body(40, stream=True, return_token_ids=True)
        want = summary(COMPLETIONS, await call(http, a.url, COMPLETIONS, body), True)
        assert summary(COMPLETIONS, await call(http, fe.url, COMPLETIONS, body), True) == want
        m = fe.metrics.render().decode()
        assert prom.total(m, "pdkit_retries_total", role="decode", reason="first_byte_timeout") == 1
        bm = await metrics_of(http, b.url)
        assert prom.total(bm, "pdkit_sim:kv_transfer_bytes_total", direction="received") == 0  # a local prefill
        assert prom.total(bm, "vllm:generation_tokens_total") == 7
        assert fe.registry.workers["a-slow"].inflight == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_without_max_tokens_runs_to_the_decodes_context_end_like_agg(
    http: aiohttp.ClientSession, stream: bool
) -> None:
    async with AsyncExitStack() as st:
        p, d, a = [await sim(st, role, max_model_len=80) for role in ("prefill", "decode", "agg")]
        fe = await frontend(st, {"p": ("prefill", p.url)})
        c = await announce(fe.zmq_endpoint, d.url, "decode", "d", interval_s=0.05, block_size=16, max_model_len=80)
        st.push_async_callback(c.close)
        body = {"messages": [{"role": "user", "content": "tell me more"}], "stream": stream}
        want = summary(CHAT, await call(http, a.url, CHAT, body), stream)
        got = summary(CHAT, await call(http, fe.url, CHAT, body), stream)
        assert got == want and want["finish"] == "length"
        assert seeded(fe, "seeded") == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_text_prompts_are_seeded_with_the_prefills_own_tokenization(
    http: aiohttp.ClientSession, stream: bool
) -> None:
    async with AsyncExitStack() as st:
        fe, _, _, a = await deployment(st)
        for prompt in ("hi", "The quick brown fox jumps over the lazy dog. " * 30):
            body = {"prompt": prompt, "max_tokens": 9, "stream": stream, "return_token_ids": True}
            want = summary(COMPLETIONS, await call(http, a.url, COMPLETIONS, body), stream)
            assert summary(COMPLETIONS, await call(http, fe.url, COMPLETIONS, body), stream) == want
        assert seeded(fe, "seeded") == 2


@pytest.mark.parametrize(("version", "earliest"), [("0.26.0", False), ("0.32.0", True), (None, True), ("junk", True)])
def test_the_seeded_streams_stop_rule_follows_the_decodes_vllm(version: str | None, earliest: bool) -> None:
    """The decode's registered vLLM release picks the stop-string rule the seeded stream re-implements
    (0.26: first listed stop wins; 0.32: earliest completing); unknown or unreadable: the newest rule."""
    from pdkit.protocol import WorkerInfo
    from pdkit.routing.types import WorkerState

    info = WorkerInfo(worker_id="d", role="decode", url="http://127.0.0.1:1", model="synth", engine_version=version)
    assert Frontend._earliest_stop(WorkerState(info=info, last_seen=0.0)) is earliest
