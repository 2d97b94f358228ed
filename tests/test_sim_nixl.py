"""P/D between simulated workers through real NIXL (UCX) on host memory; skipped without ``nixl``."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from pdkit import prom
from pdkit.sim.server import SimWorker
from pdkit.sim.settings import SimSettings

pytest.importorskip("nixl._api")

INTERNAL_ERROR = {
    "error": {"message": "Internal server error", "type": "InternalServerError", "param": None, "code": 500}
}


async def _post(http: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with http.post(url, json=body) as r:
        return r.status, await r.json(content_type=None)


async def _wait_metric(http: aiohttp.ClientSession, w: SimWorker, name: str, value: float) -> str:
    for _ in range(500):
        async with http.get(w.url + "/metrics") as r:
            text = await r.text()
        if prom.total(text, name) == value:
            return text
        await asyncio.sleep(0.01)
    raise AssertionError(f"{name} never reached {value}")


async def test_pd_through_nixl(http: aiohttp.ClientSession) -> None:
    common: dict[str, Any] = {"time_scale": 0, "hash_seed": "0", "kv_transport": "nixl"}
    async with (
        SimWorker(SimSettings(role="prefill", **common)) as p,
        SimWorker(SimSettings(role="decode", **common)) as d,
        SimWorker(SimSettings(time_scale=0)) as a,
    ):
        body = {"prompt": "bytes travel through NIXL now " * 6, "max_tokens": 9}
        _, agg = await _post(http, a.url + "/v1/completions", body)
        _, pre = await _post(
            http,
            p.url + "/v1/completions",
            {**body, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}},
        )
        params = pre["kv_transfer_params"]
        status, dec = await _post(http, d.url + "/v1/completions", {**body, "kv_transfer_params": params})
        assert status == 200
        assert dec["choices"][0]["text"] == agg["choices"][0]["text"]
        # the NIXL notification released the prefill's lease and zeroed its slots
        text = await _wait_metric(http, p, "pdkit_sim:kv_leases_active", 0.0)
        assert prom.total(text, "pdkit_sim:kv_transfer_bytes_total") > 0
        # reading the same params again finds freed (zeroed) blocks: a KV load failure
        body2 = {**body, "prompt": "other words first " + body["prompt"]}
        status, r = await _post(http, d.url + "/v1/completions", {**body2, "kv_transfer_params": params})
        assert (status, r) == (500, INTERNAL_ERROR)


async def test_expired_lease_through_nixl(http: aiohttp.ClientSession) -> None:
    common: dict[str, Any] = {"time_scale": 0, "kv_transport": "nixl"}
    async with (
        SimWorker(SimSettings(role="prefill", kv_lease_s=0.05, **common)) as p,
        SimWorker(SimSettings(role="decode", **common)) as d,
    ):
        body = {"prompt": "a lease that runs out " * 4, "max_tokens": 2}
        _, pre = await _post(
            http,
            p.url + "/v1/completions",
            {**body, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}},
        )
        await _wait_metric(http, p, "pdkit_sim:kv_leases_expired_total", 1.0)
        status, r = await _post(
            http, d.url + "/v1/completions", {**body, "kv_transfer_params": pre["kv_transfer_params"]}
        )
        assert (status, r) == (500, INTERNAL_ERROR)
