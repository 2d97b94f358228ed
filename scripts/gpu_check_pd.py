"""GPU check of pdkit P/D on a 2-GPU machine (2xH200): agg vs disagg vs LMCache reuse, through pdkit.

What it proves, each through the real product (``pdkit launch``: frontend, worker agents, the installed
vLLM -- 0.26.0 or 0.32.0, pdkit's plan picks connector names and flags for it (pdkit/stack.py) --,
PdConnector on prefill, NIXL on decode), with the embedded synthetic Llama-8B (dummy weights):

* stage ``agg``: ``pdkit launch agg --gpu 0`` starts and serves; greedy reference outputs for prompts
  of ~30..6000 tokens, completions and chat; start-up time.
* stage ``disagg``: ``pdkit launch disagg --prefill-gpu 1 --decode-gpu 0`` with vLLM's prefix cache off
  on prefill: (a) pass 1 equals agg token for token; (b) pass 2 over the same prompts loads from
  LMCache (hit tokens > 90 % of each prompt, read from the prefill log), still equals agg, and has a
  lower TTFT than pass 1; (c) no «compatibility hash mismatch», no NIXL error, no «compiled extension
  not found» in any log; Ctrl-C leaves no vLLM process behind.

Usage on the device (after the bundle is unpacked and pdkit installed):
    python3 scripts/gpu_check_pd.py --stage agg      # ~3-4 min on a fresh machine
    python3 scripts/gpu_check_pd.py --stage disagg   # ~3 min; reads the agg stage's reference
Writes ``$OUT/gpu_check_<stage>.json`` (with ``pdkit doctor --json`` under ``"stack"``: which stack ran)
and ``$OUT/logs_<stage>.tar.gz``. Stdlib only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from pdkit.gpu_check.harness import (
    OUT,
    STATE,
    TARGET_TOKENS,
    build_prompts,
    calibrate,
    common_config,
    launch,
    lmcache_hits,
    log,
    ready_times,
    run_prompts,
    save_logs,
    scan_logs,
    stack_report,
    stop,
)


def stage_agg(prompts: list[str]) -> dict:
    run_dir = STATE / "agg"
    config = {**common_config(), "mode": "agg", "agg": {"gpus": [[0]]}}
    proc, ready_s = launch(["agg", "--gpu", "0"], config, run_dir)
    try:
        log(f"agg ready in {ready_s:.1f} s")
        results = run_prompts(prompts)
        calibration = calibrate({int(n): prompts[i] for i, n in enumerate(TARGET_TOKENS) if n >= 400})
    finally:
        stopped = stop(proc, run_dir)
        save_logs(run_dir, "agg")
    out = {"ready_s": round(ready_s, 1), "worker_ready_s": ready_times(run_dir), "results": results,
           "calibration": calibration, "stop": stopped, "bad_log_lines": scan_logs(run_dir)}  # fmt: skip
    (STATE / "agg.json").write_text(json.dumps(out))
    return out


def stage_disagg(prompts: list[str]) -> dict:
    ref = json.loads((STATE / "agg.json").read_text())["results"]
    run_dir = STATE / "disagg"
    config = {
        **common_config(),
        "mode": "disagg",
        "prefill": {"gpus": [[1]], "extra_args": ["--no-enable-prefix-caching"]},
        "decode": {"gpus": [[0]]},
    }
    proc, ready_s = launch(["disagg", "--prefill-gpu", "1", "--decode-gpu", "0"], config, run_dir)
    try:
        log(f"disagg ready in {ready_s:.1f} s")
        pass1 = run_prompts(prompts)
        hits_before = len(lmcache_hits(run_dir))
        pass2 = run_prompts(prompts)
        time.sleep(1)
    finally:
        stopped = stop(proc, run_dir)
        save_logs(run_dir, "disagg")
    hits = lmcache_hits(run_dir)[hits_before:]
    rows = []
    for r1, r2, ra in zip(pass1, pass2, ref, strict=True):
        rows.append({
            "kind": r1["kind"], "index": r1["index"],
            "prompt_tokens": (r1["usage"] or {}).get("prompt_tokens"),
            "pass1_equals_agg": r1["text"] == ra["text"], "pass2_equals_agg": r2["text"] == ra["text"],
            "ttft_agg_s": ra["ttft_s"], "ttft_pass1_s": r1["ttft_s"], "ttft_pass2_s": r2["ttft_s"],
        })  # fmt: skip
    hit_ratios = [round(h / t, 3) if t else 0.0 for t, h in hits]
    return {
        "ready_s": round(ready_s, 1),
        "worker_ready_s": ready_times(run_dir),
        "rows": rows,
        "lmcache_pass2_hits": hits,
        "lmcache_pass2_hit_ratio": hit_ratios,
        "all_pass1_equal": all(r["pass1_equals_agg"] for r in rows),
        "all_pass2_equal": all(r["pass2_equals_agg"] for r in rows),
        "all_hits_over_90pct": bool(hit_ratios) and len(hit_ratios) >= len(rows) and min(hit_ratios) > 0.9,
        "pass2_ttft_lower": sum(r["ttft_pass2_s"] < r["ttft_pass1_s"] for r in rows),
        "stop": stopped,
        "bad_log_lines": scan_logs(run_dir),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", choices=["agg", "disagg", "all"], default="all")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    STATE.mkdir(parents=True, exist_ok=True)
    from pdkit.model_files import default_model_dir

    prompts = build_prompts(default_model_dir())
    stack = stack_report()
    log("stack", json.dumps({k: stack.get(k) for k in ("verdict", "versions", "errors")}))
    rc = 0
    for stage in ["agg", "disagg"] if args.stage == "all" else [args.stage]:
        try:
            result = stage_agg(prompts) if stage == "agg" else stage_disagg(prompts)
        except Exception as exc:  # report, keep the logs
            log(f"stage {stage} FAILED: {exc!r}")
            result, rc = {"error": repr(exc)}, 1
            run_dir = STATE / stage
            if run_dir.exists():
                save_logs(run_dir, stage)
        result["stack"] = stack
        (OUT / f"gpu_check_{stage}.json").write_text(json.dumps(result, indent=1))
        summary = {k: v for k, v in result.items() if k not in ("results", "rows", "stack")}
        log(stage, json.dumps(summary)[:4000])
        for row in result.get("rows", []):
            log(json.dumps(row))
    return rc


if __name__ == "__main__":
    sys.exit(main())
