"""GPU check of ``verify_transfers`` (issue 9 item 2) on a 2-GPU machine (2xH200), through ``pdkit launch``.

Needs the deployment key ``nixl.verify_transfers`` (prefill: PdConnector with ``verify_transfers``;
decode: PdConnector in NIXL-only mode with ``verify_transfers`` and ``kv_load_failure_policy=recompute``;
see docs/pd_connector.md "verify_transfers").  Same synthetic Llama-8B, ``--enforce-eager``,
``max_model_len`` 16384 everywhere (8k-token prompts), prefix cache off on prefill, as gpu_check_pd.py.

What it proves:

* (a) with verification on, disagg outputs equal agg token for token (8 completions + 3 chats), every
  pulled block was checked (``pdkit:kv_verify_checked_blocks_total`` > 0) and none went out unverified;
* (b) fault injection: the decode worker runs with ``PDKIT_VERIFY_INJECT_FAULT=11`` (one bit of one
  received block flipped in each of the first 11 verified requests, before the check): every corrupted
  block is caught (``pdkit:kv_verify_mismatch_blocks_total`` == 11, one «fail their fingerprint» warning
  per request), vLLM recovers each request («Recovered from KV load failure») and the outputs still
  equal agg.  A second pass (faults used up) must add no mismatch;
* (c) TTFT at ~8k-token prompts (distinct prompts, one at a time, median of 8) with verification on vs
  a second deployment with it off (decode then runs plain NixlConnector).  Goal: overhead <= 2 %.

Usage on the device (after the bundle is unpacked and pdkit installed, see scripts/gpu_session.sh):
    python3 scripts/gpu_check_verify.py
Reuses ``/tmp/pdkit-gpu-check/agg.json`` (gpu_check_pd.py --stage agg, same prompts) when present,
else runs the agg reference itself.  About 4 min with the agg reference present (two disagg launches of
~1 min each, ~1 min of requests), ~7 min without it on a fresh machine.
Writes ``$OUT/gpu_check_verify.json`` and ``$OUT/logs_verify_*.tar.gz``. Stdlib + pdkit only.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check_pd as g  # noqa: E402

DECODE_HTTP = 8400
PREFILL_HTTP = 8300
N_FAULTS = len(g.TARGET_TOKENS) + len(g.CHAT_INDICES)  # one corrupted block per request of the fault pass
TTFT_TOKENS = 8000
TTFT_RUNS = 8
MAX_MODEL_LEN = 16384


ONE_GPU = False  # --one-gpu: prefill and decode share GPU 0 (share_gpus), for a machine with one GPU
DISAGG_ARGS = ["disagg", "--prefill-gpu", "1", "--decode-gpu", "0"]


def disagg_args() -> list[str]:
    return ["disagg"] if ONE_GPU else DISAGG_ARGS


def config(mode: str, verify: bool, inject: int = 0) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "enforce_eager": True,
        "max_model_len": MAX_MODEL_LEN,
        "lmcache": {"chunk_size": 256, "cpu_gb": 20, "save_unfull_chunk": True},
        "frontend": {"port": g.PORT},
        "mode": mode,
    }
    if mode == "agg":
        cfg["agg"] = {"gpus": [[0]]}
        return cfg
    cfg["nixl"] = {"verify_transfers": verify}
    cfg["prefill"] = {"gpus": [[0 if ONE_GPU else 1]], "http_port_base": PREFILL_HTTP,
                      "extra_args": ["--no-enable-prefix-caching"]}  # fmt: skip
    cfg["decode"] = {"gpus": [[0]], "http_port_base": DECODE_HTTP}
    if ONE_GPU:
        cfg["share_gpus"] = True
        cfg["gpu_memory_utilization"] = 0.4
    if inject:
        cfg["decode"]["extra_env"] = {"PDKIT_VERIFY_INJECT_FAULT": str(inject)}
    return cfg


def metric(port: int, name: str) -> float:
    """Sum of a Prometheus series over its labels on one engine's /metrics (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


VERIFY_METRICS = ("pdkit:kv_verify_checked_blocks_total", "pdkit:kv_verify_mismatch_blocks_total")


def verify_counters() -> dict[str, float]:
    out = {name: metric(DECODE_HTTP, name) for name in VERIFY_METRICS}
    out["pdkit:kv_verify_unsent_total"] = metric(PREFILL_HTTP, "pdkit:kv_verify_unsent_total")
    return out


def count_in_log(run_dir: Path, name: str, pattern: str) -> int:
    path = run_dir / name
    return len(re.findall(pattern, path.read_text(errors="replace"))) if path.exists() else 0


def ttft_prompts(model_dir: Path) -> list[str]:
    """TTFT_RUNS + 1 distinct ~8k-token prompts (the first is a warm-up): no cache can serve any of them."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    prompts = []
    for run in range(TTFT_RUNS + 1):
        lines = [f"run {run} line {i}: value {(i * 31 + run * 7) % 101} and {(i * 17) % 13}" for i in range(1400)]
        ids = tok.encode("\n".join(lines), add_special_tokens=False).ids[: TTFT_TOKENS - 1]
        prompts.append(tok.decode(ids))
    return prompts


HOPS = ("pdkit_prefill_hop_seconds", "pdkit_decode_hop_seconds")


def hop_seconds() -> dict[str, float]:
    """Sum and count of the frontend's prefill-hop and decode-hop histograms (where TTFT goes)."""
    return {h + part: metric(g.PORT, h + part) for h in HOPS for part in ("_sum", "_count")}


def measure_ttft(prompts: list[str]) -> dict[str, Any]:
    hops0: dict[str, float] = {}
    ttfts = []
    for i, prompt in enumerate(prompts):
        r = g.stream_request("/v1/completions", {"model": "synth", "prompt": prompt, "max_tokens": 4,
                                                 "temperature": 0})  # fmt: skip
        if i > 0:  # prompts[0] warms up the 8k path
            ttfts.append(r["ttft_s"])
        else:
            hops0 = hop_seconds()
    hops1 = hop_seconds()
    mean_hop = {}
    for name in HOPS:
        n = hops1.get(name + "_count", 0.0) - hops0.get(name + "_count", 0.0)
        if n:
            mean_hop[name.replace("pdkit_", "mean_")] = round((hops1[name + "_sum"] - hops0[name + "_sum"]) / n, 4)
    return {"ttft_s": [round(t, 4) for t in ttfts], "median_s": round(statistics.median(ttfts), 4),
            "mean_s": round(statistics.mean(ttfts), 4), **mean_hop}  # fmt: skip


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
    return results, f"fresh agg run (ready in {ready_s:.1f} s)"


def compare(rows: list[dict], ref: list[dict]) -> list[dict]:
    return [{"kind": r["kind"], "index": r["index"], "prompt_tokens": (r["usage"] or {}).get("prompt_tokens"),
             "equals_agg": r["text"] == a["text"]} for r, a in zip(rows, ref, strict=True)]  # fmt: skip


def stage_verify_on(prompts: list[str], ref: list[dict], long_prompts: list[str]) -> dict[str, Any]:
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
        ttft = measure_ttft(long_prompts)
        time.sleep(1)
        after_ttft = verify_counters()
    finally:
        stopped = g.stop(proc, run_dir)
        g.save_logs(run_dir, "verify_on")

    def delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        return {k: b[k] - a[k] for k in a}

    fault_rows, clean_rows = compare(fault_pass, ref), compare(clean_pass, ref)
    d_fault, d_clean, d_ttft = (
        delta(before, after_faults),
        delta(after_faults, after_clean),
        delta(after_clean, after_ttft),
    )
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
            "ok": all(r["equals_agg"] for r in clean_rows) and d_clean["pdkit:kv_verify_mismatch_blocks_total"] == 0,
        },  # fmt: skip
        "ttft_8k": {
            **ttft,
            "counters": d_ttft,
            "all_checked": d_ttft["pdkit:kv_verify_checked_blocks_total"] >= TTFT_RUNS * (TTFT_TOKENS // 16),
            "none_unsent": after_ttft["pdkit:kv_verify_unsent_total"] == 0,
        },  # fmt: skip
        "stop": stopped,
        "bad_log_lines": [x for x in g.scan_logs(run_dir) if "Traceback" not in x],
        "traceback_lines": [x for x in g.scan_logs(run_dir) if "Traceback" in x],
    }


def stage_verify_off(long_prompts: list[str]) -> dict[str, Any]:
    run_dir = g.STATE / "verify_off"
    proc, ready_s = g.launch(disagg_args(), config("disagg", False), run_dir)
    try:
        g.log(f"disagg (verify off) ready in {ready_s:.1f} s")
        ttft = measure_ttft(long_prompts)
    finally:
        stopped = g.stop(proc, run_dir)
        g.save_logs(run_dir, "verify_off")
    return {"ready_s": round(ready_s, 1), "ttft_8k": ttft, "stop": stopped,
            "bad_log_lines": [x for x in g.scan_logs(run_dir) if "Traceback" not in x]}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fresh-agg", action="store_true", help="run the agg reference even if agg.json exists")
    parser.add_argument("--one-gpu", action="store_true", help="prefill and decode share GPU 0 (1-GPU machine)")
    parser.add_argument("--dry-run", action="store_true", help="check the deployments' plans only, start nothing")
    args = parser.parse_args()
    global ONE_GPU
    ONE_GPU = args.one_gpu
    if args.dry_run:
        return g.dry_run([(["agg", "--gpu", "0"], config("agg", False)),
                          (disagg_args(), config("disagg", True, inject=N_FAULTS)),
                          (disagg_args(), config("disagg", False))])  # fmt: skip
    g.OUT.mkdir(parents=True, exist_ok=True)
    g.STATE.mkdir(parents=True, exist_ok=True)
    from pdkit.model_files import default_model_dir

    prompts = g.build_prompts(default_model_dir())
    long_prompts = ttft_prompts(default_model_dir())
    result: dict[str, Any] = {}
    rc = 0
    try:
        ref, result["agg_reference"] = agg_reference(prompts, args.fresh_agg)
        result["verify_on"] = stage_verify_on(prompts, ref, long_prompts)
        result["verify_off"] = stage_verify_off(long_prompts)
        on = result["verify_on"]["ttft_8k"]["median_s"]
        off = result["verify_off"]["ttft_8k"]["median_s"]
        result["ttft_overhead_median"] = round((on - off) / off, 4)
        result["ttft_overhead_goal_met"] = result["ttft_overhead_median"] <= 0.02
        v = result["verify_on"]
        result["ok"] = bool(v["fault_pass"]["ok"] and v["clean_pass"]["ok"] and v["ttft_8k"]["none_unsent"]
                            and not v["bad_log_lines"])  # fmt: skip
        rc = 0 if result["ok"] else 1
    except Exception as exc:  # report, keep the logs
        g.log(f"FAILED: {exc!r}")
        result["error"] = repr(exc)
        rc = 1
    (g.OUT / "gpu_check_verify.json").write_text(json.dumps(result, indent=1))
    g.log(json.dumps({k: v for k, v in result.items() if k not in ("verify_on", "verify_off")}))
    return rc


if __name__ == "__main__":
    sys.exit(main())
