"""``pdkit bench`` end to end over real HTTP on loopback.

Against the simulated engine (:class:`pdkit.sim.server.SimWorker`, time scale 0) for the three
workloads, and against ``tests/bench_stub.py`` -- a stub server that fails on purpose -- for failure
counting and for NIXL metrics (recorded through vLLM's own ``NixlPromMetrics``; a stub stands in for the
decode worker because real NIXL transfers need GPUs).  No assertion depends on elapsed time.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import typer
from bench_stub import StubOpenAIServer
from typer.testing import CliRunner

from pdkit.bench.cli import bench, bench_compare
from pdkit.bench.run import BenchConfig, run_benchmark
from pdkit.sim.server import SimWorker
from pdkit.sim.settings import SimSettings

REPO = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
async def sim() -> AsyncIterator[SimWorker]:
    async with SimWorker(SimSettings(time_scale=0, hash_seed="0")) as w:
        yield w


def _cfg(url: str, tmp_path: Path, **kw: Any) -> BenchConfig:
    base: dict[str, Any] = {
        "endpoint": url,
        "out_dir": tmp_path,
        "progress": False,
        "seed": 7,
        "warmup": 1,
        "num_requests": 6,
        "discover_workers": False,
    }
    base.update(kw)
    return BenchConfig(**base)


def _burst_cfg(url: str, tmp_path: Path, shape: tuple[int, int], **kw: Any) -> BenchConfig:
    """One point of one (input, output) shape with every request sent at once (rate = inf)."""
    return _cfg(url, tmp_path, shapes=[shape], rates=[math.inf], **kw)


def _is_png(path: str | Path) -> bool:
    return Path(path).read_bytes()[:8] == PNG


async def test_sweep_against_simulator_writes_json_and_plots(sim: SimWorker, tmp_path: Path) -> None:
    cfg = _cfg(
        sim.url,
        tmp_path,
        label="agg",
        shapes=[(300, 8), (64, 4)],
        rates=[50.0, math.inf],
        metrics_urls=[sim.url + "/metrics"],
    )
    result = await run_benchmark(cfg)
    path = Path(result["files"]["json"])
    data = json.loads(path.read_text())
    assert data["schema"] == "pdkit-bench/1" and data["label"] == "agg" and data["workload"] == "sweep"
    assert data["complete"] is True and data["finished_at"] >= data["started_at"]
    assert data["command"] and data["environment"]["python"] and "packages" in data["environment"]
    assert data["server"]["models"] == ["synth"] and data["settings"]["model"] == "synth"
    assert data["settings"]["rates"] == ["50", "inf"] and data["settings"]["seed"] == 7
    assert data["settings"]["slo"] == {"ttft_s": 2.0, "itl_s": 0.025, "itl_stat": "p99"}
    assert [p["name"] for p in data["points"]] == ["300x8@50", "300x8@inf", "64x4@50", "64x4@inf"]
    for p in data["points"]:
        s = p["summary"]
        inp, out = p["shape"]["input_len"], p["shape"]["output_len"]
        assert (s["requests"], s["completed"], s["failed"], s["errors"]) == (6, 6, 0, {})
        assert s["prompt_len_mismatches"] == 0
        assert s["output_tokens"] == 6 * out and s["input_tokens"] == 6 * inp
        assert s["itl_s"]["count"] == 6 * (out - 1) and s["ttft_s"]["count"] == 6
        assert s["goodput"]["good_requests"] <= s["completed"]
        assert s["output_token_throughput_tps"] == pytest.approx(s["output_tokens"] / s["duration_s"])
        assert len(p["requests"]) == 6
        for r in p["requests"]:
            assert r["ok"] and r["prompt_tokens"] == inp and r["output_tokens"] == out
            assert r["finish_reason"] == "length" and 0 <= r["ttft_s"] <= r["e2e_s"]
        # the simulator's counters, read from its /metrics around the point
        counters = p["worker_metrics"]["workers"][sim.url + "/metrics"]["counters"]
        assert counters["vllm:generation_tokens_total"] == 6 * out
        assert p["worker_metrics"]["nixl_total"]["transfers"] == 0  # an agg engine moves no KV
    plots = result["files"]["plots"]
    assert {Path(p).name.split("-")[-2] + "-" + Path(p).name.split("-")[-1] for p in plots} == {
        "300x8-latency.png",
        "300x8-goodput.png",
        "64x4-latency.png",
        "64x4-goodput.png",
    }
    assert all(_is_png(p) for p in plots)


async def test_multiturn_chat_shares_prefixes(sim: SimWorker, tmp_path: Path) -> None:
    cfg = _cfg(
        sim.url,
        tmp_path,
        workload="multiturn",
        api="chat",
        sessions=3,
        turns=3,
        system_len=200,
        user_len=40,
        turn_output_len=6,
        rates=[100.0],
        metrics_urls=[sim.url + "/metrics"],
    )
    result = await run_benchmark(cfg)
    (point,) = result["points"]
    assert point["summary"]["completed"] == 9 and point["summary"]["prompt_len_mismatches"] == 0
    assert sorted(point["by_turn"]) == ["0", "1", "2"]
    assert all(point["by_turn"][t]["completed"] == 3 for t in "012")
    by_session: dict[int, list[dict[str, Any]]] = {}
    for r in point["requests"]:
        by_session.setdefault(r["tags"]["session"], []).append(r)
    for rows in by_session.values():
        lens = [r["prompt_tokens"] for r in sorted(rows, key=lambda r: r["tags"]["turn"])]
        assert lens[0] < lens[1] < lens[2]  # each turn carries the previous answer and a new user turn
    counters = point["worker_metrics"]["workers"][sim.url + "/metrics"]["counters"]
    assert counters["vllm:prefix_cache_hits_total"] > 0  # shared system prefix + conversation history
    assert _is_png(result["files"]["plots"][0])


async def test_repeat_reports_cold_and_warm(sim: SimWorker, tmp_path: Path) -> None:
    cfg = _cfg(
        sim.url,
        tmp_path,
        workload="repeat",
        num_prefixes=3,
        repeats=3,
        repeat_input_len=512,
        repeat_output_len=4,
        metrics_urls=[sim.url + "/metrics"],
    )
    result = await run_benchmark(cfg)
    (point,) = result["points"]
    assert point["phases"]["cold"]["completed"] == 3 and point["phases"]["warm"]["completed"] == 6
    assert set(point["warm_vs_cold"]) == {
        "ttft_p50_warm_over_cold",
        "ttft_mean_warm_over_cold",
        "ttft_p90_warm_over_cold",
    }
    hits = [
        point["worker_metrics"][f"pass{i}"]["workers"][sim.url + "/metrics"]["counters"].get(
            "vllm:prefix_cache_hits_total", 0
        )
        for i in range(3)
    ]
    # warm passes hit every full 16-token block of the prompt except the one holding its last token
    assert hits[0] == 0 and hits[1] == hits[2] == 3 * (511 // 16 * 16)
    assert all(r["prompt_tokens"] == 512 for r in point["requests"])


async def test_failures_are_counted_not_raised(tmp_path: Path) -> None:
    modes = ("ok", "http500", "stream_error", "drop", "hang")
    async with StubOpenAIServer(modes) as stub:
        cfg = _burst_cfg(stub.url, tmp_path, (50, 4), num_requests=10, warmup=0, timeout_s=1.0, slo_ttft_s=60.0,
                         slo_itl_s=60.0, max_concurrency=None)  # fmt: skip
        result = await run_benchmark(cfg)
    s = result["points"][0]["summary"]
    assert s["requests"] == 10 and s["completed"] == 2 and s["failed"] == 8
    assert s["errors"] == {"connection": 2, "http_500": 2, "stream_error": 2, "timeout": 2}
    assert s["goodput"]["good_requests"] == 2
    bodies = stub.seen
    assert all(b["ignore_eos"] is True and b["max_tokens"] == 4 and b["stream"] is True for b in bodies)
    assert all(b["stream_options"] == {"include_usage": True} and b["model"] == "stub" for b in bodies)
    rows = result["points"][0]["requests"]
    assert {r["error"] for r in rows if not r["ok"]} == {"connection", "http_500", "stream_error", "timeout"}
    assert all(r["error_detail"] for r in rows if not r["ok"])


@pytest.mark.vllm
async def test_nixl_transfer_stats_from_vllm_metrics(tmp_path: Path) -> None:
    """The stub records transfers through vLLM's NixlPromMetrics (real NIXL transfers need GPUs)."""
    pytest.importorskip("vllm")
    link = tmp_path / "link.json"
    link.write_text(json.dumps({"peak_gbps": 400.0}))
    nbytes, secs = 64 * 2**20, 0.008
    async with StubOpenAIServer(("ok",), xfer_bytes=nbytes, xfer_s=secs) as stub:
        cfg = _burst_cfg(
            stub.url,
            tmp_path,
            (50, 3),
            num_requests=5,
            warmup=2,
            metrics_urls=[stub.url + "/metrics"],
            link_json=link,
            plots=False,
        )
        result = await run_benchmark(cfg)
    wm = result["points"][0]["worker_metrics"]
    nixl = wm["workers"][stub.url + "/metrics"]["nixl"]
    assert nixl["exported"] and nixl["transfers"] == 5  # the 2 warm-up transfers are outside the point
    assert nixl["bytes_per_request"] == nbytes and nixl["transfers_per_request"] == 1
    assert nixl["xfer_time_s_mean"] == pytest.approx(secs)
    assert nixl["xfer_time_s_p50_est"] is not None and 0.005 <= nixl["xfer_time_s_p50_est"] <= 0.01
    total = wm["nixl_total"]
    assert total["bandwidth_gbps"] == pytest.approx(nbytes / secs / 1e9)
    assert total["fraction_of_link_peak"] == pytest.approx(nbytes / secs / 1e9 / 400.0)
    assert result["link_peak_gbps"] == 400.0 and result["files"]["plots"] == []


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("bench")(bench)
    app.command("bench-compare")(bench_compare)
    return app


async def test_cli_run_and_compare(sim: SimWorker, tmp_path: Path) -> None:
    runner = CliRunner()
    files = []
    for label in ("agg", "disagg"):
        out = tmp_path / f"{label}.json"
        args = [
            "bench",
            "--endpoint",
            sim.url,
            "--label",
            label,
            "--shape",
            "64x4",
            "--rate",
            "20,inf",
            "--num-requests",
            "4",
            "--warmup",
            "0",
            "--no-progress",
            "--no-discover-workers",
            "--output",
            str(out),
            "--seed",
            "1",
        ]
        res = await asyncio.to_thread(runner.invoke, _app(), args)
        assert res.exit_code == 0, res.output
        assert f"results: {out}" in res.output and "| agg" in res.output or "| disagg" in res.output
        files.append(str(out))
    res = await asyncio.to_thread(runner.invoke, _app(), ["bench-compare", *files, "--out-dir", str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output
    assert _is_png(tmp_path / "cmp" / "compare-64x4-latency.png")
    assert _is_png(tmp_path / "cmp" / "compare-64x4-goodput.png")
    assert "| agg | 64x4@20 |" in res.output and "| disagg | 64x4@inf |" in res.output


@pytest.mark.parametrize(
    "args, words",
    [
        (["--workload", "nope"], "--workload"),
        (["--shape", "8192"], "--shape"),
        (["--rate", "0"], "--rate"),
        (["--extra-body", "[1]"], "--extra-body"),
    ],
)
def test_cli_option_errors_exit_2(args: list[str], words: str) -> None:
    res = CliRunner().invoke(_app(), ["bench", *args])
    assert res.exit_code == 2 and words in res.output


async def test_script_runs_the_same_code(sim: SimWorker, tmp_path: Path) -> None:
    out = tmp_path / "script.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(REPO / "scripts" / "bench_serving.py"),
        "--endpoint",
        sim.url,
        "--shape",
        "32x2",
        "--rate",
        "inf",
        "--num-requests",
        "2",
        "--warmup",
        "0",
        "--no-progress",
        "--no-plots",
        "--output",
        str(out),
        cwd=str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    stdout, _ = await proc.communicate()
    assert proc.returncode == 0, stdout.decode()
    data = json.loads(out.read_text())
    assert data["points"][0]["summary"]["completed"] == 2
    assert "bench_serving.py" in data["command"] and "--num-requests 2" in data["command"]


async def test_disagg_through_frontend_discovers_workers(tmp_path: Path) -> None:
    """Frontend (disagg) + simulated prefill and decode: the bench finds both workers through /workers."""
    from contextlib import AsyncExitStack

    from pdkit.frontend.server import Frontend
    from pdkit.frontend.settings import FrontendSettings
    from pdkit.frontend.testing import announce

    async with AsyncExitStack() as st:
        p = await st.enter_async_context(SimWorker(SimSettings(role="prefill", time_scale=0, hash_seed="0")))
        d = await st.enter_async_context(SimWorker(SimSettings(role="decode", time_scale=0, hash_seed="0")))
        fe = Frontend(FrontendSettings(port=0, zmq_port=0, mode="disagg", heartbeat_interval_s=0.1))
        await fe.start()
        st.push_async_callback(fe.stop, 1.0)
        for wid, role, url in (("p0", "prefill", p.url), ("d0", "decode", d.url)):
            client = await announce(fe.zmq_endpoint, url, role, wid, interval_s=0.05)
            st.push_async_callback(client.close)
        cfg = _burst_cfg(fe.url, tmp_path, (400, 6), label="disagg", discover_workers=True)
        result = await run_benchmark(cfg)
    assert sorted(result["worker_metrics_urls"]) == sorted([p.url + "/metrics", d.url + "/metrics"])
    (point,) = result["points"]
    assert point["summary"]["completed"] == 6 and point["summary"]["prompt_len_mismatches"] == 0
    workers = point["worker_metrics"]["workers"]
    # every request's KV went prefill -> decode: the simulator counts the bytes on both sides
    sent = workers[p.url + "/metrics"]["counters"]["pdkit_sim:kv_transfer_bytes_total"]
    received = workers[d.url + "/metrics"]["counters"]["pdkit_sim:kv_transfer_bytes_total"]
    assert sent == received > 0
    # seeded by default on the simulator: the prefill's token is each answer's first, the decode makes the
    # other five -- every output token generated once over both hops
    generated = [workers[w.url + "/metrics"]["counters"]["vllm:generation_tokens_total"] for w in (p, d)]
    assert generated == [6 * 1, 6 * 5]
