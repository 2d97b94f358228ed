#!/usr/bin/env python3
"""GPU0 <-> GPU1 copy bandwidth with plain torch: the link peak NIXL's P->D transfers are judged against.

Why a plain device-to-device copy: it is what the hardware path (NVLink/NVSwitch, or PCIe when peer
access is off) delivers without NIXL, UCX or vLLM in the way; issue 8 asks that NIXL reach >= 50% of it.
Each size (64 MiB .. 1 GiB, fixed) is copied ``--iters`` times after ``--warmup`` copies, in both
directions, timed with CUDA events on the copying stream; bandwidth = bytes / time (GB/s = 1e9 B/s).

    python scripts/link_bandwidth.py --out docs/bench/link.json

Needs two visible GPUs; stdlib + torch only.  ``peak_gbps`` (the best of all sizes and directions) is
what ``pdkit bench --link-json`` reads.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import socket
import sys
from typing import Any

SIZES_MIB = (64, 128, 256, 512, 1024)


def measure(src_dev: int, dst_dev: int, size_mib: int, iters: int, warmup: int) -> dict[str, Any]:
    import torch

    n = size_mib * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=f"cuda:{src_dev}").random_(0, 255)
    dst = torch.empty(n, dtype=torch.uint8, device=f"cuda:{dst_dev}")
    # the copy runs on the current stream of the destination device (a pull, as NIXL's decode does)
    with torch.cuda.device(dst_dev):
        stream = torch.cuda.current_stream()
        for _ in range(warmup):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(src_dev)
        torch.cuda.synchronize(dst_dev)
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            dst.copy_(src, non_blocking=True)
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    if not torch.equal(src[:4096].cpu(), dst[:4096].cpu()):
        raise RuntimeError(f"copy GPU{src_dev}->GPU{dst_dev} produced wrong data")
    times.sort()
    best, median = times[0], times[len(times) // 2]
    del src, dst
    torch.cuda.empty_cache()
    return {
        "size_bytes": n,
        "iters": iters,
        "median_s": median,
        "best_s": best,
        "median_gbps": n / median / 1e9,
        "best_gbps": n / best / 1e9,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="link_bandwidth.json", help="JSON result file")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--gpus", default="0,1", help="the two GPU ids (default 0,1)")
    args = ap.parse_args()

    import torch

    a, b = (int(x) for x in args.gpus.split(","))
    if not torch.cuda.is_available() or torch.cuda.device_count() <= max(a, b):
        print(f"link_bandwidth: needs GPUs {a} and {b}; torch sees {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    results = []
    for src, dst in ((a, b), (b, a)):
        for size in SIZES_MIB:
            r = measure(src, dst, size, args.iters, args.warmup)
            r.update({"src": src, "dst": dst, "direction": f"GPU{src}->GPU{dst}"})
            results.append(r)
            print(
                f"GPU{src}->GPU{dst} {size:5d} MiB  median {r['median_gbps']:7.1f} GB/s"
                f"  best {r['best_gbps']:7.1f} GB/s"
            )
    by_dir: dict[str, float] = {}
    for r in results:
        d = str(r["direction"])
        by_dir[d] = max(by_dir.get(d, 0.0), float(r["median_gbps"]))
    out = {
        "schema": "pdkit-link-bandwidth/1",
        "command": " ".join(sys.argv),
        "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpus": {str(i): torch.cuda.get_device_name(i) for i in (a, b)},
        "peer_access": {
            f"GPU{a}->GPU{b}": torch.cuda.can_device_access_peer(a, b),
            f"GPU{b}->GPU{a}": torch.cuda.can_device_access_peer(b, a),
        },
        "results": results,
        "peak_gbps_by_direction": by_dir,
        "peak_gbps": max(by_dir.values()),
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    print(f"peak {out['peak_gbps']:.1f} GB/s (median of the best size) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
