"""``pdkit status`` against a real frontend (HTTP on loopback) with simulated workers registered over ZMQ."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from pdkit.frontend.server import Frontend
from pdkit.frontend.settings import FrontendSettings
from pdkit.frontend.testing import announce
from pdkit.sim.server import SimWorker
from pdkit.sim.settings import SimSettings
from pdkit.status import fetch_status, render_status


async def test_status_shows_workers_caches_hits_and_outcomes() -> None:
    async with Frontend(FrontendSettings(port=0, zmq_port=0, mode="agg", policy="kv_aware", hash_seed="0",
                                         heartbeat_interval_s=0.1)) as fe:  # fmt: skip
        sim = SimWorker(SimSettings(role="agg", time_scale=0, hash_seed="0", kv_events_endpoint="tcp://127.0.0.1:0",
                                    kv_events_bind=True, kv_events_topic="a0"))  # fmt: skip
        async with sim:
            client = await announce(fe.zmq_endpoint, sim.url, "agg", "a0", kv_events_topic="a0", interval_s=0.05,
                                    kv_events_endpoint=sim.kv_events_endpoint)  # fmt: skip
            try:
                async with aiohttp.ClientSession() as http:
                    for _ in range(3):
                        body = {"model": "synth", "prompt": "a shared prompt for the status check " * 20}
                        async with http.post(fe.url + "/v1/completions", json={**body, "max_tokens": 2}) as r:
                            assert r.status == 200
                st = await asyncio.to_thread(fetch_status, fe.url)
            finally:
                await client.close()
    assert (st.mode, st.policy) == ("agg", "kv_aware")
    [w] = st.workers
    assert (w.worker_id, w.role, w.url) == ("a0", "agg", sim.url)
    assert st.requests == {"200": 3.0}
    text = render_status(st)
    assert "a0" in text and "requests: 200 3" in text and "hits pred/actual" in text
    assert json.loads(json.dumps(st.to_json()))["workers"][0]["worker_id"] == "a0"


def test_status_cli_unreachable_frontend_is_one_clear_line(run_cli: Any) -> None:
    code, out, err = run_cli("status", "--endpoint", "http://127.0.0.1:9")
    assert code == 2 and "cannot reach http://127.0.0.1:9/workers" in err and "pdkit launch" in err
    assert "Traceback" not in err


def test_status_cli_prints_a_table(run_cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import pdkit.status as status

    fake = status.FleetStatus(endpoint="http://x:1", mode="disagg", policy="kv_aware", workers=[
        status.WorkerStatus("p0", "prefill", "http://h:1", "synth", 0.2, 1, 1, 0, 0.25, {"GPU": 10, "CPU": 4},
                            900.0, 1000.0, 4000.0),
    ], requests={"200": 5.0}, retries={"decode/io_error": 1.0})  # fmt: skip
    monkeypatch.setattr(status, "fetch_status", lambda endpoint, timeout_s=5.0: fake)
    code, out, _ = run_cli("status")
    assert code == 0 and "p0" in out and "10/4/0" in out and "25%" in out and "10.0%" in out
    assert "retries: decode/io_error 1" in out
    code, out, _ = run_cli("status", "--json")
    assert json.loads(out)["workers"][0]["prediction_error"] == pytest.approx(0.1)
