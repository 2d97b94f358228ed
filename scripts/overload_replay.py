"""Replay the overload cases of issue 18 against ``pdkit launch disagg --engine sim`` on loopback.

Starts a 1 prefill + 1 decode simulated deployment on a port block of its own (28000-28500, 25600-25900,
so it does not collide with a default launch), waits for ``/readiness``, then sends:

* ``burst600``: 600 completions at once (half streamed), one aiohttp session without a connection cap;
* ``raw500``: 500 concurrent non-streamed chat completions;
* ``openai200``: 200 concurrent chat completions through the ``openai`` client, when it is importable;
* ``vllm-bench``: ``vllm bench serve --request-rate inf --num-prompts 600``, when ``vllm`` is on PATH;
* ``soak`` (``--soak-s N``): ``--soak-streams`` (1,000) clients each sending streamed completions back to
  back for N seconds; counts every answer and samples the resident memory (RSS) of the frontend and the
  workers' processes every 10 s, so a leak shows as a rising column.

and prints sent / ok / 503 / other per case.  Every request is bounded by a client timeout; the launch
is stopped (SIGINT) at the end.  Usage: ``python scripts/overload_replay.py [--max-tokens 16]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

BASE = "http://127.0.0.1:28000"
CONFIG = """\
mode: disagg
engine: sim
frontend: {port: 28000, zmq_port: 28100, kv_events_port: 28101}
prefill: {count: 1, gpus: [[0]], http_port_base: 28300, nixl_side_channel_port_base: 25610, kv_events_port_base: 25810}
decode: {count: 1, gpus: [[0]], http_port_base: 28400, nixl_side_channel_port_base: 25620, kv_events_port_base: 25820}
"""
PROMPT = "Tell me a long story about a fox and a lazy dog that meet at the river. " * 4


def tally(statuses: list[int | str]) -> dict[str, int]:
    c = Counter(statuses)
    ok, busy = c.pop(200, 0), c.pop(503, 0)
    return {"sent": len(statuses), "ok": ok, "503": busy, "other": sum(c.values())}


async def burst(n: int, chat: bool, max_tokens: int, stream_every: int) -> dict[str, int]:
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as http:

        async def one(i: int) -> int | str:
            stream = stream_every > 0 and i % stream_every == 0
            if chat:
                path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": f"{i} {PROMPT}"}]}
            else:
                path, body = "/v1/completions", {"prompt": f"{i} {PROMPT}"}
            body |= {"model": "synth", "max_tokens": max_tokens, "stream": stream}
            try:
                async with http.post(BASE + path, json=body) as r:
                    await r.read()
                    return r.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                return type(exc).__name__

        return tally(list(await asyncio.gather(*(one(i) for i in range(n)))))


async def openai_case(n: int, max_tokens: int) -> dict[str, int] | str:
    try:
        import openai
    except ImportError:
        return "skipped (openai not importable)"
    client = openai.AsyncOpenAI(base_url=BASE + "/v1", api_key="unused", max_retries=0, timeout=900)

    async def one(i: int) -> int | str:
        try:
            await client.chat.completions.create(
                model="synth", messages=[{"role": "user", "content": f"{i} {PROMPT}"}], max_tokens=max_tokens
            )
            return 200
        except openai.APIStatusError as exc:
            return exc.status_code
        except openai.APIError as exc:
            return type(exc).__name__

    try:
        return tally(list(await asyncio.gather(*(one(i) for i in range(n)))))
    finally:
        await client.close()


def vllm_bench(model_dir: str, max_tokens: int) -> dict[str, Any] | str:
    exe = shutil.which("vllm") or str(Path(sys.executable).parent / "vllm")
    if not Path(exe).exists():
        return "skipped (vllm not on PATH)"
    argv = [exe, "bench", "serve", "--backend", "openai", "--base-url", BASE, "--model", "synth",
            "--tokenizer", model_dir, "--dataset-name", "random", "--random-input-len", "128",
            "--random-output-len", str(max_tokens), "--num-prompts", "600", "--request-rate", "inf",
            "--ignore-eos"]  # fmt: skip
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return "did not finish in 600 s"
    lines = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in out.stdout.splitlines()) if v}
    done = lines.get("Successful requests")
    failed = lines.get("Failed requests")
    if done is None:
        return f"could not run (exit {out.returncode}): {(out.stderr or out.stdout).strip().splitlines()[-1:]}"
    return {"sent": 600, "ok": int(done), "failed": int(failed or 600 - int(done))}


def _pids(log_path: Path) -> dict[str, int]:
    """Process name -> pid, from the launcher's «started NAME (pid N)» lines."""
    out: dict[str, int] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith("pdkit: started ") and "(pid " in line:
            name = line.split()[2]
            out[name] = int(line.rsplit("(pid ", 1)[1].rstrip(")"))
    return out


def _rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its children (an agent and its engine), in MB."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                children = (task / "children").read_text().split()
                todo += [int(c) for c in children]
    return round(total / 1024, 1)


async def soak(duration_s: float, streams: int, max_tokens: int, log_path: Path) -> dict[str, Any]:
    """``streams`` looping streamed clients for ``duration_s``; statuses and an RSS sample every 10 s."""
    statuses: list[int | str] = []
    samples: list[dict[str, float]] = []
    deadline = time.monotonic() + duration_s
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as http:

        async def client(i: int) -> None:
            n = 0
            while time.monotonic() < deadline:
                body = {"model": "synth", "prompt": f"{i}.{n} {PROMPT}", "max_tokens": max_tokens, "stream": True}
                n += 1
                try:
                    async with http.post(BASE + "/v1/completions", json=body) as r:
                        data = await r.read()
                        ok = r.status == 200 and data.rstrip().endswith(b"data: [DONE]") and b'"error"' not in data
                        statuses.append(200 if ok else (r.status if r.status != 200 else "stream_error"))
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    statuses.append(type(exc).__name__)

        async def sampler() -> None:
            t0 = time.monotonic()
            while time.monotonic() < deadline:
                pids = _pids(log_path)
                samples.append({"t_s": round(time.monotonic() - t0), **{k: _rss_mb(v) for k, v in pids.items()}})
                await asyncio.sleep(10)

        await asyncio.gather(sampler(), *(client(i) for i in range(streams)))
    return {**tally(statuses), "streams": streams, "duration_s": duration_s, "rss_mb": samples}


async def wait_ready(proc: subprocess.Popen[bytes], timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"pdkit launch exited with {proc.returncode} before it was ready")
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
                async with http.get(BASE + "/readiness") as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.5)
    raise SystemExit(f"the deployment was not ready within {timeout_s:.0f} s")


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--soak-s", type=float, default=0.0, help="also run the soak for this long (0: skip)")
    ap.add_argument("--soak-streams", type=int, default=1000)
    ap.add_argument("--only-soak", action="store_true", help="skip the burst cases")
    args = ap.parse_args()
    from pdkit.model_files import default_model_dir

    with tempfile.TemporaryDirectory(prefix="pdkit-overload-") as tmp:
        cfg = Path(tmp) / "overload.yaml"
        cfg.write_text(CONFIG)
        log = open(Path(tmp) / "launch.log", "wb")  # noqa: SIM115 - closed below
        argv = [sys.executable, "-m", "pdkit.cli", "launch", "disagg", "--config", str(cfg), "--run-dir", tmp]
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        results: dict[str, Any] = {}
        try:
            await wait_ready(proc)
            if not args.only_soak:
                results["burst600"] = await burst(600, chat=False, max_tokens=args.max_tokens, stream_every=2)
                results["raw500"] = await burst(500, chat=True, max_tokens=args.max_tokens, stream_every=0)
                results["openai200"] = await openai_case(200, args.max_tokens)
                model_dir = str(default_model_dir())
                results["vllm-bench"] = await asyncio.to_thread(vllm_bench, model_dir, args.max_tokens)
            if args.soak_s > 0:
                log.flush()
                results["soak"] = await soak(args.soak_s, args.soak_streams, args.max_tokens, Path(tmp) / "launch.log")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
            log.close()
    print(f"{'case':<12} result")
    for case, res in results.items():
        print(f"{case:<12} {res}")
    bad = [c for c, r in results.items() if isinstance(r, dict) and r.get("ok") != r.get("sent")]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
