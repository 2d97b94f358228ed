"""Issue 8 on 2xH200: two agg workers vs 1P1D disagg at equal Poisson rates, LMCache cold vs warm, NIXL
transfer bandwidth vs the link -- all through ``pdkit launch`` and ``pdkit bench``.

Parts (one device call each, ~4-5 min):
    python3 scripts/gpu_bench_serving.py --part agg      # pdkit launch agg --gpus 0,1 (2 workers) + sweep
    python3 scripts/gpu_bench_serving.py --part disagg   # pdkit launch disagg --prefill-gpu 1 --decode-gpu 0
                                                          # + the same sweep + LMCache repeat workload
    python3 scripts/gpu_bench_serving.py --part disagg --quick --block-size 128 [--nixl-mode push]
                                                          # the descriptor-count fixes, sweep only
Both use --enforce-eager (same for both sides; CUDA graphs would lower ITL on both) and
--max-model-len 16384.  The disagg prefill runs with vLLM's prefix cache off, so repeated prefixes
can only come back through LMCache (the sweep's prompts are random, so the sweep is unaffected).
Writes $OUT/bench-<part>*.json (+ PNGs) and $OUT/link.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from pdkit.gpu_check import harness as g

RATES = "1,2,3,4"
SHAPE = "8192x256"


def bench(args: list[str]) -> int:
    argv = [sys.executable, "-m", "pdkit.cli", "bench", "--endpoint", f"http://127.0.0.1:{g.PORT}",
            "--no-progress", "--out-dir", str(g.OUT), *args]  # fmt: skip
    g.log("bench:", " ".join(argv[3:]))
    t0 = time.time()
    rc = subprocess.run(argv).returncode
    g.log(f"bench rc={rc} in {time.time() - t0:.0f} s")
    return rc


def sweep(label: str, extra: list[str], rates: str = RATES) -> None:
    bench(["--label", label, "--shape", SHAPE, "--rate", rates, "--num-requests", "32", "--max-duration", "40",
           "--warmup", "2", "--output", str(g.OUT / f"bench-{label}-8k.json"), *extra])  # fmt: skip


def part_agg() -> None:
    config = {**g.common_config(), "mode": "agg", "max_model_len": 16384, "agg": {"gpus": [[0], [1]]}}
    run_dir = g.STATE / "bench-agg"
    proc, ready_s = g.launch(["agg", "--gpus", "0,1"], config, run_dir)
    try:
        g.log(f"agg x2 ready in {ready_s:.1f} s")
        sweep("agg2", [])
    finally:
        g.log("stop", g.stop(proc, run_dir))
        g.save_logs(run_dir, "bench-agg")


def part_disagg(block_size: int | None, rates: str, full: bool, nixl_mode: str = "pull") -> None:
    link = Path(__file__).parent / "link_bandwidth.py"
    if full:
        subprocess.run([sys.executable, str(link), "--out", str(g.OUT / "link.json")])
    config = {
        **g.common_config(),
        "mode": "disagg",
        "max_model_len": 16384,
        "prefill": {"gpus": [[1]], "extra_args": ["--no-enable-prefix-caching"]},
        "decode": {"gpus": [[0]]},
    }
    label = "disagg"
    if block_size:
        config["block_size"] = block_size
        label = f"disagg-block{block_size}"
    if nixl_mode != "pull":
        config["nixl"] = {"mode": nixl_mode}
        label += f"-{nixl_mode}"
    run_dir = g.STATE / f"bench-{label}"
    proc, ready_s = g.launch(["disagg", "--prefill-gpu", "1", "--decode-gpu", "0"], config, run_dir)
    try:
        g.log(f"disagg ready in {ready_s:.1f} s")
        sweep(label, ["--link-json", str(g.OUT / "link.json")] if full else [], rates)
        if not full:
            return
        bench(["--label", "lmcache-disagg", "--workload", "repeat", "--num-prefixes", "8", "--repeats", "2",
               "--repeat-input-len", "8192", "--repeat-output-len", "16",
               "--output", str(g.OUT / "bench-lmcache-disagg.json")])  # fmt: skip
    finally:
        g.log("stop", g.stop(proc, run_dir))
        g.save_logs(run_dir, f"bench-{label}")


def part_one_gpu(block_sizes: list[int], rates: str) -> None:
    """Disagg with prefill and decode sharing one GPU (nvidia-h200 kind): NIXL still moves the KV
    between the two processes (cuda_ipc), so descriptor counts, post times and their effect on decode
    ITL show, per KV block size."""
    for bs in block_sizes:
        config = {
            **g.common_config(),
            "mode": "disagg",
            "max_model_len": 16384,
            "share_gpus": True,
            "gpu_memory_utilization": 0.4,
            "block_size": bs,
            "prefill": {"gpus": [[0]]},
            "decode": {"gpus": [[0]]},
        }
        run_dir = g.STATE / f"bench-1gpu-block{bs}"
        proc, ready_s = g.launch(["disagg"], config, run_dir)
        try:
            g.log(f"1-GPU disagg (block {bs}) ready in {ready_s:.1f} s")
            bench(["--label", f"disagg1gpu-block{bs}", "--shape", SHAPE, "--rate", rates, "--num-requests", "24",
                   "--max-duration", "30", "--warmup", "2",
                   "--output", str(g.OUT / f"bench-1gpu-block{bs}.json"), "--no-plots"])  # fmt: skip
        finally:
            g.log("stop", g.stop(proc, run_dir))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["agg", "disagg", "one-gpu"], required=True)
    parser.add_argument("--block-sizes", default="16,128", help="one-gpu: block sizes to compare")
    parser.add_argument("--block-size", type=int, default=None, help="disagg: KV block size on both roles")
    parser.add_argument("--rates", default=RATES)
    parser.add_argument("--quick", action="store_true", help="disagg: sweep only (no link, no LMCache repeat)")
    parser.add_argument("--nixl-mode", choices=["pull", "push"], default="pull", help="disagg: NIXL transfer mode")
    args = parser.parse_args()
    g.OUT.mkdir(parents=True, exist_ok=True)
    if args.part == "agg":
        part_agg()
    elif args.part == "one-gpu":
        part_one_gpu([int(b) for b in args.block_sizes.split(",")], args.rates)
    else:
        part_disagg(args.block_size, args.rates, not args.quick, args.nixl_mode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
