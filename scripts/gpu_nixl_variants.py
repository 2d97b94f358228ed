"""Why is the P->D KV transfer slow, and which launch settings fix it? (2xH200, NVLink)

Runs ``pdkit launch disagg --prefill-gpu 1 --decode-gpu 0`` once per NIXL variant (pull vs push,
UCX transports, KV block size), sends long prompts one at a time, and reads NIXL's own transfer
metrics (``vllm:nixl_xfer_time_seconds``, ``vllm:nixl_bytes_transferred``,
``vllm:nixl_num_descriptors``) from both workers' /metrics, next to the link peak measured with a
plain torch GPU0->GPU1 copy in the same run.  The first request of each variant is left out (it pays
for the NIXL handshake).

Usage on the device:  python3 scripts/gpu_nixl_variants.py [--variants a,b,c]   (~90 s per variant)
Writes $OUT/nixl_variants.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from pdkit import prom
from pdkit.gpu_check import harness as g

UCX_NVLINK = {"UCX_TLS": "cuda_ipc,cuda_copy,tcp"}
VARIANTS: dict[str, dict] = {
    "pull-default": {},
    "pull-ucx-nvlink": {"nixl": {"env": UCX_NVLINK}},
    "push-ucx-nvlink": {"nixl": {"mode": "push", "env": UCX_NVLINK}},
    "pull-ucx-nvlink-block64": {"nixl": {"env": UCX_NVLINK}, "block_size": 64},
    "pull-block64": {"block_size": 64},
}
METRICS = ("vllm:nixl_xfer_time_seconds", "vllm:nixl_bytes_transferred", "vllm:nixl_num_descriptors")


def link_peak_gbps() -> dict:
    import torch

    out = {}
    for src, dst in ((0, 1), (1, 0)):
        a = torch.empty(1 << 30, dtype=torch.uint8, device=f"cuda:{src}")
        b = torch.empty(1 << 30, dtype=torch.uint8, device=f"cuda:{dst}")
        for _ in range(3):
            b.copy_(a)
        torch.cuda.synchronize(src)
        torch.cuda.synchronize(dst)
        t0 = time.perf_counter()
        for _ in range(10):
            b.copy_(a)
        torch.cuda.synchronize(src)
        torch.cuda.synchronize(dst)
        out[f"gpu{src}->gpu{dst}"] = round(10 * (1 << 30) / (time.perf_counter() - t0) / 1e9, 1)
        del a, b
        torch.cuda.empty_cache()
    return out


def scrape(url: str) -> dict[str, float]:
    """Each histogram's ``_sum`` and ``_count``, summed over labels, from one read of ``url``'s page."""
    return prom.fetch_totals(url, [name + suffix for name in METRICS for suffix in ("_sum", "_count")])


def both(urls: list[str]) -> dict[str, float]:
    total: dict[str, float] = {}
    for url in urls:
        for k, v in scrape(url).items():
            total[k] = total.get(k, 0.0) + v
    return total


def run_variant(name: str, overrides: dict, prompts: list[str]) -> dict:
    run_dir = g.STATE / f"nixl-{name}"
    config = {**g.common_config(), "mode": "disagg", "prefill": {"gpus": [[1]]}, "decode": {"gpus": [[0]]}}
    for key, value in overrides.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    proc, ready_s = g.launch(["disagg", "--prefill-gpu", "1", "--decode-gpu", "0"], config, run_dir)
    urls = ["http://127.0.0.1:8300", "http://127.0.0.1:8400"]
    rows = []
    try:
        warm = prompts[0]
        g.stream_request("/v1/completions", {"model": "synth", "prompt": "warm-up " + warm, "max_tokens": 2})
        for i, prompt in enumerate(prompts):
            before = both(urls)
            r = g.stream_request(
                "/v1/completions", {"model": "synth", "prompt": f"{i} {prompt}", "max_tokens": 2, "temperature": 0}
            )
            time.sleep(0.5)
            after = both(urls)
            d = {k: after[k] - before.get(k, 0.0) for k in after}
            xfer_s = d["vllm:nixl_xfer_time_seconds_sum"]
            nbytes = d["vllm:nixl_bytes_transferred_sum"]
            rows.append({
                "prompt_tokens": (r["usage"] or {}).get("prompt_tokens"), "ttft_s": r["ttft_s"],
                "xfers": d["vllm:nixl_xfer_time_seconds_count"], "xfer_s": xfer_s, "bytes": nbytes,
                "descriptors": d["vllm:nixl_num_descriptors_sum"],
                "gbps": round(nbytes / xfer_s / 1e9, 2) if xfer_s > 0 else None,
            })  # fmt: skip
    finally:
        stopped = g.stop(proc, run_dir)
    return {"ready_s": round(ready_s, 1), "rows": rows, "stop": stopped, "bad_log_lines": g.scan_logs(run_dir)[:20]}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    g.OUT.mkdir(parents=True, exist_ok=True)
    from pdkit.model_files import default_model_dir

    prompts = g.build_prompts(default_model_dir())[-3:]  # ~3000, 4500, 6000 tokens
    result: dict = {"link_peak_gbps": link_peak_gbps(), "variants": {}}
    g.log("link peak", result["link_peak_gbps"])
    for name in args.variants.split(","):
        try:
            result["variants"][name] = run_variant(name, VARIANTS[name], prompts)
        except Exception as exc:
            result["variants"][name] = {"error": repr(exc)}
        g.log(name, json.dumps(result["variants"][name])[:1500])
        (g.OUT / "nixl_variants.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
