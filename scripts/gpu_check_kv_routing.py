"""Issue 7 on 2xH200: KV-aware routing's predicted prefix hits against real vLLM's hits, through pdkit.

Each stage launches a deployment with ``--policy kv_aware`` (``pdkit launch``: frontend, worker agents,
vLLM 0.26.0 publishing KV events to the frontend's SUB socket), runs ``pdkit bench --workload multiturn
--api chat`` (conversations sharing system prompts; each turn re-sends the history plus the model's own
answer), and compares, per worker, the deltas of

* predicted: the frontend's ``pdkit_kv_predicted_hit_tokens_total`` (all roles the worker was chosen for),
* actual: the worker's own counters, scraped from its ``/metrics`` directly --
  ``vllm:prefix_cache_hits_total`` (GPU prefix cache) + ``pdkit:lmcache_hit_tokens_total`` (LMCache loads),
  and the same figures as the frontend learnt them over the heartbeats (``pdkit_kv_actual_hit_tokens``).

Goal (issue 7): predicted within 5 % of actual.  Stages:

* ``agg2``: ``pdkit launch agg --gpus 0,1`` (two workers, LMCache on), the GPU KV cache capped with
  ``--num-gpu-blocks-override`` so that vLLM evicts and later turns come back from LMCache's CPU tier
  (CPU-tier events in vLLM's hash space, published by PdConnector);
* ``disagg``: ``pdkit launch disagg --prefill-gpu 1 --decode-gpu 0`` (prefix cache on on both roles):
  the prefill choice and the decode choice are both predicted.

Usage on the device (after the bundle is unpacked and pdkit installed, see scripts/gpu_session.sh):
    python3 scripts/gpu_check_kv_routing.py                 # both stages, ~7 min (~4 on a warm machine)
    python3 scripts/gpu_check_kv_routing.py --engine sim    # rehearsal on CPU (simulated engines)
Writes ``$OUT/gpu_check_kv_routing.json``, the bench JSON files and ``$OUT/logs_kvr_<stage>.tar.gz``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

from pdkit.gpu_check import harness as g
from pdkit.gpu_check.kv_hits import kv_hit_snapshot, renamed
from pdkit.status import WorkerStatus, fetch_status  # noqa: E402

GOAL = 0.05
# x16 tokens = 32k tokens of GPU KV per agg worker: the default workload (48 chats, 2048-token system
# prompts, 4 turns of 256 + 64 tokens) leaves ~33k distinct tokens per worker, so vLLM evicts and some
# turns come back from LMCache's CPU tier, while the ~10 chats in flight at 2/s fit without preemption.
GPU_BLOCKS_AGG = 2000


FRONTEND = f"http://127.0.0.1:{g.PORT}"


def workers() -> list[WorkerStatus]:
    return fetch_status(FRONTEND).workers


#: This check's JSON names for the shared snapshot's entries (fe_: the frontend's view, w_: the engine's).
SNAPSHOT_NAMES = {"predicted": "predicted", "fe_actual": "via_heartbeats", "fe_queries": "fe_queries",
                  "w_prefix_cache": "gpu_hits", "w_queries": "queried", "w_lmcache": "lmcache_hits"}  # fmt: skip


def snapshot() -> dict[str, dict[str, float]]:
    """Per worker id: what the frontend predicted and learnt over heartbeats (as ``pdkit status`` reads
    it), and the engine's own hit counters, read from its ``/metrics`` directly."""
    return renamed(kv_hit_snapshot(FRONTEND), SNAPSHOT_NAMES)


def compare(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], ws: list[WorkerStatus]) -> dict:
    roles = {w.worker_id: w.role for w in ws}
    rows = []
    for wid in sorted(after):
        d = {k: after[wid].get(k, 0.0) - before.get(wid, {}).get(k, 0.0) for k in after[wid]}
        actual = d.get("w_prefix_cache", 0.0) + d.get("w_lmcache", 0.0)
        fe_actual = d.get("fe_actual", 0.0)
        predicted = d.get("predicted", 0.0)
        err = abs(predicted - actual) / actual if actual else (0.0 if predicted == 0 else 1.0)
        rows.append({"worker": wid, "role": roles.get(wid), "predicted": predicted, "actual": actual,
                     "actual_gpu": d.get("w_prefix_cache", 0.0), "actual_lmcache": d.get("w_lmcache", 0.0),
                     "actual_via_heartbeats": fe_actual, "queried": d.get("w_queries", 0.0),
                     "rel_error": round(err, 4)})  # fmt: skip
    total_p = sum(r["predicted"] for r in rows)
    total_a = sum(r["actual"] for r in rows)
    total_q = sum(r["queried"] for r in rows)
    total_err = abs(total_p - total_a) / total_a if total_a else 1.0
    return {
        "rows": rows,
        "predicted": total_p,
        "actual": total_a,
        "hit_rate": round(total_a / total_q, 4) if total_q else None,
        "rel_error": round(total_err, 4),
        "heartbeats_agree": all(
            abs(r["actual_via_heartbeats"] - r["actual"]) <= 0.01 * max(r["actual"], 1) for r in rows
        ),
        "ok": total_a > 0 and total_err <= GOAL and all(r["rel_error"] <= GOAL for r in rows if r["actual"] > 1000),
    }


def wait_workers(n: int, timeout: float = 60) -> list[WorkerStatus]:
    """The registered workers, once all ``n`` are there and have sent a heartbeat with hit counters."""
    deadline = time.time() + timeout
    while True:
        ws = workers()
        if len(ws) >= n:
            return ws
        if time.time() > deadline:
            raise TimeoutError(f"{len(ws)} of {n} workers registered")
        time.sleep(1)


def bench(label: str, sessions: int, rate: float) -> int:
    argv = [sys.executable, "-m", "pdkit.cli", "bench", "--endpoint", f"http://127.0.0.1:{g.PORT}",
            "--workload", "multiturn", "--api", "chat", "--sessions", str(sessions), "--turns", "4",
            "--system-len", "2048", "--user-len", "256", "--turn-output-len", "64", "--rate", str(rate),
            "--max-duration", "120", "--warmup", "0", "--seed", "7", "--no-progress", "--no-plots",
            "--label", label, "--output", str(g.OUT / f"bench-kvr-{label}.json")]  # fmt: skip
    g.log("bench:", " ".join(argv[3:]))
    return subprocess.run(argv).returncode


def deployment(name: str, engine: str, one_gpu: bool) -> tuple[list[str], dict[str, Any], int]:
    """(``pdkit launch`` mode args, config, number of workers) of a stage.

    ``one_gpu``: both workers share GPU 0 (``share_gpus``, 40 % of its memory each) -- what a machine
    with one GPU can run; the KV-event path and the hit accounting are the same as on two GPUs."""
    config: dict[str, Any] = {**g.common_config(), "max_model_len": 16384,
                              "frontend": {"port": g.PORT, "policy": "kv_aware"}}  # fmt: skip
    second = 0 if one_gpu else 1
    if name == "agg2":
        config |= {"mode": "agg", "agg": {"gpus": [[0], [second]]}}
        if engine == "vllm":
            config["agg"]["extra_args"] = ["--num-gpu-blocks-override", str(GPU_BLOCKS_AGG)]
        mode_args = ["agg"] if one_gpu else ["agg", "--gpus", "0,1"]
    else:
        config |= {"mode": "disagg", "prefill": {"gpus": [[second]]}, "decode": {"gpus": [[0]]}}
        mode_args = ["disagg"] if one_gpu else ["disagg", "--prefill-gpu", "1", "--decode-gpu", "0"]
    if one_gpu:
        config |= {"share_gpus": True, "gpu_memory_utilization": 0.4}
    if engine != "vllm":
        mode_args += ["--engine", engine]
    return mode_args, config, 2


def stage(name: str, engine: str, sessions: int, rate: float, one_gpu: bool) -> dict[str, Any]:
    mode_args, config, n = deployment(name, engine, one_gpu)
    run_dir = g.STATE / f"kvr-{name}"
    proc, ready_s = g.launch(mode_args, config, run_dir)
    try:
        g.log(f"{name} ready in {ready_s:.1f} s")
        ws = wait_workers(n)
        time.sleep(3)  # every agent has sent heartbeats with its counters: the frontend's baselines are set
        before = snapshot()
        t0 = time.time()
        rc = bench(name, sessions, rate)
        time.sleep(4)  # the last heartbeats carry the final counters to the frontend
        after = snapshot()
        index = {w.worker_id: w.index_blocks for w in workers()}
    finally:
        stopped = g.stop(proc, run_dir)
        g.save_logs(run_dir, f"kvr_{name}")
    result = compare(before, after, ws)
    return {"ready_s": round(ready_s, 1), "bench_rc": rc, "bench_s": round(time.time() - t0, 1),
            "index_blocks_at_end": index, **result, "stop": stopped,
            "bad_log_lines": g.scan_logs(run_dir)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", choices=["agg2", "disagg", "all"], default="all")
    parser.add_argument("--engine", choices=["vllm", "sim"], default="vllm")
    parser.add_argument("--sessions", type=int, default=48)
    parser.add_argument("--rate", type=float, default=2.0, help="new conversations per second")
    parser.add_argument("--one-gpu", action="store_true", help="both workers share GPU 0 (1-GPU machine)")
    parser.add_argument("--dry-run", action="store_true", help="check the deployments' plans only, start nothing")
    args = parser.parse_args()
    stages = ["agg2", "disagg"] if args.stage == "all" else [args.stage]
    if args.dry_run:
        return g.dry_run([deployment(name, args.engine, args.one_gpu)[:2] for name in stages])
    g.OUT.mkdir(parents=True, exist_ok=True)
    g.STATE.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"engine": args.engine, "goal_rel_error": GOAL}
    rc = 0
    results["one_gpu"] = args.one_gpu
    for name in stages:
        try:
            results[name] = stage(name, args.engine, args.sessions, args.rate, args.one_gpu)
        except Exception as exc:  # report, keep going: the logs are saved by stage()
            g.log(f"stage {name} FAILED: {exc!r}")
            results[name] = {"error": repr(exc), "ok": False}
        rc |= 0 if results[name].get("ok") else 1
        g.log(name, json.dumps({k: v for k, v in results[name].items() if k != "rows"}))
        for row in results[name].get("rows", []):
            g.log(json.dumps(row))
    (g.OUT / "gpu_check_kv_routing.json").write_text(json.dumps(results, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
