"""Issue 15's GPU checks of one stack (vLLM + LMCache + NIXL) on ONE H200, in two stages that share deployments.

Each ``pdkit launch`` start costs 1.5-2.5 min on the lent machine (workers sharing a GPU start one after
the other), so every check that can share a deployment does; each stage fits well inside one 10-minute
device call.  Everything goes through the product: ``pdkit launch ... --share-gpus --enforce-eager``
(frontend, worker agents, vLLM with PdConnector / NIXL / LMCache), the embedded synthetic Llama-8B with
dummy weights (seeded: every instance computes the same function, so greedy outputs compare token for
token).

* stage ``agg`` -- ``pdkit launch agg`` with TWO agg workers on GPU 0, ``--policy kv_aware``:
  (f) ``pdkit doctor --json`` recorded first (or "absent" when this pdkit has no such command);
  reference outputs, one request at a time, for completions of 30..6000 prompt tokens and chats,
  32 greedy tokens each (saved under the state dir for stage ``disagg``); then
  (d) KV-aware routing: ``pdkit bench --workload multiturn --api chat`` and, per worker, the frontend's
  predicted hit tokens against the engine's own counters (``vllm:prefix_cache_hits`` +
  ``pdkit:lmcache_hit_tokens``, read from its ``/metrics``), which must be equal.
* stage ``disagg`` -- ONE ``pdkit launch disagg`` (prefill and decode on GPU 0) configured for the
  rest at once: ``nixl.verify_transfers`` on, the decode worker with ``PDKIT_VERIFY_INJECT_FAULT=N``
  (one bit of one received block flipped in each of its first N verified requests), vLLM's prefix
  cache off on prefill, ``--policy kv_aware``:
  (a) pass 1 (the faulted one) and pass 2 equal agg token for token;
  (c) every injected fault caught (``pdkit:kv_verify_mismatch_blocks_total`` += N, one «fail their
      fingerprint» warning each) and recomputed (outputs still equal); pass 2 adds no mismatch;
  (b) pass 2 restores > 90 % of every prompt from LMCache (``pdkit:lmcache_hit_tokens`` on the prefill
      worker, read after each request) and equals agg;
  (e) ``vllm bench serve`` (random dataset, the embedded model's tokenizer) through the frontend with
      0 failures;
  then Ctrl-C, and no process of the deployment left.

LMCache's multi-process mode (issue 16, ``--lmcache-mode mp``; needs lmcache >= 0.5.6, the v032 stack):
the agg stage runs WITHOUT LMCache (its outputs are the "agg without LMCache" reference), the disagg
stage runs the prefill's LMCache as an ``lmcache server`` (``lmcache.mode: mp``) with ``verify_restores``,
and two more stages (each one call) follow:
* stage ``restart`` -- ONE agg worker, LMCache MP + ``verify_restores``, vLLM's prefix cache off (every
  reuse goes through the server): (g) a cold pass and a restore pass equal the reference, the restore
  pass > 90 % from LMCache; (h) the worker's ``lmcache server`` is SIGKILLed while ``vllm bench serve``
  runs through the frontend -- pdkit must restart it, and every request must complete; (i) after the
  restart a save pass and a restore pass still equal the reference (LMCache#4492: restores after a
  server restart can be wrong; ``verify_restores`` must catch and recompute any such block), with the
  restore check's counters (``pdkit:lmcache_restore_*``) in the JSON; (p5) TTFT of 8k-token prompts
  cold and warm (repeated) with the prefix cache off.
* stage ``p5`` -- the same (p5) figures with LMCache in-process, for the side-by-side.

Why (d) is not checked on the disagg deployment: with the prefix cache off on prefill, that worker's
hits are LMCache loads, counted in tokens (a full hit is ``prompt - 1`` tokens; a multi-turn prefix hits
in whole 256-token chunks), while the router predicts in whole 16-token blocks of what LMCache stored:
the two differ by design, not by a bug, so an equality verdict there would be a wrong figure.  The
disagg stage records those figures as information only; the verdict comes from the agg stage, whose
workers keep their prefix cache on (as in ``scripts/gpu_check_kv_routing.py``).  Fault injection only
touches the decode side's received copy (LMCache stores the prefill's own KV) and the faults are used
up in pass 1, so it disturbs neither (b) nor (e).

Usage on the device (after ``scripts/gpu_session.sh setup``; it runs commands from /tmp with the
installed pdkit):
    bash scripts/gpu_session.sh run python3 $PWD/scripts/gpu_check_stack.py --stage agg      # ~5 min
    bash scripts/gpu_session.sh run python3 $PWD/scripts/gpu_check_stack.py --stage disagg   # ~4-5 min
On this machine: ``--dry-run`` (prints both deployments' ``pdkit launch ... --dry-run`` plans) and
``--engine sim`` (a CPU rehearsal with simulated engines: LMCache and NIXL checks are "n/a on sim";
``vllm bench serve`` is skipped where vLLM is not importable).  ``--quick`` shrinks every workload.
Writes ``$OUT/gpu_check_stack_<stage>.json`` (default OUT /tmp/pdkit-gpu-out; rewritten after each check)
and ``$OUT/logs_stack_<stage>.tar.gz``; state between calls under /tmp/pdkit-gpu-check.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from pdkit import prom
from pdkit.agent import parse_load
from pdkit.bench.client import RequestRecord, send_streaming
from pdkit.bench.prompts import PromptFactory
from pdkit.bench.report import environment
from pdkit.gpu_check.kv_hits import kv_hit_snapshot, renamed
from pdkit.gpu_check.ports import free_port_block as _free_block
from pdkit.model_files import SYNTHETIC_SERVED_NAME, default_model_dir
from pdkit.status import fetch_status
from pdkit.supervisor import proc_stats

OUT = Path(os.environ.get("OUT") or "/tmp/pdkit-gpu-out")
STATE = Path("/tmp/pdkit-gpu-check")
STAGES = ("agg", "disagg", "restart", "p5")
ALL_STAGES = ("agg", "disagg")  # --stage all: one call
MAX_TOKENS = 32
READY_TIMEOUT_S = 420.0  # two shared-GPU vLLM starts on a fresh machine take ~4 min; the call has 10
SEED = 15


@dataclass(frozen=True)
class Workload:
    """Sizes of every workload of both stages (``--quick``: small, for CPU rehearsals and tests)."""

    completion_tokens: tuple[int, ...] = (30, 120, 400, 900, 1800, 3000, 4500, 6000)
    chat_tokens: tuple[int, ...] = (40, 900, 4500)
    sessions: int = 32  # multiturn chats of the KV-routing check
    turns: int = 4
    system_len: int = 2048
    user_len: int = 256
    turn_output_len: int = 64
    chat_rate: float = 4.0
    bench_prompts: int = 200  # vllm bench serve
    bench_input_len: int = 1024
    bench_output_len: int = 64
    bench_rate: float = 8.0
    restart_bench_prompts: int = 160  # vllm bench serve while the lmcache server is killed (~20 s at 8 req/s)
    kill_after_s: float = 6.0
    p5_tokens: int = 8000  # P5: a repeated 8k-token prompt, prefix cache off
    p5_prompts: int = 3


QUICK = Workload(completion_tokens=(30, 400, 1500), chat_tokens=(60,), sessions=4, turns=3, system_len=256,
                 user_len=48, turn_output_len=8, bench_prompts=12, bench_input_len=128, bench_output_len=8,
                 restart_bench_prompts=12, kill_after_s=1.0, p5_tokens=600, p5_prompts=2)  # fmt: skip


@dataclass
class Options:
    engine: str = "vllm"
    one_gpu: bool = True
    workload: Workload = field(default_factory=Workload)
    free_ports: bool = False
    state: Path = STATE
    skip_vllm_bench: bool = False
    lmcache_mode: str | None = None  # None: the stack's default (in_process on 0.26/0.32)


def log(*args: object) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


# ---------------------------------------------------------------------------------------------------
# deployments


def port_settings(free: bool) -> dict[str, dict[str, int]]:
    """pdkit's default ports, or free ones (``--free-ports``); two workers per group at most."""
    if not free:
        return {}
    taken: set[int] = set()
    out: dict[str, dict[str, int]] = {"frontend": {k: _free_block(1, taken) for k in ("port", "zmq_port")}}
    out["frontend"]["kv_events_port"] = _free_block(1, taken)
    for role in ("agg", "prefill", "decode"):
        out[role] = {k: _free_block(2, taken) for k in
                     ("http_port_base", "nixl_side_channel_port_base", "kv_events_port_base")}  # fmt: skip
    return out


def deployment(stage: str, opts: Options, ports: dict[str, dict[str, int]]) -> tuple[list[str], dict[str, Any]]:
    """(``pdkit launch`` arguments, config) of a stage's deployment."""
    second = 0 if opts.one_gpu else 1
    config: dict[str, Any] = {
        "max_model_len": 8192,  # 6000-token prompts + 32 outputs; the multiturn chats stay below 4k
        "frontend": {**ports.get("frontend", {}), "policy": "kv_aware"},
    }
    args = ["--enforce-eager"] + (["--share-gpus"] if opts.one_gpu else [])
    if opts.engine != "vllm":
        args += ["--engine", opts.engine]
    mp = opts.lmcache_mode == "mp"
    # The simulator has no prefix-cache switch (its sim-worker rejects vLLM's flag): on sim it stays on.
    no_prefix_cache = ["--no-enable-prefix-caching"] if opts.engine == "vllm" else []
    if stage == "agg":
        # mp: the reference is agg WITHOUT LMCache (issue 16 compares MP mode with it)
        lmcache = {"enabled": False} if mp else {"chunk_size": 256, "cpu_gb": 10, "save_unfull_chunk": True}
        config |= {"mode": "agg", "agg": {"gpus": [[0], [second]], **ports.get("agg", {})}, "lmcache": lmcache}
        return ["agg", *args], config
    if stage in ("restart", "p5"):
        lmcache = {"chunk_size": 256, "cpu_gb": 20, "save_unfull_chunk": True}
        lmcache |= {"mode": "mp", "verify_restores": True} if stage == "restart" else {"mode": "in_process"}
        config |= {"mode": "agg", "lmcache": lmcache,
                   "agg": {"gpus": [[0]], **ports.get("agg", {}), "extra_args": no_prefix_cache}}  # fmt: skip
        return ["agg", *args], config
    faults = len(opts.workload.completion_tokens) + len(opts.workload.chat_tokens)  # one per pass-1 request
    lmcache = {"chunk_size": 256, "cpu_gb": 20, "save_unfull_chunk": True}
    if mp:
        lmcache |= {"mode": "mp", "verify_restores": True}
    config |= {
        "mode": "disagg",
        "lmcache": lmcache,
        "nixl": {"verify_transfers": True},
        "prefill": {"gpus": [[second]], **ports.get("prefill", {}), "extra_args": no_prefix_cache},
        "decode": {"gpus": [[0]], **ports.get("decode", {}), "extra_env": {"PDKIT_VERIFY_INJECT_FAULT": str(faults)}},
    }
    return ["disagg", *args], config


def write_config(config: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    return path


def launch_argv(mode_args: list[str], config_path: Path) -> list[str]:
    return [sys.executable, "-m", "pdkit.cli", "launch", *mode_args, "--config", str(config_path)]


def dry_run(opts: Options, stages: list[str]) -> int:
    """Print each deployment's ``pdkit launch ... --dry-run`` plan; 0 when every plan is valid."""
    rc = 0
    with tempfile.TemporaryDirectory() as tmp:
        for stage in stages:
            mode_args, config = deployment(stage, opts, port_settings(opts.free_ports))
            argv = launch_argv(mode_args, write_config(config, Path(tmp) / f"{stage}.yaml")) + ["--dry-run"]
            done = subprocess.run(argv, capture_output=True, text=True)
            print(f"== stage {stage}: pdkit launch {' '.join(mode_args)} --config {stage}.yaml --dry-run")
            print(json.dumps(config))
            print(done.stdout.rstrip() or done.stderr.strip())
            rc |= done.returncode
    return rc


class Deployment:
    """One running ``pdkit launch``: started, waited for, stopped; knows its processes to check the stop."""

    def __init__(self, stage: str, mode_args: list[str], config: dict[str, Any], run_dir: Path) -> None:
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        argv = launch_argv(mode_args, write_config(config, run_dir / "deployment.yaml"))
        argv += ["--run-dir", str(run_dir)]
        log("starting:", " ".join(argv[2:]))
        self.t0 = time.time()
        with open(run_dir / "launch.log", "w") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.frontend = f"http://127.0.0.1:{config['frontend'].get('port', 8000)}"
        self.pids: set[int] = set()

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> float:
        while time.time() - self.t0 < timeout_s:
            text = (self.run_dir / "launch.log").read_text(errors="replace")
            if "all processes ready" in text:
                self.pids = descendants(self.proc.pid)
                return round(time.time() - self.t0, 1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"pdkit launch exited with {self.proc.returncode}: {text[-2000:]}")
            time.sleep(1)
        raise TimeoutError(f"pdkit launch not ready in {timeout_s:.0f} s (see {self.run_dir}/launch.log)")

    def stop(self, vllm: bool) -> dict[str, Any]:
        """Ctrl-C the launcher (as a user would) and list what of the deployment is still alive; ``vllm``:
        also any ``vllm.entrypoints`` process at all (the lent GPU machine runs nothing else)."""
        self.pids |= descendants(self.proc.pid)
        t0 = time.time()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        time.sleep(2)
        left = {p for p in self.pids if alive(p)}
        if vllm:
            found = subprocess.run(["pgrep", "-f", "vllm.entrypoints"], capture_output=True, text=True).stdout
            left |= {int(p) for p in found.split() if p.isdigit() and alive(int(p))}
        return {"stop_s": round(time.time() - t0, 1), "launcher_rc": self.proc.returncode,
                "leftover": [cmdline(p) for p in sorted(left)]}  # fmt: skip


def _proc_children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for pid, fields in proc_stats():
        children.setdefault(int(fields[1]), []).append(pid)
    return children


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` now (the supervisor gives each worker its own session, not its own parent)."""
    children, out, todo = _proc_children(), set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cmdline(pid: int) -> str:
    try:
        return f"{pid} " + (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:300]
    except OSError:
        return f"{pid} (gone)"


# ---------------------------------------------------------------------------------------------------
# requests and metrics


def build_requests(workload: Workload, model_dir: Path) -> list[dict[str, Any]]:
    """Completions and chats of exact prompt lengths (vLLM's count), deterministic for a seed."""
    factory = PromptFactory(model_dir, seed=SEED)
    reqs: list[dict[str, Any]] = []
    for n in workload.completion_tokens:
        body = {"prompt": factory.completion_prompt(n)}
        reqs.append({"kind": "completion", "tokens": n, "path": "/v1/completions", "body": body})
    for n in workload.chat_tokens:
        body = {"messages": [factory.chat_user_message(n)]}
        reqs.append({"kind": "chat", "tokens": n, "path": "/v1/chat/completions", "body": body})
    for r in reqs:
        r["body"] |= {"model": SYNTHETIC_SERVED_NAME, "max_tokens": MAX_TOKENS, "temperature": 0}
    return reqs


async def get_text(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
        return await resp.text()


async def run_requests(frontend: str, reqs: list[dict[str, Any]], watch: str | None = None) -> list[dict[str, Any]]:
    """Each request alone, streamed; ``watch``: a worker URL whose LMCache hit counter is read after each."""
    rows = []
    async with aiohttp.ClientSession() as http:
        for i, r in enumerate(reqs):
            before = parse_load(await get_text(http, watch + "/metrics")).lmcache_hit_tokens if watch else None
            rec = await send_streaming(http, frontend + r["path"], r["body"], RequestRecord(f"{r['kind']}-{i}"),
                                       300.0, time.perf_counter())  # fmt: skip
            row = {"kind": r["kind"], "tokens": r["tokens"], "ok": rec.ok, "error": rec.error_detail or rec.error,
                   "prompt_tokens": rec.prompt_tokens, "output_tokens": rec.output_tokens,
                   "ttft_s": rec.ttft_s and round(rec.ttft_s, 4), "text": rec.text}  # fmt: skip
            if watch:
                after = parse_load(await get_text(http, watch + "/metrics")).lmcache_hit_tokens
                for _ in range(4):  # the counter is updated with the engine step's stats; give a late one a moment
                    if after != before:
                        break
                    await asyncio.sleep(0.5)
                    after = parse_load(await get_text(http, watch + "/metrics")).lmcache_hit_tokens
                row["lmcache_hit_tokens"] = None if after is None else after - (before or 0.0)
            rows.append(row)
    return rows


def workers_by_role(frontend: str) -> dict[str, str]:
    """Role -> engine URL of the (first) registered worker of that role, as ``pdkit status`` reads it."""
    out: dict[str, str] = {}
    for w in fetch_status(frontend).workers:
        out.setdefault(w.role, w.url.rstrip("/"))
    return out


def wait_workers(frontend: str, n: int, timeout_s: float = 60) -> None:
    deadline = time.time() + timeout_s
    while len(fetch_status(frontend).workers) < n:
        if time.time() > deadline:
            raise TimeoutError(f"fewer than {n} workers registered at {frontend}")
        time.sleep(1)


def scrape(url: str, names: tuple[str, ...]) -> dict[str, float]:
    """Each series' sum over its labels, from one read of ``url``/metrics."""
    return prom.fetch_totals(url, names)


def kv_snapshot(frontend: str) -> dict[str, dict[str, Any]]:
    """Per worker: the frontend's predicted / heartbeat-learnt hit tokens and the engine's own counters."""
    names = ("role", "predicted", "via_heartbeats", "gpu_hits", "lmcache_hits", "queried")
    return renamed(kv_hit_snapshot(frontend), {k: k for k in names})


def kv_compare(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> dict[str, Any]:
    rows = []
    for wid, a in sorted(after.items()):
        b = before.get(wid, {})
        d = {k: a[k] - b.get(k, 0.0) for k in a if k != "role"}
        actual = d["gpu_hits"] + d["lmcache_hits"]
        rows.append({"worker": wid, "role": a["role"], "predicted": d["predicted"], "actual": actual,
                     "actual_gpu": d["gpu_hits"], "actual_lmcache": d["lmcache_hits"], "queried": d["queried"],
                     "actual_via_heartbeats": d["via_heartbeats"]})  # fmt: skip
    predicted, actual = sum(r["predicted"] for r in rows), sum(r["actual"] for r in rows)
    return {
        "rows": rows,
        "predicted": predicted,
        "actual": actual,
        "rel_error": round(abs(predicted - actual) / actual, 5) if actual else None,
        "hit_rate": round(actual / q, 4) if (q := sum(r["queried"] for r in rows)) else None,
        "heartbeats_agree": all(r["actual_via_heartbeats"] == r["actual"] for r in rows),
    }


# ---------------------------------------------------------------------------------------------------
# log scan, doctor, benchmarks

BAD_LOG = [r"compatibility hash mismatch", r"compiled extension not found", r"NIXL_ERR"]
NOTE_LOG = [r"nixl.*(error|failed)", r"Traceback \(most recent call last\)", r"EngineDeadError"]


def scan_logs(run_dir: Path) -> dict[str, list[str]]:
    """Lines that fail the check (BAD_LOG) and lines worth a look (NOTE_LOG), from every log of the run."""
    found: dict[str, list[str]] = {"bad": [], "notes": []}
    for path in sorted(run_dir.glob("*.log")):
        for n, line in enumerate(path.read_text(errors="replace").splitlines()):
            if "import_utils.py" in line:  # vLLM's note on optional modules it could not import (nixl_ep)
                continue
            for key, pats in (("bad", BAD_LOG), ("notes", NOTE_LOG)):
                if any(re.search(p, line, re.IGNORECASE) for p in pats):
                    found[key].append(f"{path.name}:{n + 1}: {line.strip()[:300]}")
    found["notes"] = found["notes"][:40]
    return found


def count_in_log(path: Path, pattern: str) -> int:
    return len(re.findall(pattern, path.read_text(errors="replace"))) if path.exists() else 0


def save_logs(run_dir: Path, stage: str) -> None:
    with tarfile.open(OUT / f"logs_stack_{stage}.tar.gz", "w:gz") as tar:
        for path in sorted(run_dir.glob("*.log")) + sorted(run_dir.glob("*.yaml")):
            tar.add(path, arcname=path.name)


def doctor() -> dict[str, Any]:
    """(f) ``pdkit doctor --json`` as it stands, or "absent" where this pdkit has no doctor command."""
    base = [sys.executable, "-m", "pdkit.cli", "doctor"]
    if subprocess.run([*base, "--help"], capture_output=True, timeout=120).returncode != 0:
        return {"verdict": None, "status": "absent"}
    try:
        done = subprocess.run([*base, "--json"], capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        return {"verdict": False, "status": "timed out after 240 s"}
    try:
        report: Any = json.loads(done.stdout)
    except json.JSONDecodeError:
        report = None
    return {"verdict": report is not None, "status": "recorded" if report is not None else "output is not JSON",
            "rc": done.returncode, "report": report, "stdout_tail": None if report is not None else done.stdout[-2000:],
            "stderr_tail": done.stderr[-1000:]}  # fmt: skip


def multiturn_bench(frontend: str, w: Workload) -> int:
    argv = [sys.executable, "-m", "pdkit.cli", "bench", "--endpoint", frontend, "--workload", "multiturn",
            "--api", "chat", "--sessions", str(w.sessions), "--turns", str(w.turns), "--system-len", str(w.system_len),
            "--user-len", str(w.user_len), "--turn-output-len", str(w.turn_output_len), "--rate", str(w.chat_rate),
            "--max-duration", "150", "--warmup", "0", "--seed", str(SEED), "--no-progress", "--no-plots",
            "--label", "stack-kvr", "--output", str(OUT / "bench_stack_kvr.json")]  # fmt: skip
    log("pdkit bench:", " ".join(argv[4:]))
    return subprocess.run(argv, timeout=300).returncode


VLLM_BENCH_RESULT = "vllm_bench_stack.json"


def vllm_bench_argv(frontend: str, w: Workload, prompts: int | None = None, name: str = VLLM_BENCH_RESULT) -> list[str]:
    """``vllm bench serve`` on the random dataset with the embedded model's tokenizer, result saved under OUT."""
    prompts = w.bench_prompts if prompts is None else prompts
    return [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--backend", "openai",
            "--base-url", frontend, "--endpoint", "/v1/completions", "--model", SYNTHETIC_SERVED_NAME,
            "--tokenizer", str(default_model_dir()), "--dataset-name", "random",
            "--random-input-len", str(w.bench_input_len), "--random-output-len", str(w.bench_output_len),
            "--num-prompts", str(prompts), "--request-rate", str(w.bench_rate), "--ignore-eos",
            "--seed", str(SEED), "--disable-tqdm", "--save-result", "--result-dir", str(OUT),
            "--result-filename", name]  # fmt: skip


def vllm_bench(
    frontend: str,
    w: Workload,
    skip: bool = False,
    prompts: int | None = None,
    name: str = VLLM_BENCH_RESULT,
    during: Any = None,
) -> dict[str, Any]:
    """(e) ``vllm bench serve`` through the frontend: every request must complete.  ``during``: called
    while the benchmark runs (the restart stage kills the lmcache server there); its result is returned
    as ``during``."""
    if skip:
        return {"verdict": None, "status": "skipped: --skip-vllm-bench"}
    if importlib.util.find_spec("vllm") is None:
        return {"verdict": None, "status": "skipped: vllm is not importable here"}
    prompts = w.bench_prompts if prompts is None else prompts
    argv = vllm_bench_argv(frontend, w, prompts, name)
    log("vllm bench:", " ".join(argv[3:]))
    t0 = time.time()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: dict[str, Any] = {"during": during() if during is not None else None}
    try:
        stdout, _ = proc.communicate(timeout=360)
    except subprocess.TimeoutExpired:
        proc.kill()
        return {**out, "verdict": False, "status": "timed out after 360 s"}
    out |= {"rc": proc.returncode, "wall_s": round(time.time() - t0, 1)}
    try:
        result = json.loads((OUT / name).read_text())
    except (OSError, json.JSONDecodeError):
        return {**out, "verdict": False, "status": "no result file", "output_tail": stdout[-3000:]}
    keys = ("completed", "failed", "request_throughput", "mean_ttft_ms", "p99_ttft_ms", "mean_itl_ms", "p99_itl_ms")
    out |= {k: result.get(k) for k in keys} | {"num_prompts": prompts}
    failed = result.get("failed", prompts - (result.get("completed") or 0))
    out["verdict"] = proc.returncode == 0 and failed == 0 and result.get("completed") == prompts
    return out


# ---------------------------------------------------------------------------------------------------
# stages


class StageReport:
    """The stage's JSON: figures and one boolean verdict per check (None: not applicable), written often."""

    def __init__(self, stage: str, opts: Options) -> None:
        self.path = OUT / f"gpu_check_stack_{stage}.json"
        self.data: dict[str, Any] = {
            "stage": stage,
            "engine": opts.engine,
            "one_gpu": opts.one_gpu,
            "workload": opts.workload.__dict__,
            "environment": environment(),
            "checks": {},
        }

    def check(self, name: str, verdict: bool | None, **figures: Any) -> None:
        self.data["checks"][name] = {"verdict": verdict, **figures}
        self.save()

    def save(self) -> None:
        checks = self.data["checks"].values()
        self.data["ok"] = "error" not in self.data and all(c["verdict"] is not False for c in checks)
        self.path.write_text(json.dumps(self.data, indent=1, default=str))


def finish(dep: Deployment, report: StageReport, stage: str) -> None:
    stopped = dep.stop(vllm=report.data["engine"] == "vllm")
    save_logs(dep.run_dir, stage)
    logs = scan_logs(dep.run_dir)
    report.check("stopped_clean", not stopped["leftover"], **stopped)
    report.check("logs_clean", not logs["bad"], bad_lines=logs["bad"], lines_to_look_at=logs["notes"])


def stage_agg(opts: Options, report: StageReport) -> None:
    report.check("f_doctor", **_verdict(doctor()))
    reqs = build_requests(opts.workload, default_model_dir())
    mode_args, config = deployment("agg", opts, port_settings(opts.free_ports))
    report.data["deployment"] = {"launch_args": mode_args, "config": config}
    dep = Deployment("agg", mode_args, config, opts.state / "stack-agg")
    try:
        report.data["ready_s"] = dep.wait_ready()
        log(f"agg ready in {report.data['ready_s']} s")
        rows = asyncio.run(run_requests(dep.frontend, reqs))
        served = all(r["ok"] for r in rows)  # (a greedy EOS before MAX_TOKENS is allowed: disagg must match it)
        failed = [{k: r[k] for k in ("kind", "tokens", "error")} for r in rows if not r["ok"]]
        outputs = [r["output_tokens"] for r in rows]
        report.check("agg_reference_served", served, requests=len(rows), output_tokens=outputs, failed=failed)
        (opts.state / "stack-agg.json").write_text(json.dumps({"requests": reqs, "results": rows}))
        # also under $OUT: seeded dummy weights make it the same on every machine, so a machine that went
        # cold between the stages costs only the upload next time (``--ref-from``)
        (OUT / "stack-agg-reference.json").write_text((opts.state / "stack-agg.json").read_text())
        report.data["reference"] = [{k: v for k, v in r.items() if k != "text"} for r in rows]
        wait_workers(dep.frontend, 2)
        time.sleep(3)  # every agent has heartbeaten its counters: the frontend's baselines are set
        before = kv_snapshot(dep.frontend)
        bench_rc = multiturn_bench(dep.frontend, opts.workload)
        time.sleep(4)  # the last heartbeats carry the final counters to the frontend
        kv = kv_compare(before, kv_snapshot(dep.frontend))
        exact = kv["actual"] > 0 and all(r["predicted"] == r["actual"] for r in kv["rows"])
        report.check("d_kv_prediction", bench_rc == 0 and exact, bench_rc=bench_rc, **kv)
    finally:
        finish(dep, report, "agg")


def load_reference(opts: Options) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(requests, agg results) the agg stage saved (on this machine, or carried in with ``--ref-from``)."""
    ref_file = opts.state / "stack-agg.json"
    if not ref_file.exists():
        raise RuntimeError(f"{ref_file} is missing: run --stage agg first on this machine (same --quick)")
    ref = json.loads(ref_file.read_text())
    return ref["requests"], ref["results"]


def equal_to(rows: list[dict[str, Any]], ref_rows: list[dict[str, Any]]) -> list[bool]:
    return [r["ok"] and r["text"] == a["text"] for r, a in zip(rows, ref_rows, strict=True)]


def stage_disagg(opts: Options, report: StageReport) -> None:
    reqs, ref_rows = load_reference(opts)
    sim = opts.engine == "sim"
    mode_args, config = deployment("disagg", opts, port_settings(opts.free_ports))
    faults = int(config["decode"]["extra_env"]["PDKIT_VERIFY_INJECT_FAULT"])
    if faults != len(reqs):
        raise RuntimeError(f"the agg reference has {len(reqs)} requests, this run expects {faults}: same --quick")
    report.data["deployment"] = {"launch_args": mode_args, "config": config}
    dep = Deployment("disagg", mode_args, config, opts.state / "stack-disagg")
    try:
        report.data["ready_s"] = dep.wait_ready()
        log(f"disagg ready in {report.data['ready_s']} s")
        urls = workers_by_role(dep.frontend)
        counters = (lambda: {}) if sim else (lambda: verify_counters(urls))
        wait_workers(dep.frontend, 2)
        time.sleep(3)  # the agents' first heartbeats set the frontend's baselines (for the information figures)
        kv0, c0 = kv_snapshot(dep.frontend), counters()
        pass1 = asyncio.run(run_requests(dep.frontend, reqs))
        time.sleep(1)
        c1 = counters()
        pass2 = asyncio.run(run_requests(dep.frontend, reqs, watch=None if sim else urls["prefill"]))
        time.sleep(1)
        c2 = counters()
        eq1, eq2 = equal_to(pass1, ref_rows), equal_to(pass2, ref_rows)
        report.data["passes"] = pass_rows(pass1, pass2, ref_rows, eq1, eq2)
        report.check("a_disagg_equals_agg", all(eq1) and all(eq2), pass1_equal=f"{sum(eq1)}/{len(eq1)}",
                     pass2_equal=f"{sum(eq2)}/{len(eq2)}", completions_and_chats=len(eq1))  # fmt: skip
        if sim:
            report.check("b_lmcache_restore", None, status="n/a on sim (no LMCache)", pass2_equal=all(eq2))
            report.check("c_verify_faults", None, status="n/a on sim (no NIXL)")
        else:
            mp = opts.lmcache_mode == "mp"
            report.check("b_lmcache_restore", all(eq2) and reused(pass2, mp), pass2_equal=f"{sum(eq2)}/{len(eq2)}",
                         restorable_hit_ratios=rounded(reuse_ratios(pass2, mp)),
                         hit_ratios=rounded(hit_ratios(pass2)), whole_chunks_only=mp)  # fmt: skip
            report.check("c_verify_faults", **faults_check(dep.run_dir, faults, c0, c1, c2, eq1))
        report.check("d_kv_prediction_info", None, **kv_compare(kv0, kv_snapshot(dep.frontend)),
                     status="information only: prefill runs without prefix cache, its hits are LMCache tokens "
                            "(see the docstring); the verdict is the agg stage's")  # fmt: skip
        report.check("e_vllm_bench", **_verdict(vllm_bench(dep.frontend, opts.workload, opts.skip_vllm_bench)))
    finally:
        finish(dep, report, "disagg")


RESTORE_COUNTERS = ("pdkit:lmcache_restore_checked_blocks_total", "pdkit:lmcache_restore_mismatch_blocks_total",
                    "pdkit:lmcache_restore_unverified_blocks_total", "pdkit:lmcache_hit_tokens_total")  # fmt: skip


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


CHUNK = 256  # the chunk size every stage gives LMCache


def reuse_ratios(rows: list[dict[str, Any]], mp: bool) -> list[float]:
    """Per request with something LMCache can restore: hit tokens / restorable tokens (the verdicts' figure).

    In-process LMCache (``save_unfull_chunk``) can restore the whole prompt; an MP server stores and looks
    up whole chunks only, so there a prompt shorter than one chunk has nothing to restore and a longer one
    its chunk-aligned part (less the last token when that is the whole prompt: vLLM computes >= 1 token).
    """
    out = []
    for r in rows:
        restorable = r["prompt_tokens"] // CHUNK * CHUNK if mp else r["prompt_tokens"]
        if restorable:
            out.append((r["lmcache_hit_tokens"] or 0) / restorable)
    return out


def reused(rows: list[dict[str, Any]], mp: bool) -> bool:
    """Every restorable prompt restored > 90 % (and there was at least one)."""
    ratios = reuse_ratios(rows, mp)
    return bool(ratios) and min(ratios) > 0.9


def hit_ratios(rows: list[dict[str, Any]]) -> list[float]:
    """Per request: the share of its prompt the watched worker loaded from LMCache (unrounded: verdicts use it)."""
    return [(r["lmcache_hit_tokens"] or 0) / r["prompt_tokens"] if r["prompt_tokens"] else 0.0 for r in rows]


def rounded(xs: list[float]) -> list[float]:
    return [round(x, 4) for x in xs]


def lmcache_servers(dep: Deployment) -> dict[int, int]:
    """pid -> HTTP port of every ``lmcache server`` below the launcher now (pdkit passes ``--http-port``)."""
    out = {}
    for pid in descendants(dep.proc.pid):
        argv = cmdline(pid).split()
        if "--l1-size-gb" in argv and "--http-port" in argv and alive(pid):
            out[pid] = int(argv[argv.index("--http-port") + 1])
    return out


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=2) as resp:
            return resp.status == 200
    except (OSError, ValueError):
        return False


def kill_lmcache_server(dep: Deployment, after_s: float, timeout_s: float = 150.0) -> dict[str, Any]:
    """(h): SIGKILL the worker's ``lmcache server`` ``after_s`` into the load (a crash, not a stop), then wait
    for pdkit's supervisor to start a new one and for it to answer ``/healthcheck``."""
    time.sleep(after_s)
    servers = lmcache_servers(dep)
    if not servers:
        return {"killed": None, "restarted": False, "status": "no lmcache server found below the launcher"}
    pid, port = next(iter(servers.items()))
    os.kill(pid, signal.SIGKILL)
    t0 = time.time()
    log(f"killed lmcache server {pid} (http port {port})")
    while time.time() - t0 < timeout_s:
        new = [p for p in lmcache_servers(dep) if p != pid]
        if new and healthy(port):
            log(f"lmcache server restarted as {new[0]} in {time.time() - t0:.1f} s")
            return {"killed": pid, "new_pid": new[0], "restarted": True, "restart_s": round(time.time() - t0, 1)}
        time.sleep(0.5)
    return {"killed": pid, "restarted": False, "status": f"no healthy server {timeout_s:.0f} s after the kill"}


def p5_ttft(frontend: str, w: Workload, watch: str | None) -> dict[str, Any]:
    """P5: TTFT of ``p5_prompts`` distinct ``p5_tokens``-token prompts cold (first time), then warm (the same
    again: with the prefix cache off, a restore from LMCache).  Same prompts in every stage (fixed seed)."""
    factory = PromptFactory(default_model_dir(), seed=SEED + 5)
    body = {"model": SYNTHETIC_SERVED_NAME, "max_tokens": MAX_TOKENS, "temperature": 0}
    prompts = [factory.completion_prompt(w.p5_tokens) for _ in range(w.p5_prompts)]
    path = "/v1/completions"
    reqs = [{"kind": "p5", "tokens": w.p5_tokens, "path": path, "body": {"prompt": p, **body}} for p in prompts]
    cold = asyncio.run(run_requests(frontend, reqs))
    warm = asyncio.run(run_requests(frontend, reqs, watch=watch))
    c, h = ttfts_ms(cold), ttfts_ms(warm)
    return {"prompt_tokens": w.p5_tokens, "cold_ttft_ms": c, "warm_ttft_ms": h, "median_cold_ms": median(c),
            "median_warm_ms": median(h), "warm_hit_ratios": rounded(hit_ratios(warm)) if watch else None,
            "warm_equals_cold": [a["text"] == b["text"] for a, b in zip(cold, warm, strict=True)]}  # fmt: skip


def ttfts_ms(rows: list[dict[str, Any]]) -> list[float | None]:
    """Each request's TTFT in ms, None where it failed (positions kept: row i is prompt i)."""
    return [round(r["ttft_s"] * 1000, 1) if r["ttft_s"] else None for r in rows]


def median(xs: list[float | None]) -> float | None:
    got = [x for x in xs if x is not None]
    return statistics.median(got) if got else None


def single_agg_deployment(stage: str, opts: Options, report: StageReport) -> tuple[Deployment, str | None]:
    """Start the restart / p5 stage's one agg worker; (deployment, its engine URL or None on sim)."""
    mode_args, config = deployment(stage, opts, port_settings(opts.free_ports))
    report.data["deployment"] = {"launch_args": mode_args, "config": config}
    dep = Deployment(stage, mode_args, config, opts.state / f"stack-{stage}")
    report.data["ready_s"] = dep.wait_ready()
    log(f"{stage} ready in {report.data['ready_s']} s")
    wait_workers(dep.frontend, 1)
    return dep, None if opts.engine == "sim" else workers_by_role(dep.frontend)["agg"]


def stage_restart(opts: Options, report: StageReport) -> None:
    """(g), (h), (i) and MP's (p5) on one agg worker with LMCache MP + verify_restores, prefix cache off."""
    reqs, ref_rows = load_reference(opts)
    w = opts.workload
    dep, url = single_agg_deployment("restart", opts, report)
    try:
        counters = (lambda: {}) if url is None else (lambda: scrape(url, RESTORE_COUNTERS))
        c0 = counters()
        cold = asyncio.run(run_requests(dep.frontend, reqs))
        warm = asyncio.run(run_requests(dep.frontend, reqs, watch=url))
        c1 = counters()
        eq_cold, eq_warm = equal_to(cold, ref_rows), equal_to(warm, ref_rows)
        report.check("g_mp_equals_agg", all(eq_cold) and all(eq_warm), cold_equal=f"{sum(eq_cold)}/{len(eq_cold)}",
                     restore_equal=f"{sum(eq_warm)}/{len(eq_warm)}")  # fmt: skip
        if url is None:
            report.check("g_mp_reuse", None, status="n/a on sim (no LMCache)")
        else:
            report.check("g_mp_reuse", reused(warm, True) and all(eq_warm),
                         restorable_hit_ratios=rounded(reuse_ratios(warm, True)), hit_ratios=rounded(hit_ratios(warm)),
                         restore_counters=delta(c0, c1), status="MP stores whole 256-token chunks only")  # fmt: skip
        kill = None if url is None else (lambda: kill_lmcache_server(dep, w.kill_after_s))
        name = "vllm_bench_restart.json"
        bench = vllm_bench(dep.frontend, w, opts.skip_vllm_bench, w.restart_bench_prompts, name, kill)
        restarted = url is None or bool((bench.get("during") or {}).get("restarted"))
        verdict = bench["verdict"] and restarted if bench["verdict"] is not None else None
        report.check("h_server_restart_under_load", verdict,
                     **{k: v for k, v in bench.items() if k != "verdict"},
                     **({"status_kill": "n/a on sim (no lmcache server)"} if url is None else {}))  # fmt: skip
        c2 = counters()
        save = asyncio.run(run_requests(dep.frontend, reqs))
        restore = asyncio.run(run_requests(dep.frontend, reqs, watch=url))
        c3 = counters()
        eq_save, eq_restore = equal_to(save, ref_rows), equal_to(restore, ref_rows)
        # LMCache must be working again, not silently off (a worker that never re-registered its KV cache with
        # the new server gets every store refused, and equal outputs would then prove nothing).
        back = url is None or reused(restore, True)
        report.check("i_after_restart_equals_agg", all(eq_save) and all(eq_restore) and back,
                     save_equal=f"{sum(eq_save)}/{len(eq_save)}", restore_equal=f"{sum(eq_restore)}/{len(eq_restore)}",
                     lmcache_reused_after_restart=back,
                     restorable_hit_ratios=rounded(reuse_ratios(restore, True)) if url else None,
                     reregistered_lines_in_log=count_in_log(dep.run_dir / "agg-0.log", r"Finished re-registering KV"),
                     restore_counters_after_restart=delta(c2, c3),
                     status="a mismatch counted with outputs equal: LMCache#4492 caught, recomputed")  # fmt: skip
        report.check("p5_ttft_mp", None, **p5_ttft(dep.frontend, w, url), status="figures (side by side: stage p5)")
    finally:
        finish(dep, report, "restart")


def stage_p5(opts: Options, report: StageReport) -> None:
    """(p5) with LMCache in-process on the same kind of worker (agg, prefix cache off)."""
    dep, url = single_agg_deployment("p5", opts, report)
    try:
        report.check("p5_ttft_in_process", None, **p5_ttft(dep.frontend, opts.workload, url), status="figures")
    finally:
        finish(dep, report, "p5")


STAGE_FUNCTIONS = {"agg": stage_agg, "disagg": stage_disagg, "restart": stage_restart, "p5": stage_p5}


def pass_rows(pass1: list[dict], pass2: list[dict], ref: list[dict], eq1: list[bool], eq2: list[bool]) -> list[dict]:
    """Per request: both passes against agg, TTFTs, and pass 2's LMCache hit tokens."""
    return [
        {
            "kind": a["kind"],
            "tokens": a["tokens"],
            "prompt_tokens": r1["prompt_tokens"],
            "pass1_equals_agg": e1,
            "pass2_equals_agg": e2,
            "ttft_agg_s": a["ttft_s"],
            "ttft_pass1_s": r1["ttft_s"],
            "ttft_pass2_s": r2["ttft_s"],
            "pass2_lmcache_hit_tokens": r2.get("lmcache_hit_tokens"),
        }
        for r1, r2, a, e1, e2 in zip(pass1, pass2, ref, eq1, eq2, strict=True)
    ]


DECODE_COUNTERS = ("pdkit:kv_verify_checked_blocks_total", "pdkit:kv_verify_mismatch_blocks_total",
                   "pdkit:kv_verify_requests_total")  # fmt: skip
PREFILL_COUNTERS = ("pdkit:kv_verify_unsent_total", "pdkit:kv_fingerprint_requests_total")


def verify_counters(urls: dict[str, str]) -> dict[str, float]:
    return scrape(urls["decode"], DECODE_COUNTERS) | scrape(urls["prefill"], PREFILL_COUNTERS)


def faults_check(run_dir: Path, faults: int, c0: dict, c1: dict, c2: dict, equal: list[bool]) -> dict[str, Any]:
    """(c): every injected fault counted and warned about once, outputs still equal; pass 2 clean."""
    d1 = {k: c1[k] - c0[k] for k in c0}
    d2 = {k: c2[k] - c1[k] for k in c1}
    warned = count_in_log(run_dir / "decode-0.log", r"fail their fingerprint")
    recovered = count_in_log(run_dir / "decode-0.log", r"Recovered from KV load failure")  # vLLM's wording
    ok = (d1["pdkit:kv_verify_mismatch_blocks_total"] == faults and warned == faults and all(equal)
          and d2["pdkit:kv_verify_mismatch_blocks_total"] == 0 and d1["pdkit:kv_verify_unsent_total"] == 0
          and d2["pdkit:kv_verify_unsent_total"] == 0)  # fmt: skip
    return {"verdict": ok, "faults_injected": faults, "pass1": d1, "pass2": d2, "warnings_in_log": warned,
            "vllm_recovered_lines_in_log": recovered, "pass1_outputs_equal": all(equal)}  # fmt: skip


def _verdict(d: dict[str, Any]) -> dict[str, Any]:
    """``report.check(name, **_verdict(d))`` for helpers that return their verdict inside their figures."""
    return {"verdict": d.pop("verdict"), **d}


# ---------------------------------------------------------------------------------------------------


LONG_FIGURES = ("verdict", "rows", "report", "hit_ratios", "lines_to_look_at", "stdout_tail", "stderr_tail")


def summary(report: StageReport) -> str:
    lines = [f"stage {report.data['stage']} ({report.data['engine']}): {'PASS' if report.data['ok'] else 'FAIL'}"]
    if "error" in report.data:
        lines.append(f"  error: ...{report.data['error'][-600:]}")
    for name, c in report.data["checks"].items():
        verdict = {True: "pass", False: "FAIL", None: "n/a"}[c["verdict"]]
        figures = {k: v for k, v in c.items() if k not in LONG_FIGURES}
        lines.append(f"  {name:<24} {verdict:<5} {json.dumps(figures, default=str)[:200]}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--stage", choices=[*STAGES, "all"], default="all", help="all: agg then disagg in one call")
    parser.add_argument("--lmcache-mode", choices=["in_process", "mp"], default=None,
                        help="mp: issue 16's checks (agg reference without LMCache, prefill with an lmcache server; "
                             "stage restart); default: the stack's mode")  # fmt: skip
    parser.add_argument("--engine", choices=["vllm", "sim"], default="vllm", help="sim: CPU rehearsal")
    parser.add_argument("--two-gpus", action="store_true", help="prefill and the second agg worker on GPU 1")
    parser.add_argument("--quick", action="store_true", help="small workloads (rehearsals, tests)")
    parser.add_argument("--free-ports", action="store_true", help="free loopback ports instead of pdkit's defaults")
    parser.add_argument("--state-dir", type=Path, default=STATE, help="state between calls (the agg reference)")
    parser.add_argument("--skip-vllm-bench", action="store_true", help="record (e) as skipped (fast CPU tests)")
    parser.add_argument("--dry-run", action="store_true", help="print the deployments' plans, start nothing")
    parser.add_argument("--ref-from", type=Path, help="stage disagg: a stack-agg-reference.json an earlier agg stage "
                        "wrote under $OUT (another machine of the same stack), instead of this machine's")  # fmt: skip
    args = parser.parse_args()
    opts = Options(engine=args.engine, one_gpu=not args.two_gpus, workload=QUICK if args.quick else Workload(),
                   free_ports=args.free_ports, state=args.state_dir, skip_vllm_bench=args.skip_vllm_bench,
                   lmcache_mode=args.lmcache_mode)  # fmt: skip
    stages = list(ALL_STAGES) if args.stage == "all" else [args.stage]
    if args.dry_run:
        return dry_run(opts, stages)
    OUT.mkdir(parents=True, exist_ok=True)
    opts.state.mkdir(parents=True, exist_ok=True)
    if args.ref_from is not None:
        (opts.state / "stack-agg.json").write_text(args.ref_from.read_text())
    reports = []
    for stage in stages:
        report = StageReport(stage, opts)
        try:
            STAGE_FUNCTIONS[stage](opts, report)
        except Exception as exc:  # report it, keep the JSON and the logs
            log(f"stage {stage} FAILED: {exc!r}")
            report.data["error"] = repr(exc)[:3000]
        report.save()
        reports.append(report)
        if "error" in report.data and stage == "agg":
            break  # the disagg stage needs agg's reference
    print("\n".join(summary(r) for r in reports), flush=True)
    return 0 if all(r.data["ok"] for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
