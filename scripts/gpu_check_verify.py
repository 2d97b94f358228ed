"""GPU check of ``verify_transfers`` (issue 9 items 2 and 4) through ``pdkit launch``: 2xH200, or one H200.

Needs the deployment key ``nixl.verify_transfers`` (prefill: PdConnector with ``verify_transfers``;
decode: PdConnector in NIXL-only mode with ``verify_transfers`` and ``kv_load_failure_policy=recompute``;
see docs/pd-connector.md "verify_transfers").  Same synthetic Llama-8B, ``--enforce-eager``,
``max_model_len`` 16384 everywhere (8k-token prompts), prefix cache off on prefill, as gpu_check_pd.py.

Stages (``--stages``, default all three):

* ``agg``: the reference outputs (reused from ``/tmp/pdkit-gpu-check/agg.json`` when present: same
  prompts as gpu_check_pd.py; saved there when run here);
* ``faults``: (a) with verification on, disagg outputs equal agg token for token (8 completions + 3
  chats); (b) fault injection: the decode worker runs with ``PDKIT_VERIFY_INJECT_FAULT=11`` (one bit of
  one received block flipped in each of the first 11 verified requests, before the check): every
  corrupted block is caught (``pdkit:kv_verify_mismatch_blocks_total`` == 11, one «fail their
  fingerprint» warning per request), vLLM recovers each request («Recovered from KV load failure») and
  the outputs still equal agg; a second pass (faults used up) adds no mismatch;
* ``ttft``: (c) TTFT at ~8k-token prompts, verification on vs off, **paired**: both deployments run side
  by side (the second on shifted ports, started once the first is up) and each of 20 distinct prompts
  goes to both, one request at a time, alternating which goes first, so drift between runs cancels.
  Reports the medians, the paired mean overhead with +-2 standard errors, and the *direct* cost: the
  device time the connectors spent fingerprinting (prefill) and checking (decode) per request, from
  ``pdkit:kv_fingerprint_seconds`` and ``pdkit:kv_verify_seconds``.  Goal: overhead <= 2 %.

``--one-gpu``: prefill and decode share GPU 0 (``share_gpus``; with the paired stage four workers share
it, so it needs an H200).  ``--nixl-env KEY=VALUE`` / ``--nixl-mode push`` apply to every disagg
deployment (pdkit's launch plan already sets ``UCX_CUDA_IPC_ENABLE_GET_ZCOPY=on``, see scripts/nixl_probe.py).

Usage on the device (after the bundle is unpacked and pdkit installed, see scripts/gpu_session.sh):
    python3 scripts/gpu_check_verify.py [--one-gpu] [--stages agg,faults,ttft]
About 2.5 min for ``agg`` on a fresh machine, ~2 min for ``faults``, ~2 min for ``ttft``.
Writes ``$OUT/gpu_check_verify.json`` (after every stage) and ``$OUT/logs_verify_*.tar.gz``.
Stdlib + pdkit only.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from pdkit.gpu_check import harness as g

DECODE_HTTP = 8400
PREFILL_HTTP = 8300
N_FAULTS = len(g.TARGET_TOKENS) + len(g.CHAT_INDICES)  # one corrupted block per request of the fault pass
TTFT_TOKENS = 8000
TTFT_PAIRS = 20
MAX_MODEL_LEN = 16384
STAGES = ("agg", "faults", "ttft")


ONE_GPU = False  # --one-gpu: prefill and decode share GPU 0 (share_gpus), for a machine with one GPU
NIXL_OVERRIDES: dict[str, Any] = {}  # --nixl-env / --nixl-mode, for every disagg deployment
DISAGG_ARGS = ["disagg", "--prefill-gpu", "1", "--decode-gpu", "0"]


def disagg_args() -> list[str]:
    return ["disagg"] if ONE_GPU else DISAGG_ARGS


def ports(slot: int) -> dict[str, dict[str, int]]:
    """Ports of deployment ``slot`` (0, or 1 for the second of the paired stage): nothing shared."""
    return {
        "frontend": {"port": g.PORT + slot, "zmq_port": 8100 + 10 * slot, "kv_events_port": 8101 + 10 * slot},
        "prefill": {"http_port_base": PREFILL_HTTP + 10 * slot, "nixl_side_channel_port_base": 5610 + 40 * slot,
                    "kv_events_port_base": 5810 + 40 * slot},
        "decode": {"http_port_base": DECODE_HTTP + 10 * slot, "nixl_side_channel_port_base": 5620 + 40 * slot,
                   "kv_events_port_base": 5820 + 40 * slot},
    }  # fmt: skip


def config(mode: str, verify: bool, inject: int = 0, slot: int = 0, side_by_side: bool = False) -> dict[str, Any]:
    """``side_by_side``: two disagg deployments at once (paired stage), so twice the workers share each GPU."""
    p = ports(slot)
    cfg: dict[str, Any] = {
        "enforce_eager": True,
        "max_model_len": MAX_MODEL_LEN,
        "lmcache": {"chunk_size": 256, "cpu_gb": 10 if side_by_side else 20, "save_unfull_chunk": True},
        "frontend": p["frontend"],
        "mode": mode,
    }
    if mode == "agg":
        cfg["agg"] = {"gpus": [[0]]}
        return cfg
    cfg["nixl"] = {**NIXL_OVERRIDES, "verify_transfers": verify}
    cfg["prefill"] = {"gpus": [[0 if ONE_GPU else 1]], **p["prefill"], "extra_args": ["--no-enable-prefix-caching"]}
    cfg["decode"] = {"gpus": [[0]], **p["decode"]}
    workers_per_gpu = (2 if ONE_GPU else 1) * (2 if side_by_side else 1)
    if workers_per_gpu > 1:
        cfg["share_gpus"] = True
        # 8B weights take 13.5 GiB per worker; 0.2 of an H200 left no KV cache (vLLM 0.26), 0.24 leaves ~3 GiB.
        cfg["gpu_memory_utilization"] = {2: 0.4, 4: 0.24}[workers_per_gpu]
    if inject:
        cfg["decode"]["extra_env"] = {"PDKIT_VERIFY_INJECT_FAULT": str(inject)}
    return cfg


def metrics(port: int, names: tuple[str, ...] | list[str]) -> dict[str, float]:
    """Each series' sum over its labels, from one read of a process's /metrics (0 when absent)."""
    from pdkit import prom

    return prom.fetch_totals(f"http://127.0.0.1:{port}", names)


DECODE_METRICS = ("pdkit:kv_verify_checked_blocks_total", "pdkit:kv_verify_mismatch_blocks_total",
                  "pdkit:kv_verify_requests_total", "pdkit:kv_verify_seconds_total")  # fmt: skip
PREFILL_METRICS = ("pdkit:kv_verify_unsent_total", "pdkit:kv_fingerprint_requests_total",
                   "pdkit:kv_fingerprint_seconds_total")  # fmt: skip


def verify_counters(slot: int = 0) -> dict[str, float]:
    p = ports(slot)
    out = metrics(p["decode"]["http_port_base"], DECODE_METRICS)
    out.update(metrics(p["prefill"]["http_port_base"], PREFILL_METRICS))
    return out


def delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: round(b[k] - a[k], 6) for k in a}


def count_in_log(run_dir: Path, name: str, pattern: str) -> int:
    path = run_dir / name
    return len(re.findall(pattern, path.read_text(errors="replace"))) if path.exists() else 0


def ttft_prompts(model_dir: Path) -> list[str]:
    """TTFT_PAIRS + 1 distinct ~8k-token prompts (the first is a warm-up): no cache can serve any of them."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    prompts = []
    for run in range(TTFT_PAIRS + 1):
        lines = [f"run {run} line {i}: value {(i * 31 + run * 7) % 101} and {(i * 17) % 13}" for i in range(1400)]
        ids = tok.encode("\n".join(lines), add_special_tokens=False).ids[: TTFT_TOKENS - 1]
        prompts.append(tok.decode(ids))
    return prompts


HOPS = ("pdkit_prefill_hop_seconds", "pdkit_decode_hop_seconds")


def hop_seconds(port: int) -> dict[str, float]:
    """Sum and count of a frontend's prefill-hop and decode-hop histograms (where TTFT goes)."""
    return metrics(port, [h + part for h in HOPS for part in ("_sum", "_count")])


def mean_hops(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    out = {}
    for name in HOPS:
        n = after.get(name + "_count", 0.0) - before.get(name + "_count", 0.0)
        if n:
            out[name.replace("pdkit_", "mean_")] = round((after[name + "_sum"] - before[name + "_sum"]) / n, 4)
    return out


def paired_ttft(prompts: list[str], slots: dict[str, int]) -> dict[str, Any]:
    """Each prompt to every deployment in ``slots`` (name -> slot), alternating the order; TTFT per name."""
    names = list(slots)

    def ask(name: str, prompt: str) -> float:
        body = {"model": "synth", "prompt": prompt, "max_tokens": 4, "temperature": 0}
        return g.stream_request("/v1/completions", body, port=g.PORT + slots[name])["ttft_s"]

    for name in names:  # prompts[0] warms up each deployment's 8k path (and NIXL's handshake)
        ask(name, prompts[0])
    hops0 = {name: hop_seconds(g.PORT + slot) for name, slot in slots.items()}
    ttft: dict[str, list[float]] = {name: [] for name in names}
    for i, prompt in enumerate(prompts[1:]):
        for name in names if i % 2 == 0 else names[::-1]:
            ttft[name].append(ask(name, prompt))
    out: dict[str, Any] = {}
    for name, slot in slots.items():
        values = ttft[name]
        out[name] = {"ttft_s": [round(t, 4) for t in values], "median_s": round(statistics.median(values), 4),
                     "mean_s": round(statistics.mean(values), 4),
                     **mean_hops(hops0[name], hop_seconds(g.PORT + slot))}  # fmt: skip
    return out


def overhead(on: list[float], off: list[float]) -> dict[str, Any]:
    """Relative TTFT overhead of ``on`` over ``off`` (paired by index): medians, and paired mean +- 2 SE."""
    rel = [a / b - 1 for a, b in zip(on, off, strict=True)]
    mean = statistics.mean(rel)
    two_se = 2 * statistics.stdev(rel) / math.sqrt(len(rel)) if len(rel) > 1 else float("nan")
    return {
        "of_medians": round(statistics.median(on) / statistics.median(off) - 1, 4),
        "paired_mean": round(mean, 4),
        "paired_mean_2se": round(two_se, 4),
        "paired_median": round(statistics.median(rel), 4),
        "pairs": len(rel),
    }


def agg_reference(prompts: list[str], fresh: bool) -> tuple[list[dict], str]:
    cached = g.STATE / "agg.json"
    if cached.exists() and not fresh:
        return json.loads(cached.read_text())["results"], str(cached)
    run_dir = g.STATE / "verify_agg"
    proc, ready_s = g.launch(["agg", "--gpu", "0"], config("agg", False), run_dir)
    try:
        g.log(f"agg ready in {ready_s:.1f} s")
        results = g.run_prompts(prompts)
    finally:
        g.stop(proc, run_dir)
        g.save_logs(run_dir, "verify_agg")
    cached.write_text(json.dumps({"results": results}))  # for later stages / calls on this machine
    return results, f"fresh agg run (ready in {ready_s:.1f} s)"


def compare(rows: list[dict], ref: list[dict]) -> list[dict]:
    return [{"kind": r["kind"], "index": r["index"], "prompt_tokens": (r["usage"] or {}).get("prompt_tokens"),
             "equals_agg": r["text"] == a["text"]} for r, a in zip(rows, ref, strict=True)]  # fmt: skip


def log_lines(run_dir: Path) -> dict[str, list[str]]:
    bad = g.scan_logs(run_dir)
    return {"bad_log_lines": [x for x in bad if "Traceback" not in x],
            "traceback_lines": [x for x in bad if "Traceback" in x]}  # fmt: skip


def stage_faults(prompts: list[str], ref: list[dict]) -> dict[str, Any]:
    run_dir = g.STATE / "verify_on"
    proc, ready_s = g.launch(disagg_args(), config("disagg", True, inject=N_FAULTS), run_dir)
    try:
        g.log(f"disagg (verify on, {N_FAULTS} faults to inject) ready in {ready_s:.1f} s")
        before = verify_counters()
        fault_pass = g.run_prompts(prompts)
        time.sleep(1)
        after_faults = verify_counters()
        clean_pass = g.run_prompts(prompts)
        time.sleep(1)
        after_clean = verify_counters()
    finally:
        stopped = g.stop(proc, run_dir)
        g.save_logs(run_dir, "verify_on")
    fault_rows, clean_rows = compare(fault_pass, ref), compare(clean_pass, ref)
    d_fault, d_clean = delta(before, after_faults), delta(after_faults, after_clean)
    warnings = count_in_log(run_dir, "decode-0.log", r"fail their fingerprint")
    recovered = count_in_log(run_dir, "decode-0.log", r"Recovered from KV load failure")
    return {
        "ready_s": round(ready_s, 1),
        "fault_pass": {
            "rows": fault_rows,
            "all_equal_agg": all(r["equals_agg"] for r in fault_rows),
            "counters": d_fault,
            "mismatch_warnings_in_log": warnings,
            "recovered_lines_in_log": recovered,
            "ok": all(r["equals_agg"] for r in fault_rows)
            and d_fault["pdkit:kv_verify_mismatch_blocks_total"] == N_FAULTS
            and warnings == N_FAULTS
            and recovered >= N_FAULTS,
        },  # fmt: skip
        "clean_pass": {
            "rows": clean_rows,
            "all_equal_agg": all(r["equals_agg"] for r in clean_rows),
            "counters": d_clean,
            "ok": all(r["equals_agg"] for r in clean_rows)
            and d_clean["pdkit:kv_verify_mismatch_blocks_total"] == 0
            and d_clean["pdkit:kv_verify_unsent_total"] == 0,
        },  # fmt: skip
        "stop": stopped,
        **log_lines(run_dir),
    }


def stage_ttft(long_prompts: list[str]) -> dict[str, Any]:
    """Verification on (slot 0) and off (slot 1) side by side; paired TTFT and the direct cost."""
    runs = {"on": (0, True), "off": (1, False)}
    dirs = {name: g.STATE / f"verify_ttft_{name}" for name in runs}
    procs: dict[str, Any] = {}
    result: dict[str, Any] = {}
    try:
        # One after the other: vLLM's memory profiling counts a neighbour's start-up allocations as its own.
        result["ready_s"] = {}
        for name, (slot, verify) in runs.items():
            procs[name], ready_s = g.launch(disagg_args(), config("disagg", verify, slot=slot, side_by_side=True),
                                            dirs[name])  # fmt: skip
            result["ready_s"][name] = round(ready_s, 1)
        g.log(f"verify on/off side by side, ready in {result['ready_s']}")
        before = verify_counters(0)
        result.update(paired_ttft(long_prompts, {name: slot for name, (slot, _) in runs.items()}))
        time.sleep(1)
        counters = delta(before, verify_counters(0))
    finally:
        result["stop"] = {name: g.stop(proc, dirs[name], check_leftover=False) for name, proc in procs.items()}
        time.sleep(2)
        result["leftover"] = g.leftover()
        for name, run_dir in dirs.items():
            g.save_logs(run_dir, f"verify_ttft_{name}")
    fp_n, ver_n = counters["pdkit:kv_fingerprint_requests_total"], counters["pdkit:kv_verify_requests_total"]
    fp_ms = 1e3 * counters["pdkit:kv_fingerprint_seconds_total"] / fp_n if fp_n else None
    ver_ms = 1e3 * counters["pdkit:kv_verify_seconds_total"] / ver_n if ver_n else None
    direct_ms = (fp_ms or 0.0) + (ver_ms or 0.0)
    result.update({
        "counters_on": counters,
        "direct_ms_per_request": {"prefill_fingerprint": fp_ms and round(fp_ms, 3),
                                  "decode_check": ver_ms and round(ver_ms, 3), "total": round(direct_ms, 3)},
        "direct_overhead": round(direct_ms / 1e3 / result["off"]["median_s"], 5),
        "overhead": overhead(result["on"]["ttft_s"], result["off"]["ttft_s"]),
        "all_checked": counters["pdkit:kv_verify_checked_blocks_total"] >= TTFT_PAIRS * (TTFT_TOKENS // 16),
        "none_unsent": counters["pdkit:kv_verify_unsent_total"] == 0,
        **{f"{name}_{k}": v for name, d in dirs.items() for k, v in log_lines(d).items()},
    })  # fmt: skip
    return result


def parse_env(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--nixl-env wants KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {STAGES}")
    parser.add_argument("--fresh-agg", action="store_true", help="run the agg reference even if agg.json exists")
    parser.add_argument("--one-gpu", action="store_true", help="prefill and decode share GPU 0 (1-GPU machine)")
    parser.add_argument("--nixl-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment for the NIXL workers of every disagg deployment (repeatable)")  # fmt: skip
    parser.add_argument("--nixl-mode", choices=("pull", "push"), default=None)
    parser.add_argument("--dry-run", action="store_true", help="check the deployments' plans only, start nothing")
    args = parser.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    if set(stages) - set(STAGES):
        parser.error(f"unknown stages {sorted(set(stages) - set(STAGES))}; choose from {STAGES}")
    global ONE_GPU
    ONE_GPU = args.one_gpu
    NIXL_OVERRIDES.clear()
    if args.nixl_env:
        NIXL_OVERRIDES["env"] = parse_env(args.nixl_env)
    if args.nixl_mode:
        NIXL_OVERRIDES["mode"] = args.nixl_mode
    if args.dry_run:
        return g.dry_run([(["agg", "--gpu", "0"], config("agg", False)),
                          (disagg_args(), config("disagg", True, inject=N_FAULTS)),
                          (disagg_args(), config("disagg", True, slot=0, side_by_side=True)),
                          (disagg_args(), config("disagg", False, slot=1, side_by_side=True))])  # fmt: skip
    g.OUT.mkdir(parents=True, exist_ok=True)
    g.STATE.mkdir(parents=True, exist_ok=True)
    from pdkit.model_files import default_model_dir

    out_file = g.OUT / "gpu_check_verify.json"
    result: dict[str, Any] = {"stages": stages, "one_gpu": ONE_GPU, "nixl_overrides": NIXL_OVERRIDES}
    oks: list[bool] = []
    try:
        prompts = g.build_prompts(default_model_dir())
        if "agg" in stages or "faults" in stages:
            ref, result["agg_reference"] = agg_reference(prompts, args.fresh_agg)
            out_file.write_text(json.dumps(result, indent=1))
        if "faults" in stages:
            v = result["faults"] = stage_faults(prompts, ref)
            oks.append(bool(v["fault_pass"]["ok"] and v["clean_pass"]["ok"] and not v["bad_log_lines"]))
            out_file.write_text(json.dumps(result, indent=1))
        if "ttft" in stages:
            t = result["ttft"] = stage_ttft(ttft_prompts(default_model_dir()))
            result["ttft_overhead_goal_met"] = t["overhead"]["of_medians"] <= 0.02
            oks.append(bool(t["none_unsent"] and t["all_checked"]))
        result["ok"] = all(oks)
    except Exception as exc:  # report, keep the logs
        g.log(f"FAILED: {exc!r}")
        result["error"] = repr(exc)
        result["ok"] = False
    out_file.write_text(json.dumps(result, indent=1))
    summary = {k: v for k, v in result.items() if k not in ("faults",)}
    if "ttft" in summary:
        summary["ttft"] = {k: v for k, v in summary["ttft"].items() if k not in ("on", "off", "counters_on")}
    g.log(json.dumps(summary))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
