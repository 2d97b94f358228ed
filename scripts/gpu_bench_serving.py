"""Issue 8 on 2xH200: two agg workers vs 1P1D disagg at equal Poisson rates, LMCache cold vs warm, NIXL
transfer bandwidth vs the link -- all through ``pdkit launch`` and ``pdkit bench``.

Parts (one device call each, ~4-5 min):
    python3 scripts/gpu_bench_serving.py --part agg      # pdkit launch agg --gpus 0,1 (2 workers) + sweep
    python3 scripts/gpu_bench_serving.py --part disagg   # pdkit launch disagg --prefill-gpu 1 --decode-gpu 0
                                                          # + the same sweep + LMCache repeat workload
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check_pd as g  # noqa: E402

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


def sweep(label: str, extra: list[str]) -> None:
    bench(["--label", label, "--shape", SHAPE, "--rate", RATES, "--num-requests", "32", "--max-duration", "40",
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


def part_disagg() -> None:
    link = Path(__file__).parent / "link_bandwidth.py"
    subprocess.run([sys.executable, str(link), "--out", str(g.OUT / "link.json")])
    config = {
        **g.common_config(),
        "mode": "disagg",
        "max_model_len": 16384,
        "prefill": {"gpus": [[1]], "extra_args": ["--no-enable-prefix-caching"]},
        "decode": {"gpus": [[0]]},
    }
    run_dir = g.STATE / "bench-disagg"
    proc, ready_s = g.launch(["disagg", "--prefill-gpu", "1", "--decode-gpu", "0"], config, run_dir)
    try:
        g.log(f"disagg ready in {ready_s:.1f} s")
        sweep("disagg", ["--link-json", str(g.OUT / "link.json")])
        bench(["--label", "lmcache-disagg", "--workload", "repeat", "--num-prefixes", "8", "--repeats", "2",
               "--repeat-input-len", "8192", "--repeat-output-len", "16",
               "--output", str(g.OUT / "bench-lmcache-disagg.json")])  # fmt: skip
    finally:
        g.log("stop", g.stop(proc, run_dir))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["agg", "disagg"], required=True)
    args = parser.parse_args()
    g.OUT.mkdir(parents=True, exist_ok=True)
    part_agg() if args.part == "agg" else part_disagg()
    return 0


if __name__ == "__main__":
    sys.exit(main())
