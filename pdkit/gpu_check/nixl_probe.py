"""Raw NIXL transfers between two processes: how fast do a READ (pull) and a WRITE (push) move KV-sized data?

Why this exists: on one H200 with prefill and decode sharing the GPU, vLLM's NixlConnector moved an
8k-token prompt's KV (1 GiB) in ~2 s (~0.5 GB/s), against 3.4 ms between two NVLinked H200s.  Public
reports (vllm-project/vllm#52607, ai-dynamo/nixl#2208) trace this to UCX's ``cuda_ipc`` transport: it
serves remote PUT (NIXL WRITE, vLLM's push mode) at full speed but disables GET zero-copy where it
detects no NVLink, so a READ (vLLM's default pull mode) falls back to TCP.  ``UCX_CUDA_IPC_ENABLE_GET_ZCOPY``
forces GET on.  This probe measures each variant in seconds, without starting vLLM, with vLLM's
descriptor shape (one descriptor per (layer, block) page: 64 KiB at block size 16 for a Llama-8B layer).

Usage:
    python scripts/nixl_probe.py --mem vram --initiator-gpu 0 --target-gpu 0     # same GPU
    python scripts/nixl_probe.py --mem vram --initiator-gpu 0 --target-gpu 1     # two GPUs
    python scripts/nixl_probe.py --mem dram --total-mb 16                         # host memory (CPU box)
Options: ``--variants`` (names below), ``--desc-kb 64,512``, ``--iters``, ``--proto-info`` (UCX's
protocol-selection lines per variant, to see which transport served the op), ``--out``.
Writes ``$OUT/nixl_probe.json`` (or ``--out``); prints one summary line per variant.
The code lives in the package (``pdkit.gpu_check.nixl_probe``, also ``python -m``-runnable) so tests
import it normally; ``scripts/nixl_probe.py`` keeps the documented command line.

Each variant runs a *target* process (owns the remote buffer, filled with a known pattern) and an
*initiator* process (READs it into its buffer, or WRITEs its own pattern into it), both started with the
variant's environment so UCX reads it at start; every transfer is checked byte for byte.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pdkit.kv_config import NIXL_UCX_ENV as GET_ZCOPY  # what pdkit's launch plan sets

VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "read": ("READ", {}),  # vLLM's NixlConnector (pull), NIXL/UCX defaults
    "read-get-zcopy": ("READ", GET_ZCOPY),  # pull with cuda_ipc GET forced on
    "write": ("WRITE", {}),  # vLLM's NixlPushConnector (push)
}
PATTERN_BYTES = 1 << 20


def _buffer(nbytes: int, device: str, seed: int) -> Any:
    """``nbytes`` of a repeating random pattern (1 MiB period) on ``device``; returns (buffer, pattern)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    pattern = torch.randint(0, 256, (PATTERN_BYTES,), dtype=torch.uint8, generator=gen).to(device)
    buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
    buf.view(-1, PATTERN_BYTES).copy_(pattern.expand(nbytes // PATTERN_BYTES, -1))
    return buf, pattern


def _matches(buf: Any, pattern: Any) -> bool:
    return bool((buf.view(-1, PATTERN_BYTES) == pattern).all().item())


def _agent(name: str) -> Any:
    from nixl._api import nixl_agent, nixl_agent_config

    return nixl_agent(name, nixl_agent_config(backends=["UCX"]))


def _mem(args: argparse.Namespace) -> tuple[str, str]:
    """(torch device, NIXL memory type) of this process's buffer."""
    if args.mem == "dram":
        return "cpu", "DRAM"
    gpu = args.target_gpu if args.role == "target" else args.initiator_gpu
    return f"cuda:{gpu}", "VRAM"


def _dev_id(device: str) -> int:
    return int(device.split(":")[1]) if device.startswith("cuda") else 0


def run_target(args: argparse.Namespace) -> int:
    device, mem = _mem(args)
    nbytes = args.total_mb << 20
    buf, _ = _buffer(nbytes, device, seed=1)
    agent = _agent("probe-target")
    agent.register_memory([(buf.data_ptr(), nbytes, _dev_id(device), "")], mem)
    info = {"meta": base64.b64encode(agent.get_agent_metadata()).decode(), "base": buf.data_ptr(),
            "dev": _dev_id(device)}  # fmt: skip
    tmp = Path(args.rendezvous + ".tmp")
    tmp.write_text(json.dumps(info))
    tmp.rename(args.rendezvous)
    deadline = time.monotonic() + args.timeout_s
    while time.monotonic() < deadline:
        for msgs in agent.get_new_notifs().values():
            for msg in msgs:
                if msg == b"check-write":  # the initiator wrote its pattern (seed 2) over ours
                    _, expected = _buffer(PATTERN_BYTES, device, seed=2)
                    Path(args.rendezvous + ".check").write_text(json.dumps(_matches(buf, expected)))
                elif msg == b"done":
                    return 0
        time.sleep(0.001)
    return 1


def run_initiator(args: argparse.Namespace) -> int:
    device, mem = _mem(args)
    nbytes = args.total_mb << 20
    desc = args.desc_kb << 10
    if nbytes % desc:
        raise SystemExit("--total-mb must be a multiple of --desc-kb")
    buf, own = _buffer(nbytes, device, seed=2)
    if args.op == "READ":
        buf.zero_()
    agent = _agent("probe-initiator")
    agent.register_memory([(buf.data_ptr(), nbytes, _dev_id(device), "")], mem)
    rendezvous = Path(args.rendezvous)
    deadline = time.monotonic() + args.timeout_s
    while not rendezvous.exists():
        if time.monotonic() > deadline:
            raise SystemExit("the target never published its metadata")
        time.sleep(0.01)
    info = json.loads(rendezvous.read_text())
    remote_name = agent.add_remote_agent(base64.b64decode(info["meta"]))
    remote_name = remote_name.decode() if isinstance(remote_name, bytes) else remote_name
    n = nbytes // desc
    local = agent.get_xfer_descs([(buf.data_ptr() + i * desc, desc, _dev_id(device)) for i in range(n)], mem)
    remote = agent.get_xfer_descs([(info["base"] + i * desc, desc, info["dev"]) for i in range(n)], mem)
    times, inits = [], []
    for i in range(args.warmup + args.iters):
        t0 = time.perf_counter()
        handle = agent.initialize_xfer(args.op, local, remote, remote_name, b"probe")
        t1 = time.perf_counter()
        state = agent.transfer(handle)
        while state == "PROC":
            state = agent.check_xfer_state(handle)
        t2 = time.perf_counter()
        agent.release_xfer_handle(handle)
        if state != "DONE":
            raise SystemExit(f"transfer ended in state {state}")
        if i >= args.warmup:
            inits.append(t1 - t0)
            times.append(t2 - t1)
    if args.op == "READ":
        _, expected = _buffer(PATTERN_BYTES, device, seed=1)
        correct = _matches(buf, expected)
    else:
        check = Path(args.rendezvous + ".check")
        agent.send_notif(remote_name, b"check-write")
        while not check.exists():
            if time.monotonic() > deadline:
                raise SystemExit("the target never checked the written data")
            time.sleep(0.01)
        correct = json.loads(check.read_text())
        assert _matches(buf, own)  # a WRITE leaves the source as it was
    agent.send_notif(remote_name, b"done")
    median = statistics.median(times)
    print("RESULT " + json.dumps({
        "op": args.op, "bytes": nbytes, "descriptors": n, "desc_bytes": desc, "correct": correct,
        "transfer_s": [round(t, 6) for t in times], "median_s": round(median, 6),
        "gbps": round(nbytes / median / 1e9, 2), "init_ms": round(1e3 * statistics.median(inits), 3),
    }))  # fmt: skip
    return 0


def remote_memory_protocols(ucx_log: str) -> list[str]:
    """UCX_PROTO_INFO's tables for remote-memory reads/writes (which transport served each size range)."""
    tables: list[list[str]] = []
    current: list[str] | None = None
    for line in ucx_log.splitlines():
        text = " ".join(re.sub(r"^(\[[^\]]*\]\s*)+", "", line).split())  # drop UCX's [time] [host:pid]
        if text.startswith("+"):  # a border inside a table
            continue
        if not text.startswith("|") or "by ucp_" in text or "cfg#" in text:  # another table, or not UCX's
            current = None
            if "remote memory" in text:
                current = [text]
                tables.append(current)
            continue
        if current is not None and "Range" not in text:
            current.append(text)
    unique: list[str] = []
    for table in tables:
        block = " / ".join(table)
        if block not in unique:
            unique.append(block)
    return unique


def run_variant(args: argparse.Namespace, name: str, desc_kb: int) -> dict[str, Any]:
    op, env = VARIANTS[name]
    child_env = {**os.environ, **env}
    if args.proto_info:
        child_env["UCX_PROTO_INFO"] = "y"
    with tempfile.TemporaryDirectory(prefix="nixl-probe-") as tmp:
        rendezvous = str(Path(tmp) / "target.json")
        common = [sys.executable, "-m", "pdkit.gpu_check.nixl_probe", "--mem", args.mem,
                  "--total-mb", str(args.total_mb), "--desc-kb", str(desc_kb),
                  "--initiator-gpu", str(args.initiator_gpu), "--target-gpu", str(args.target_gpu),
                  "--rendezvous", rendezvous, "--timeout-s", str(args.timeout_s)]  # fmt: skip
        target_log = Path(tmp) / "target.log"
        with target_log.open("w") as tlog:
            target = subprocess.Popen([*common, "--role", "target"], env=child_env, stdout=tlog,
                                      stderr=subprocess.STDOUT)  # fmt: skip
            try:
                init = subprocess.run(
                    [*common, "--role", "initiator", "--op", op, "--iters", str(args.iters),
                     "--warmup", str(args.warmup)],
                    env=child_env, capture_output=True, text=True, timeout=args.timeout_s,
                )  # fmt: skip
                target.wait(timeout=30)
            finally:
                if target.poll() is None:
                    target.kill()
        output = init.stdout + init.stderr
        lines = [ln for ln in output.splitlines() if ln.startswith("RESULT ")]
        result: dict[str, Any] = {"variant": name, "env": env}
        if init.returncode != 0 or not lines:
            result["error"] = output[-2000:]
        else:
            result.update(json.loads(lines[-1][len("RESULT ") :]))
        if args.proto_info:
            result["proto"] = remote_memory_protocols(output + "\n" + target_log.read_text(errors="replace"))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mem", choices=("vram", "dram"), default="vram")
    parser.add_argument("--initiator-gpu", type=int, default=0, help="the decode side (it READs, or is written)")
    parser.add_argument("--target-gpu", type=int, default=0, help="the prefill side")
    parser.add_argument("--total-mb", type=int, default=1024)
    parser.add_argument("--desc-kb", default="64,512", help="descriptor sizes to try (64 KiB = block 16)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--proto-info", action="store_true")
    parser.add_argument("--timeout-s", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=None)
    # internal: the two child processes
    parser.add_argument("--role", choices=("target", "initiator"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--op", choices=("READ", "WRITE"), default="READ", help=argparse.SUPPRESS)
    parser.add_argument("--rendezvous", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "target":
        return run_target(args)
    if args.role == "initiator":
        args.desc_kb = int(args.desc_kb)
        return run_initiator(args)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    results = []
    for desc_kb in (int(d) for d in args.desc_kb.split(",")):
        for name in args.variants.split(","):
            r = run_variant(args, name, desc_kb)
            results.append(r)
            summary = r.get("error", "")[-300:] or f"{r['gbps']} GB/s, correct={r['correct']}, init {r['init_ms']} ms"
            print(f"{name:16s} {desc_kb:5d} KiB x {r.get('descriptors', '?')}: {summary}", flush=True)
    out = args.out or Path(os.environ.get("OUT", ".")) / "nixl_probe.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"mem": args.mem, "initiator_gpu": args.initiator_gpu, "target_gpu": args.target_gpu,
                               "results": results}, indent=1))  # fmt: skip
    return 0 if all("error" not in r and r.get("correct") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
