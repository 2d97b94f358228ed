"""The frontend's request paths end to end on CPU: real HTTP, real ZMQ, simulated vLLM workers.

Disagg answers must equal an aggregated worker's answers token for token (the simulator's output is a
pure function of the prompt), which proves the body reached the engines unchanged and the decode used
the prefill's KV (its pulled-bytes counter moves).
"""

from __future__ import annotations

import json
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import pytest

from pdkit import prom
from pdkit.frontend.server import Frontend
from pdkit.frontend.settings import FrontendSettings
from pdkit.frontend.testing import announce, sse_text
from pdkit.sim.server import SimWorker
from pdkit.sim.settings import SimSettings

LONG = "The quick brown fox jumps over the lazy dog. " * 12
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": LONG}]


async def text_of(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url) as r:
        return await r.text()


def answer_text(data: dict[str, Any]) -> str:
    c = data["choices"][0]
    return c.get("text") if "text" in c else c["message"]["content"]


class Deployment:
    def __init__(self, fe: Frontend, workers: dict[str, SimWorker], ref: SimWorker) -> None:
        self.fe, self.workers, self.ref = fe, workers, ref


async def start(stack: AsyncExitStack, mode: str, roles: dict[str, str], **fe_kw: Any) -> Deployment:
    """Simulated workers (``id -> role``) announced to a fresh frontend, plus an unregistered agg reference."""
    workers = {}
    for wid, role in roles.items():
        workers[wid] = await stack.enter_async_context(SimWorker(SimSettings(role=role, time_scale=0, hash_seed="0")))  # type: ignore[arg-type]
    ref = await stack.enter_async_context(SimWorker(SimSettings(role="agg", time_scale=0, hash_seed="0")))
    fe = Frontend(FrontendSettings(port=0, zmq_port=0, mode=mode, heartbeat_interval_s=0.1, **fe_kw))  # type: ignore[arg-type]
    await fe.start()
    stack.push_async_callback(fe.stop, 1.0)
    for wid, role in roles.items():
        c = await announce(fe.zmq_endpoint, workers[wid].url, role, wid, interval_s=0.05)
        stack.push_async_callback(c.close)
    return Deployment(fe, workers, ref)


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, str, Any]:
    async with http.post(url, json=body) as r:
        return r.status, r.headers.get("Content-Type", ""), await r.text()


CASES = [
    ("/v1/completions", {"prompt": LONG, "max_tokens": 12}),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 12}),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 9, "temperature": 0.0}),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("path", "body"), CASES)
async def test_disagg_equals_agg(http: aiohttp.ClientSession, path: str, body: dict[str, Any], stream: bool) -> None:
    async with AsyncExitStack() as stack:
        d = await start(stack, "disagg", {"p0": "prefill", "d0": "decode"})
        req = {"model": "synth", **body, "stream": stream}
        if stream:
            req["stream_options"] = {"include_usage": True}
        status, ctype, got = await post(http, d.fe.url + path, req)
        assert status == 200, got
        _, _, want = await post(http, d.ref.url + path, req)
        if stream:
            assert ctype.startswith("text/event-stream")
            assert sse_text(got) == sse_text(want) and sse_text(got)
            assert '"usage"' in got  # stream_options reached the decode unchanged
        else:
            assert answer_text(json.loads(got)) == answer_text(json.loads(want))
            assert json.loads(got)["usage"] == json.loads(want)["usage"]
        fe_m = await text_of(http, d.fe.url + "/metrics")
        assert prom.total(fe_m, "pdkit_requests_total", mode="disagg", status="200") == 1
        assert prom.total(fe_m, "pdkit_prefill_hop_seconds_count") == 1
        assert prom.total(fe_m, "pdkit_decode_hop_seconds_count", mode="disagg") == 1
        assert prom.total(fe_m, "pdkit_fallbacks_total") == 0
        if stream:
            assert prom.total(fe_m, "pdkit_time_to_first_token_seconds_count", mode="disagg") == 1
            assert prom.total(fe_m, "pdkit_inter_token_latency_seconds_count", mode="disagg") >= 1
        p_m = await text_of(http, d.workers["p0"].url + "/metrics")
        d_m = await text_of(http, d.workers["d0"].url + "/metrics")
        assert prom.total(p_m, "vllm:generation_tokens_total") == 1  # max_tokens=1 on the prefill hop
        assert prom.total(d_m, "pdkit_sim:kv_transfer_bytes_total", direction="received") > 0  # KV came from P


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("path", "body"), CASES[:2])
async def test_agg_one_hop(http: aiohttp.ClientSession, path: str, body: dict[str, Any], stream: bool) -> None:
    async with AsyncExitStack() as stack:
        d = await start(stack, "agg", {"a0": "agg", "a1": "agg"}, policy="round_robin")
        req = {"model": "synth", **body, "stream": stream}
        for _ in range(2):
            status, _, got = await post(http, d.fe.url + path, req)
            assert status == 200
            _, _, want = await post(http, d.ref.url + path, req)
            assert (
                (sse_text(got) == sse_text(want))
                if stream
                else (answer_text(json.loads(got)) == answer_text(json.loads(want)))
            )
        for wid in ("a0", "a1"):  # round robin: one request each
            m = await text_of(http, d.workers[wid].url + "/metrics")
            assert prom.total(m, "vllm:request_success_total") == 1
        fe_m = await text_of(http, d.fe.url + "/metrics")
        assert prom.total(fe_m, "pdkit_requests_total", mode="agg", status="200") == 2


async def test_short_prompts_skip_the_prefill_hop(http: aiohttp.ClientSession) -> None:
    async with AsyncExitStack() as stack:
        d = await start(stack, "disagg", {"p0": "prefill", "d0": "decode"}, disagg_min_prompt_tokens=64)
        status, _, got = await post(http, d.fe.url + "/v1/completions", {"prompt": "Hi there", "max_tokens": 4})
        assert status == 200
        assert json.loads(got)["usage"]["completion_tokens"] == 4
        status, _, _ = await post(http, d.fe.url + "/v1/completions", {"prompt": LONG, "max_tokens": 4})
        assert status == 200
        fe_m = await text_of(http, d.fe.url + "/metrics")
        assert prom.total(fe_m, "pdkit_requests_total", mode="direct") == 1
        assert prom.total(fe_m, "pdkit_requests_total", mode="disagg") == 1
        p_m = await text_of(http, d.workers["p0"].url + "/metrics")
        assert prom.total(p_m, "vllm:request_success_total") == 1  # only the long prompt was prefilled there


async def test_token_ids_prompt_and_request_id_header(http: aiohttp.ClientSession) -> None:
    async with AsyncExitStack() as stack:
        d = await start(stack, "disagg", {"p0": "prefill", "d0": "decode"})
        body = {"prompt": list(range(100, 180)), "max_tokens": 3}
        async with http.post(d.fe.url + "/v1/completions", json=body, headers={"X-Request-Id": "abc123"}) as r:
            assert r.status == 200
            assert r.headers["X-Request-Id"] == "abc123"
            data = await r.json()
        assert data["id"].endswith("abc123")  # vLLM names the request after the header
        assert data["usage"]["prompt_tokens"] == 80


async def test_models_health_workers_metrics(http: aiohttp.ClientSession) -> None:
    async with AsyncExitStack() as stack:
        d = await start(stack, "disagg", {"p0": "prefill", "d0": "decode", "d1": "decode"})
        async with http.get(d.fe.url + "/health") as r:
            assert r.status == 200
        async with http.get(d.fe.url + "/v1/models") as r:
            models = await r.json()
        assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["synth"]
        async with http.get(d.fe.url + "/workers") as r:
            ws = await r.json()
        assert ws["mode"] == "disagg" and sorted(w["worker_id"] for w in ws["workers"]) == ["d0", "d1", "p0"]
        m = await text_of(http, d.fe.url + "/metrics")
        assert prom.total(m, "pdkit_registry_workers", role="decode") == 2
        assert prom.total(m, "pdkit_registry_workers", role="prefill") == 1
        assert 'pdkit_worker_inflight{role="decode",worker_id="d1"} 0.0' in m
