"""Replay the overload cases of issue 18 against ``pdkit launch disagg --engine sim`` on loopback.

Starts a 1 prefill + 1 decode simulated deployment on a port block of its own (28000-28500, 25600-25900,
so it does not collide with a default launch), waits for ``/readiness``, then sends:

* ``burst600``: 600 completions at once (half streamed), one aiohttp session without a connection cap;
* ``raw500``: 500 concurrent non-streamed chat completions;
* ``openai200``: 200 concurrent chat completions through the ``openai`` client, when it is importable;
* ``vllm-bench``: ``vllm bench serve --request-rate inf --num-prompts 600``, when ``vllm`` is on PATH.

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
            results["burst600"] = await burst(600, chat=False, max_tokens=args.max_tokens, stream_every=2)
            results["raw500"] = await burst(500, chat=True, max_tokens=args.max_tokens, stream_every=0)
            results["openai200"] = await openai_case(200, args.max_tokens)
            results["vllm-bench"] = await asyncio.to_thread(vllm_bench, str(default_model_dir()), args.max_tokens)
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
