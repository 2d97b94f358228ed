#!/usr/bin/env python3
"""Router overhead and throughput: pdkit's frontend vs vllm-router (PD mode) vs a toy P→D proxy.

Why: a P/D router sits on every request's critical path twice (prefill hop, decode hop); its added
TTFT and its throughput ceiling decide whether it is worth putting in front of vLLM.  This script runs
all routers side by side in one run against the same simulated workers (``pdkit sim-worker``, real
HTTP, NIXL-style ``kv_transfer_params``) and compares each with ``direct``: the load generator doing the
two hops itself, i.e. no router at all.  "Added TTFT" is a router's TTFT percentile minus direct's.

Routers (each a separate process, so none shares the load generator's event loop):

* ``pdkit``  — ``pdkit frontend --mode disagg --policy round_robin``; workers announced over ZMQ.
* ``vllm-router`` — PyPI ``vllm-router`` (Rust), ``--vllm-pd-disaggregation --policy round_robin``;
  skipped with a note when the ``vllm-router`` executable is not installed.
* ``toy`` — an equivalent of vLLM's disaggregated-serving toy proxy written here: FastAPI + one httpx
  client per worker, round robin, prefill with ``max_tokens=1`` then a streamed decode (uvicorn).

Output: JSON (``--out``) and a PNG (``--plot``).  Example::

    python scripts/bench_router.py --concurrency 1 64 256 --requests 2000 --out bench.json --plot bench.png

Caveat: on a small machine the load generator, the routers and the simulated workers compete for the
same cores; absolute numbers are then a lower bound, the comparison is what matters.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from pdkit.frontend.server import PREFILL_KV_PARAMS  # the prefill hop's params, as pdkit sends them

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with s.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout} s")


async def ready_or_stop(url: str, proc: subprocess.Popen[bytes]) -> None:
    """Wait for ``url``; a process that never gets ready is stopped, not leaked."""
    try:
        await wait_http(url, proc)
    except BaseException:
        stop(proc)
        raise


def spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---------------------------------------------------------------------------------------- toy proxy


def serve_toy_proxy(port: int, prefills: list[str], decodes: list[str]) -> None:
    """The toy proxy (run in its own process by this script with ``--serve-toy-proxy``)."""
    import itertools

    import httpx
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    p_clients = [httpx.AsyncClient(base_url=u, timeout=None, limits=limits) for u in prefills]
    d_clients = [httpx.AsyncClient(base_url=u, timeout=None, limits=limits) for u in decodes]
    p_rr, d_rr = itertools.cycle(p_clients), itertools.cycle(d_clients)

    async def handle(request: Request, path: str) -> StreamingResponse:
        body = await request.json()
        pre = {**body, "max_tokens": 1, "min_tokens": 1, "stream": False, "kv_transfer_params": PREFILL_KV_PARAMS}
        pre.pop("stream_options", None)
        r = await next(p_rr).post(path, json=pre)
        r.raise_for_status()
        dec = {**body, "kv_transfer_params": r.json().get("kv_transfer_params")}
        client = next(d_rr)

        async def relay() -> Any:
            async with client.stream("POST", path, json=dec) as resp:
                async for chunk in resp.aiter_bytes():
                    yield chunk

        return StreamingResponse(relay(), media_type="text/event-stream")

    # Starlette-style routes: FastAPI's parameter injection cannot resolve this module's postponed
    # annotations for functions defined inside a function.
    async def completions(request: Request) -> StreamingResponse:
        return await handle(request, "/v1/completions")

    async def chat(request: Request) -> StreamingResponse:
        return await handle(request, "/v1/chat/completions")

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({})

    app.add_route("/v1/completions", completions, methods=["POST"])
    app.add_route("/v1/chat/completions", chat, methods=["POST"])
    app.add_route("/health", health, methods=["GET"])

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a process (all its threads), from /proc; None where unavailable."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------- load client


def make_prompt(i: int, tokens: int) -> str:
    rnd = random.Random(i)
    return " ".join(rnd.choice(WORDS) for _ in range(tokens))


async def one_request(
    http: aiohttp.ClientSession, target: str, i: int, args: argparse.Namespace, workers: dict[str, list[str]]
) -> tuple[float, float, int] | None:
    """(ttft_s, e2e_s, streamed events) of one streamed completion, or None on failure."""
    body: dict[str, Any] = {
        "model": "synth",
        "prompt": make_prompt(i, args.prompt_tokens),
        "max_tokens": args.max_tokens,
        "stream": True,
    }
    t0 = time.perf_counter()
    if target == "direct":  # the two hops done by the client itself: the no-router reference
        p = workers["prefill"][i % len(workers["prefill"])]
        d = workers["decode"][i % len(workers["decode"])]
        pre = {**body, "max_tokens": 1, "min_tokens": 1, "stream": False, "kv_transfer_params": PREFILL_KV_PARAMS}
        async with http.post(p + "/v1/completions", json=pre) as r:
            if r.status != 200:
                return None
            params = (await r.json())["kv_transfer_params"]
        url, body = d + "/v1/completions", {**body, "kv_transfer_params": params}
    else:
        url = target + "/v1/completions"
    ttft = 0.0
    events = 0
    async with http.post(url, json=body) as r:
        if r.status != 200:
            return None
        async for line in r.content:
            if not line.startswith(b"data: "):
                continue
            if line.startswith(b"data: [DONE]"):
                break
            if not ttft:
                ttft = time.perf_counter() - t0
            events += 1
    return ttft, time.perf_counter() - t0, events


async def run_level(
    target: str,
    concurrency: int,
    n: int,
    args: argparse.Namespace,
    workers: dict[str, list[str]],
    base: int,
    router_pid: int | None = None,
) -> dict[str, Any]:
    from pdkit.bench.stats import percentile

    results: list[tuple[float, float, int]] = []
    failures = 0
    counter = iter(range(n))
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=300)) as http:

        async def loop() -> None:
            nonlocal failures
            for i in counter:
                try:
                    res = await one_request(http, target, base + i, args, workers)
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    res = None
                if res is None:
                    failures += 1
                else:
                    results.append(res)

        cpu0 = cpu_seconds(router_pid)
        t0 = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        cpu1 = cpu_seconds(router_pid)
    ttft = [r[0] * 1000 for r in results]
    e2e = [r[1] * 1000 for r in results]
    tokens = sum(r[2] for r in results)
    return {
        "concurrency": concurrency,
        "requests": n,
        "ok": len(results),
        "failed": failures,
        "wall_s": round(wall, 3),
        "req_per_s": round(len(results) / wall, 1),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_ms_p50": round(percentile(ttft, 50), 3) if ttft else None,
        "ttft_ms_p99": round(percentile(ttft, 99), 3) if ttft else None,
        "e2e_ms_p50": round(percentile(e2e, 50), 3) if e2e else None,
        # the router's own CPU per request: its overhead, free of the machine's contention
        "router_cpu_ms_per_req": (
            round((cpu1 - cpu0) * 1000 / max(1, len(results)), 3) if cpu0 is not None and cpu1 is not None else None
        ),
    }


# ----------------------------------------------------------------------------------------- routers


async def start_router(
    name: str, workers: dict[str, list[str]], logdir: Path, announcers: list[Any]
) -> tuple[str, subprocess.Popen[bytes]] | None:
    port = free_port()
    py = sys.executable
    if name == "pdkit":
        zmq_port = free_port()
        argv = [py, "-m", "pdkit.cli", "frontend", "--port", str(port), "--zmq-port", str(zmq_port),
                "--mode", "disagg", "--policy", "round_robin", "--log-level", "warning",
                "--max-inflight-per-worker", "100000"]  # fmt: skip
        proc = spawn(argv, logdir / "pdkit-frontend.log")
        await ready_or_stop(f"http://127.0.0.1:{port}/health", proc)
        from pdkit.frontend.testing import announce

        for role, urls in workers.items():
            for k, url in enumerate(urls):
                announcers.append(await announce(f"tcp://127.0.0.1:{zmq_port}", url, role, f"{role}-{k}", interval_s=1))
    elif name == "vllm-router":
        exe = shutil.which("vllm-router") or str(Path(sys.executable).parent / "vllm-router")
        if not Path(exe).exists():
            print("vllm-router not installed (pip install vllm-router orjson): skipped", file=sys.stderr)
            return None
        argv = [exe, "--host", "127.0.0.1", "--port", str(port), "--vllm-pd-disaggregation",
                "--policy", "round_robin", "--log-level", "warning"]  # fmt: skip
        for url in workers["prefill"]:
            argv += ["--prefill", url]
        for url in workers["decode"]:
            argv += ["--decode", url]
        proc = spawn(argv, logdir / "vllm-router.log")
        await ready_or_stop(f"http://127.0.0.1:{port}/health", proc)
    elif name == "toy":
        argv = [py, __file__, "--serve-toy-proxy", "--port", str(port),
                "--prefill-urls", *workers["prefill"], "--decode-urls", *workers["decode"]]  # fmt: skip
        proc = spawn(argv, logdir / "toy-proxy.log")
        await ready_or_stop(f"http://127.0.0.1:{port}/health", proc)
    else:
        raise ValueError(name)
    return f"http://127.0.0.1:{port}", proc


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    logdir = Path(args.log_dir)
    logdir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    announcers: list[Any] = []
    workers: dict[str, list[str]] = {"prefill": [], "decode": []}
    out: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items() if k != "serve_toy_proxy"}, "results": {}}
    try:
        for role, count in (("prefill", args.prefill), ("decode", args.decode)):
            for k in range(count):
                port = free_port()
                argv = [sys.executable, "-m", "pdkit.cli", "sim-worker", "--role", role, "--port", str(port),
                        "--time-scale", str(args.time_scale), "--log-level", "warning"]  # fmt: skip
                proc = spawn(argv, logdir / f"sim-{role}-{k}.log")
                procs.append(proc)
                workers[role].append(f"http://127.0.0.1:{port}")
                await wait_http(f"http://127.0.0.1:{port}/health", proc)
        base = 0
        for name in args.routers:
            target = "direct"
            router: subprocess.Popen[bytes] | None = None
            if name != "direct":
                started = await start_router(name, workers, logdir, announcers)
                if started is None:
                    out["results"][name] = {"skipped": "not installed"}
                    continue
                target, router = started
            await run_level(target, 4, 16, args, workers, base=10**9)  # warm-up: connections, caches
            levels = []
            for c in args.concurrency:
                n = max(args.requests, c * 4) if c > 1 else args.requests_single
                res = await run_level(target, c, n, args, workers, base, router.pid if router is not None else None)
                base += n
                print(f"{name:12s} c={c:4d} {json.dumps(res)}", file=sys.stderr)
                levels.append(res)
            out["results"][name] = {"levels": levels}
            if router is not None:
                stop(router)
            for a in announcers:
                await a.close()
            announcers.clear()
    finally:
        for a in announcers:
            await a.close()
        for p in procs:
            stop(p)
    direct = {lv["concurrency"]: lv for lv in out["results"].get("direct", {}).get("levels", [])}
    for name, res in out["results"].items():
        for lv in res.get("levels", []):
            ref = direct.get(lv["concurrency"])
            if ref and name != "direct" and lv["ttft_ms_p50"] is not None:
                lv["added_ttft_ms_p50"] = round(lv["ttft_ms_p50"] - ref["ttft_ms_p50"], 3)
                lv["added_ttft_ms_p99"] = round(lv["ttft_ms_p99"] - ref["ttft_ms_p99"], 3)
    return out


def plot(data: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for name, res in data["results"].items():
        levels = res.get("levels")
        if not levels:
            continue
        cs = [lv["concurrency"] for lv in levels]
        axes[0].plot(cs, [lv["ttft_ms_p50"] for lv in levels], marker="o", label=f"{name} p50")
        axes[0].plot(cs, [lv["ttft_ms_p99"] for lv in levels], marker="x", linestyle="--", label=f"{name} p99")
        axes[1].plot(cs, [lv["req_per_s"] for lv in levels], marker="o", label=name)
        axes[2].plot(cs, [lv["tokens_per_s"] for lv in levels], marker="o", label=name)
    axes[0].set_yscale("log")
    titles = ("TTFT (ms, log)", "requests/s", "streamed tokens/s")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("P/D router overhead against simulated workers (direct = client does both hops)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--routers", nargs="+", default=["direct", "pdkit", "vllm-router", "toy"])
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 64, 256])
    ap.add_argument("--requests", type=int, default=1024, help="requests per level (at least 4 per stream)")
    ap.add_argument("--requests-single", type=int, default=200, help="requests at concurrency 1")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=1, help="simulated prefill workers")
    ap.add_argument("--decode", type=int, default=1, help="simulated decode workers")
    ap.add_argument("--time-scale", type=float, default=0.0, help="simulator time scale (0: no modelled GPU time)")
    ap.add_argument("--out", default="bench-router.json")
    ap.add_argument("--plot", default="bench-router.png")
    ap.add_argument("--log-dir", default="bench-router-logs")
    ap.add_argument("--serve-toy-proxy", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--prefill-urls", nargs="*", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--decode-urls", nargs="*", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_toy_proxy:
        serve_toy_proxy(args.port, args.prefill_urls, args.decode_urls)
        return
    try:
        import uvloop
    except ImportError:
        uvloop = None  # type: ignore[assignment]
    data = uvloop.run(bench(args)) if uvloop is not None else asyncio.run(bench(args))
    Path(args.out).write_text(json.dumps(data, indent=2))
    plot(data, args.plot)
    print(json.dumps(data["results"], indent=1))


if __name__ == "__main__":
    main()
