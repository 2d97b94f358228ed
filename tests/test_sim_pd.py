"""Prefill/decode through simulated workers: NIXL-style kv_transfer_params over real loopback HTTP."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from loopback import post_json as _post

from pdkit import prom
from pdkit.sim.server import SimWorker
from pdkit.sim.settings import SimSettings

INTERNAL_ERROR = {
    "error": {"message": "Internal server error", "type": "InternalServerError", "param": None, "code": 500}
}


async def _prefill(http: aiohttp.ClientSession, p: SimWorker, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """The frontend's first leg: max_tokens=1 with do_remote_decode (as vLLM's proxy sends it)."""
    status, r = await _post(
        http,
        p.url + path,
        {**body, "max_tokens": 1, "min_tokens": 1, "stream": False, "kv_transfer_params": {"do_remote_decode": True}},
    )
    assert status == 200
    params = r["kv_transfer_params"]
    assert params is not None
    return dict(params)


async def _metrics(http: aiohttp.ClientSession, w: SimWorker) -> str:
    async with http.get(w.url + "/metrics") as r:
        return await r.text()


async def test_prefill_returns_nixl_params(trio, http: aiohttp.ClientSession) -> None:
    p, _, _ = trio
    params = await _prefill(http, p, "/v1/completions", {"prompt": "hello " * 40})
    assert set(params) == {
        "do_remote_prefill",
        "do_remote_decode",
        "remote_block_ids",
        "remote_engine_id",
        "remote_request_id",
        "remote_host",
        "remote_port",
        "tp_size",
        "remote_num_tokens",
        "remote_blocks_expiry_time",
    }
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert params["remote_engine_id"] == p.engine.engine_id  # type: ignore[union-attr]
    assert (params["remote_host"], params["remote_port"]) == ("127.0.0.1", p.port)
    assert params["tp_size"] == 1
    n = params["remote_num_tokens"]
    assert len(params["remote_block_ids"]) == 1 and len(params["remote_block_ids"][0]) == -(-n // 16)
    assert prom.total(await _metrics(http, p), "pdkit_sim:kv_leases_active") == 1.0


@pytest.mark.parametrize("stream", [False, True])
async def test_agg_equals_disagg_completions(trio, http: aiohttp.ClientSession, stream: bool) -> None:
    p, d, a = trio
    body = {"prompt": "Disaggregation must not change a single token. " * 5, "max_tokens": 12}
    _, agg = await _post(http, a.url + "/v1/completions", body)
    params = await _prefill(http, p, "/v1/completions", body)
    if not stream:
        status, dec = await _post(http, d.url + "/v1/completions", {**body, "kv_transfer_params": params})
        assert status == 200
        assert dec["choices"][0]["text"] == agg["choices"][0]["text"]
        assert dec["usage"] == agg["usage"]
        assert dec["kv_transfer_params"] is None  # a decode node returns none (as NIXL does)
    else:
        async with http.post(
            d.url + "/v1/completions", json={**body, "kv_transfer_params": params, "stream": True}
        ) as r:
            raw = await r.text()
        chunks = [json.loads(b[6:]) for b in raw.split("\n\n") if b and b != "data: [DONE]"]
        assert "".join(c["choices"][0]["text"] for c in chunks) == agg["choices"][0]["text"]
    # the decode pulled the blocks: the lease is gone and the bytes were counted on both sides
    pm, dm = await _metrics(http, p), await _metrics(http, d)
    assert prom.total(pm, "pdkit_sim:kv_leases_active") == 0.0
    sent = prom.total(pm, "pdkit_sim:kv_transfer_bytes_total")
    assert sent > 0 and sent == prom.total(dm, "pdkit_sim:kv_transfer_bytes_total")
    assert prom.total(pm, "vllm:kv_cache_usage_perc") == 0.0


async def test_agg_equals_disagg_chat(trio, http: aiohttp.ClientSession) -> None:
    p, d, a = trio
    body = {"messages": [{"role": "user", "content": "tell me a story " * 8}], "max_tokens": 10}
    _, agg = await _post(http, a.url + "/v1/chat/completions", body)
    params = await _prefill(http, p, "/v1/chat/completions", body)
    status, dec = await _post(http, d.url + "/v1/chat/completions", {**body, "kv_transfer_params": params})
    assert status == 200
    assert dec["choices"][0]["message"]["content"] == agg["choices"][0]["message"]["content"]


async def test_decode_without_params_prefills_locally(trio, http: aiohttp.ClientSession) -> None:
    """vLLM's decode worker treats a request without kv_transfer_params as an ordinary one."""
    _, d, a = trio
    body = {"prompt": "no params at all", "max_tokens": 5}
    s1, r1 = await _post(http, d.url + "/v1/completions", body)
    _, r2 = await _post(http, a.url + "/v1/completions", body)
    assert s1 == 200 and r1["choices"][0]["text"] == r2["choices"][0]["text"]


async def test_incomplete_params_fail_like_a_kv_load_failure(trio, http: aiohttp.ClientSession) -> None:
    p, d, _ = trio
    body = {"prompt": "incomplete params", "max_tokens": 4}
    params = await _prefill(http, p, "/v1/completions", body)
    del params["remote_host"]
    status, r = await _post(http, d.url + "/v1/completions", {**body, "kv_transfer_params": params})
    assert (status, r) == (500, INTERNAL_ERROR)


async def test_params_used_twice_fail(trio, http: aiohttp.ClientSession) -> None:
    """The first decode read releases the prefill's blocks; a second read has nothing to read."""
    p, d, _ = trio
    body = {"prompt": "read me once " * 3, "max_tokens": 3}
    params = await _prefill(http, p, "/v1/completions", body)
    assert (await _post(http, d.url + "/v1/completions", {**body, "kv_transfer_params": params}))[0] == 200
    body2 = {**body, "prompt": body["prompt"] + " and more"}  # no local prefix covers the last block
    status, r = await _post(http, d.url + "/v1/completions", {**body2, "kv_transfer_params": params})
    assert (status, r) == (500, INTERNAL_ERROR)
    assert prom.total(await _metrics(http, d), "pdkit_sim:kv_transfer_failures_total") == 1.0


async def test_expired_lease_fails_and_frees_blocks(http: aiohttp.ClientSession) -> None:
    async with (
        SimWorker(SimSettings(role="prefill", time_scale=0, kv_lease_s=0.05)) as p,
        SimWorker(SimSettings(role="decode", time_scale=0)) as d,
    ):
        body = {"prompt": "too late " * 10, "max_tokens": 3}
        params = await _prefill(http, p, "/v1/completions", body)
        for _ in range(200):  # wait for the lease sweeper (no timing assertion)
            if prom.total(await _metrics(http, p), "pdkit_sim:kv_leases_expired_total") == 1.0:
                break
            await asyncio.sleep(0.02)
        pm = await _metrics(http, p)
        assert prom.total(pm, "pdkit_sim:kv_leases_expired_total") == 1.0
        assert prom.total(pm, "vllm:kv_cache_usage_perc") == 0.0
        status, r = await _post(http, d.url + "/v1/completions", {**body, "kv_transfer_params": params})
        assert (status, r) == (500, INTERNAL_ERROR)
        # a streamed request fails inside the stream, as vLLM's generators do
        params = await _prefill(http, p, "/v1/completions", body)
        await asyncio.sleep(0.2)
        async with http.post(
            d.url + "/v1/completions", json={**body, "kv_transfer_params": params, "stream": True}
        ) as resp:
            assert resp.status == 200
            raw = await resp.text()
        assert raw == f"data: {json.dumps(INTERNAL_ERROR, separators=(',', ':'))}\n\ndata: [DONE]\n\n"


async def test_unreachable_prefill_fails(trio, http: aiohttp.ClientSession) -> None:
    p, d, _ = trio
    body = {"prompt": "prefill vanished", "max_tokens": 3}
    params = await _prefill(http, p, "/v1/completions", body)
    params["remote_port"] = 1  # nothing listens there
    status, r = await _post(http, d.url + "/v1/completions", {**body, "kv_transfer_params": params})
    assert (status, r) == (500, INTERNAL_ERROR)


async def test_params_for_another_prompt_fail(trio, http: aiohttp.ClientSession) -> None:
    p, d, _ = trio
    params = await _prefill(http, p, "/v1/completions", {"prompt": "the prompt that was prefilled"})
    status, r = await _post(
        http,
        d.url + "/v1/completions",
        {"prompt": "a different prompt entirely", "max_tokens": 2, "kv_transfer_params": params},
    )
    assert (status, r) == (500, INTERNAL_ERROR)


async def test_agg_role_ignores_kv_transfer_params(trio, http: aiohttp.ClientSession) -> None:
    _, _, a = trio
    status, r = await _post(
        http,
        a.url + "/v1/completions",
        {"prompt": "x y z", "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}},
    )
    assert status == 200 and r["kv_transfer_params"] is None


async def test_heartbeats_keep_leases_alive_while_decode_queues(http: aiohttp.ClientSession) -> None:
    """A remote-prefill request stuck behind a long one on the decode survives a short prefill lease."""
    from pdkit.sim.latency import LatencyModel

    slow = LatencyModel(decode_step_ms=20.0)
    async with (
        SimWorker(SimSettings(role="prefill", time_scale=0, kv_lease_s=0.15)) as p,
        SimWorker(SimSettings(role="decode", time_scale=1, kv_lease_s=0.15, kv_capacity_blocks=12, latency=slow)) as d,
        SimWorker(SimSettings(time_scale=0)) as a,
    ):
        blocker_body = {"prompt": list(range(100, 250)), "max_tokens": 30, "stream": True}
        async with http.post(d.url + "/v1/completions", json=blocker_body) as blocker:
            await blocker.content.readuntil(b"\n\n")  # the blocker holds 10 of 12 blocks now
            body = {"prompt": list(range(300, 340)), "max_tokens": 3}
            params = await _prefill(http, p, "/v1/completions", body)
            status, dec = await _post(http, d.url + "/v1/completions", {**body, "kv_transfer_params": params})
            await blocker.read()
        assert status == 200
        _, agg = await _post(http, a.url + "/v1/completions", body)
        assert dec["choices"][0]["text"] == agg["choices"][0]["text"]
        pm = await _metrics(http, p)
        assert prom.total(pm, "pdkit_sim:kv_lease_extensions_total") > 0
        assert prom.total(pm, "pdkit_sim:kv_leases_expired_total") == 0
