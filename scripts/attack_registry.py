"""Issue 17's attacks against a real ``pdkit launch disagg --engine sim`` (2 prefill + 2 decode, kv_aware).

Usage: ``python scripts/attack_registry.py [--json OUT]``.  Everything binds loopback on a free port
block of its own.  The attacker is another process on the same machine that knows the ports, worker ids
and wire format but not the deployment's secret; when this script runs as root, the attacker process
also drops to uid 65534 ("nobody"), i.e. a second local user, so that the run directory's permissions
(token file, ``ipc://`` KV-event sockets) are part of what is tested.

Prints one row per attack: requests the rogue engine got, worker records changed, KV-index blocks
changed, and what the frontend answered.  Then SIGTERMs the launch and reports how long it took to stop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from pdkit.gpu_check.ports import free_port_block as free_block
from pdkit.gpu_check.ports import group_port_bases

N_REQ = 60
FAKE_RUNNING = 999


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def snapshot(fe: str) -> dict[str, dict[str, Any]]:
    """What routing reads of each worker, through the public /workers page."""
    out = {}
    for w in get_json(f"{fe}/workers")["workers"]:
        blocks = w.get("kv_index_blocks") or {}
        out[w["worker_id"]] = {"url": w["url"], "role": w["role"], "running": w["load"].get("running", 0),
                               "blocks": sum(blocks.values()) if isinstance(blocks, dict) else blocks}  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------ attacker


async def attacker_main(fe: str, zmq_ep: str, old_kv_port: int, run_dir: str) -> list[dict[str, Any]]:
    import aiohttp
    import zmq
    import zmq.asyncio
    from aiohttp import web

    from pdkit.bench.stats import percentile
    from pdkit.protocol import PROTOCOL_VERSION
    from pdkit.routing import kv_events as ke

    hits = {"n": 0, "auth": set()}

    async def any_path(request: web.Request) -> web.Response:
        hits["n"] += 1
        hits["auth"].add(request.headers.get("Authorization", ""))
        return web.json_response({"choices": [{"text": "pwned", "index": 0}]})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", any_path)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    rogue_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    ctx = zmq.asyncio.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(zmq_ep)

    def frame(kind: str, **fields: Any) -> bytes:
        return json.dumps({"type": kind, "version": PROTOCOL_VERSION, **fields}).encode()

    def info(wid: str, url: str) -> dict[str, Any]:
        return {"worker_id": wid, "role": "decode", "url": url, "model": "synth", "engine": "sim"}

    async def ask(raw: bytes) -> dict[str, Any]:
        await dealer.send(raw)
        return json.loads(await asyncio.wait_for(dealer.recv(), 10))

    async def requests(http: aiohttp.ClientSession, n: int, during: Any = None) -> list[int]:
        codes = []
        for i in range(n):
            if during is not None:
                await during(i)
            body = {"model": "synth", "prompt": f"question {i} {random.random()} " * 6, "max_tokens": 2}
            async with http.post(f"{fe}/v1/completions", json=body, headers={"Authorization": "Bearer client"}) as r:
                codes.append(r.status)
        return codes

    rows: list[dict[str, Any]] = []

    def row(attack: str, before: dict, after: dict, codes: list[int], answer: str, rogue0: int) -> None:
        changed = [w for w in before if w not in after or
                   {k: after[w][k] for k in ("url", "role")} != {k: before[w][k] for k in ("url", "role")}]  # fmt: skip
        changed += [w for w in after if w not in before]
        faked = [w for w in after if after[w]["running"] == FAKE_RUNNING]
        rows.append({
            "attack": attack, "rogue_requests": hits["n"] - rogue0, "records_changed": len(changed) + len(faked),
            "index_blocks_changed": sum(abs(after.get(w, {}).get("blocks", 0) - before[w]["blocks"]) for w in before
                                        if w in after and attack.startswith("publish")),
            "ok_requests": f"{codes.count(200)}/{len(codes)}" if codes else "-", "frontend_answer": answer[:90],
        })  # fmt: skip

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        # 1. register a new worker with a URL of one's own
        before, r0 = snapshot(fe), hits["n"]
        ack = await ask(frame("register", token=None, worker=info("evil-0", rogue_url)))
        codes = await requests(http, N_REQ)
        row("register a rogue worker", before, snapshot(fe), codes, ack.get("error") or "ok", r0)
        # 2. register again under a live id with another URL
        before, r0 = snapshot(fe), hits["n"]
        ack = await ask(frame("register", token=None, worker=info("decode-0", rogue_url)))
        codes = await requests(http, 80)
        row("re-register decode-0 with a rogue URL", before, snapshot(fe), codes, ack.get("error") or "ok", r0)
        # 3. deregister every worker in a loop
        before, r0 = snapshot(fe), hits["n"]
        answers: list[str] = []

        async def deregister_all(_: int) -> None:
            for wid in before:
                a = await ask(frame("deregister", token=None, worker_id=wid, reason="x"))
                answers.append(a.get("error") or "ok")

        codes = await requests(http, N_REQ, deregister_all)
        row("deregister every worker (loop)", before, snapshot(fe), codes, answers[-1], r0)
        # 4. heartbeat another worker's id with a fake load
        before, r0 = snapshot(fe), hits["n"]
        seq = [10**6]

        async def fake_load(_: int) -> None:
            seq[0] += 1
            load = {"running": FAKE_RUNNING, "waiting": FAKE_RUNNING, "kv_usage": 1.0}
            answers.append((await ask(frame("heartbeat", token=None, worker_id="decode-1", seq=seq[0], load=load)))
                           .get("error") or "ok")  # fmt: skip

        codes = await requests(http, N_REQ, fake_load)
        row("heartbeat decode-1 with a fake load", before, snapshot(fe), codes, answers[-1], r0)
        # 5. 10,000 registrations with distinct ids, /health probed meanwhile
        before, r0 = snapshot(fe), hits["n"]
        flood = ctx.socket(zmq.DEALER)
        flood.setsockopt(zmq.LINGER, 0)
        flood.setsockopt(zmq.SNDHWM, 0)
        flood.connect(zmq_ep)
        for i in range(10_000):
            await flood.send(frame("register", token=None, worker=info(f"flood-{i}", f"http://127.0.0.1:{1 + i}")))
        lat = []
        t_end = time.monotonic() + 3.0
        while time.monotonic() < t_end:
            t0 = time.perf_counter()
            async with http.get(f"{fe}/health") as r:
                assert r.status == 200
            lat.append(time.perf_counter() - t0)
            await asyncio.sleep(0.02)
        lat.sort()
        codes = await requests(http, N_REQ)
        p99 = percentile(lat, 99) or 0.0
        health = f"/health p99 {p99 * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms over {len(lat)} probes"
        row("10,000 registrations, distinct ids", before, snapshot(fe), codes, health, r0)
        flood.close(0)
        # 6. publish KV events: on the old shared port, on the workers' ipc sockets, and read the token
        before, r0 = snapshot(fe), hits["n"]
        notes = []
        try:
            Path(run_dir, "token").read_text()
            notes.append("token READ")
        except OSError as exc:
            notes.append(f"token: {exc.strerror}")
        evil = ke.KVEventBatch(ts=time.time(), events=[ke.AllBlocksCleared(), ke.BlockStored(
            block_hashes=list(range(1, 5001)), parent_block_hash=None, token_ids=[7] * 16 * 5000, block_size=16,
            lora_id=None, medium="GPU", lora_name=None)])  # fmt: skip
        pubs = []
        targets = [f"tcp://127.0.0.1:{old_kv_port}"]
        kv_dir = Path(run_dir) / "kv"
        targets += [f"ipc://{kv_dir}/{w}.pub" for w in before]
        for t in targets:
            p = ctx.socket(zmq.PUB)
            p.setsockopt(zmq.LINGER, 0)
            p.connect(t)
            pubs.append(p)
        sub = ctx.socket(zmq.SUB)  # and try to read prompt tokens off a worker's publisher
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(f"ipc://{kv_dir}/decode-0.pub")
        for s in range(300):
            for p in pubs:
                for w in before:
                    await p.send_multipart([w.encode(), s.to_bytes(8, "big"), ke.encode_batch(evil)])
            await asyncio.sleep(0.002)
        await asyncio.sleep(1.0)
        after = snapshot(fe)  # before any legitimate traffic, which adds blocks of its own
        codes = await requests(http, N_REQ)
        read = await sub.poll(500)
        notes.append("read worker events" if read else "worker events unreadable")
        row("publish on the KV-events socket", before, after, codes, "; ".join(notes), r0)
        for p in (*pubs, sub):
            p.close(0)
    dealer.close(0)
    ctx.term()
    await runner.cleanup()
    for r in rows:
        r["rogue_saw_client_auth"] = bool(hits["auth"] - {""})
    return rows


def preload() -> None:
    """Import everything the attacker uses before it drops to another uid (it may not read our files)."""
    import aiohttp  # noqa: F401
    import aiohttp.web  # noqa: F401
    import msgspec  # noqa: F401
    import zmq  # noqa: F401
    import zmq.asyncio  # noqa: F401

    import pdkit.protocol  # noqa: F401
    import pdkit.routing.kv_events  # noqa: F401


def run_attacker(fe: str, zmq_ep: str, old_kv_port: int, run_dir: str, out_fd: int) -> None:
    preload()
    if os.getuid() == 0:
        os.setgid(65534)
        os.setuid(65534)
    rows = asyncio.run(attacker_main(fe, zmq_ep, old_kv_port, run_dir))
    os.write(out_fd, json.dumps({"uid": os.getuid(), "rows": rows}).encode())


# ---------------------------------------------------------------------------------------- controller


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the table as JSON here")
    args = ap.parse_args()
    taken: set[int] = set()
    fe_port, zmq_port, kv_port = (free_block(1, taken) for _ in range(3))
    groups = {
        role: {"count": 2, **group_port_bases(2, taken), "startup_timeout_s": 120} for role in ("prefill", "decode")
    }
    run_dir = Path(tempfile.mkdtemp(prefix="pdkit-attack-"))
    os.chmod(run_dir, 0o755)  # even a world-readable run dir parent: what protects is inside it
    cfg = {"engine": "sim", "run_dir": str(run_dir / "run"),
           "frontend": {"port": fe_port, "zmq_port": zmq_port, "kv_events_port": kv_port, "policy": "kv_aware"},
           **groups}  # fmt: skip
    cfg_path = run_dir / "attack.yaml"
    cfg_path.write_text(json.dumps(cfg))
    fe = f"http://127.0.0.1:{fe_port}"
    log = open(run_dir / "launch.log", "w")  # noqa: SIM115
    launch = subprocess.Popen([sys.executable, "-m", "pdkit.cli", "launch", "disagg", "--engine", "sim",
                               "--config", str(cfg_path)], stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if len(get_json(f"{fe}/workers")["workers"]) == 4:
                    break
            except OSError:
                pass
            if launch.poll() is not None or time.monotonic() > deadline:
                print((run_dir / "launch.log").read_text()[-3000:])
                raise SystemExit("the deployment did not come up")
            time.sleep(0.5)
        # warm the KV indexes so that "wiped" would show
        for i in range(8):
            body = json.dumps({"model": "synth", "prompt": f"warm-up prompt {i} " * 20, "max_tokens": 2}).encode()
            req = urllib.request.Request(
                f"{fe}/v1/completions", data=body, headers={"Content-Type": "application/json"}
            )
            urllib.request.urlopen(req, timeout=30).read()
        time.sleep(1.0)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                run_attacker(fe, f"tcp://127.0.0.1:{zmq_port}", kv_port, cfg["run_dir"], w)
            finally:
                os._exit(0)
        os.close(w)
        chunks = []
        while chunk := os.read(r, 1 << 16):
            chunks.append(chunk)
        os.waitpid(pid, 0)
        result = json.loads(b"".join(chunks) or b"{}")
    finally:
        t0 = time.monotonic()
        os.killpg(launch.pid, signal.SIGTERM)
        try:
            launch.wait(timeout=60)
            stopped = f"SIGTERM: launch stopped in {time.monotonic() - t0:.1f} s (rc {launch.returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(launch.pid, signal.SIGKILL)
            stopped = "SIGTERM: did NOT stop within 60 s (killed)"
    rows = result.get("rows", [])
    head = ("attack", "rogue_requests", "records_changed", "index_blocks_changed", "ok_requests", "frontend_answer")
    print(f"attacker uid {result.get('uid')}; {stopped}")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(str(row[h]) for h in head) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "stop": stopped}, indent=1))
    bad = [r for r in rows if r["rogue_requests"] or r["records_changed"] or r["index_blocks_changed"]]
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
