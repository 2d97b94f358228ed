"""Engine ``/metrics`` scrapes around a benchmark point: NIXL P->D transfer time and bandwidth.

vLLM 0.26.0's NIXL connector (``kv_connector/v1/nixl/stats.py``) exports, per engine, histograms
``vllm:nixl_xfer_time_seconds`` (one observation per finished transfer), ``vllm:nixl_post_time_seconds``,
``vllm:nixl_bytes_transferred`` and ``vllm:nixl_num_descriptors``, and counters
``vllm:nixl_num_failed_transfers``, ``vllm:nixl_num_failed_notifications`` and
``vllm:nixl_num_kv_expired_reqs`` (``_total`` on the wire).  In pull mode the *decode* worker records
them (it issues the reads); in push mode the prefill worker does -- scraping every worker covers both.

Why deltas: the histograms are cumulative since the engine started, so the benchmark scrapes before and
after each point and reports the difference: transfers, bytes, summed transfer time, mean time and size
per transfer, bandwidth (= bytes / transfer time, what the link delivered while busy), transfer time
quantiles estimated from the bucket deltas, and per-request figures when the number of requests is
known.  A few other counters (prefix-cache and LMCache hits, the simulator's KV bytes) are kept as raw
deltas because the LMCache cold/warm comparison needs them.
"""

from __future__ import annotations

import asyncio
import math
from collections import defaultdict
from typing import Any

import aiohttp

XFER_TIME = "vllm:nixl_xfer_time_seconds"
POST_TIME = "vllm:nixl_post_time_seconds"
XFER_BYTES = "vllm:nixl_bytes_transferred"
NUM_DESCS = "vllm:nixl_num_descriptors"
NIXL_COUNTERS = (
    "vllm:nixl_num_failed_transfers",
    "vllm:nixl_num_failed_notifications",
    "vllm:nixl_num_kv_expired_reqs",
)
HISTOGRAMS = (XFER_TIME, POST_TIME, XFER_BYTES, NUM_DESCS)
# counters worth a raw delta in every result file (prefix match on the sample name)
DELTA_PREFIXES = (
    "vllm:nixl_num_",
    "vllm:prefix_cache_",
    "vllm:prompt_tokens_cached",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:num_preemptions",
    "lmcache:",
    "pdkit_sim:kv_transfer",
)

Snapshot = dict[str, Any]


def parse_metrics(text: str) -> Snapshot:
    """Prometheus text -> ``{"hist": {name: {"sum", "count", "buckets": {le: n}}}, "counters": {name: v}}``.

    Label sets (engines, model names) are summed: the benchmark reports per worker URL.
    """
    from pdkit import prom

    hist: dict[str, dict[str, Any]] = {}
    counters: dict[str, float] = defaultdict(float)
    for fam in prom.families(text):
        for s in fam.samples:
            name = s.name
            if fam.type == "histogram" and fam.name in HISTOGRAMS:
                h = hist.setdefault(fam.name, {"sum": 0.0, "count": 0.0, "buckets": defaultdict(float)})
                if name.endswith("_bucket"):
                    h["buckets"][float(s.labels["le"])] += s.value
                elif name.endswith("_sum"):
                    h["sum"] += s.value
                elif name.endswith("_count"):
                    h["count"] += s.value
            elif fam.type in ("counter", "gauge", "untyped", "unknown") and name.startswith(DELTA_PREFIXES):
                if name.endswith("_created"):
                    continue
                counters[name] += s.value
    return {"hist": hist, "counters": dict(counters)}


async def scrape(session: aiohttp.ClientSession, url: str, timeout_s: float = 10.0) -> Snapshot | None:
    """One ``/metrics`` snapshot, or None when the URL does not answer (reported, not fatal)."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                return None
            return parse_metrics(await resp.text())
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError):
        return None


async def scrape_all(session: aiohttp.ClientSession, urls: list[str]) -> dict[str, Snapshot | None]:
    snaps = await asyncio.gather(*(scrape(session, u) for u in urls))
    return dict(zip(urls, snaps, strict=False))


def _hist_delta(before: Snapshot, after: Snapshot, name: str) -> dict[str, Any] | None:
    a = after["hist"].get(name)
    if a is None:
        return None
    b = before["hist"].get(name) or {"sum": 0.0, "count": 0.0, "buckets": {}}
    buckets = {le: n - b["buckets"].get(le, 0.0) for le, n in a["buckets"].items()}
    return {"sum": a["sum"] - b["sum"], "count": a["count"] - b["count"], "buckets": dict(sorted(buckets.items()))}


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' ``histogram_quantile``: linear interpolation inside the bucket holding rank ``q``."""
    items = sorted(buckets.items())
    if not items or items[-1][1] <= 0:
        return None
    total = items[-1][1]
    rank = q * total
    prev_le, prev_n = 0.0, 0.0
    for le, n in items:
        if n >= rank:
            if math.isinf(le):
                return prev_le  # beyond the last finite bucket: its bound is the best estimate
            if n == prev_n:
                return le
            return prev_le + (le - prev_le) * (rank - prev_n) / (n - prev_n)
        prev_le, prev_n = le, n
    return prev_le


def nixl_delta(before: Snapshot, after: Snapshot, requests: int | None = None) -> dict[str, Any]:
    """NIXL transfer figures between two snapshots of one worker (``transfers == 0``: none happened)."""
    t = _hist_delta(before, after, XFER_TIME)
    by = _hist_delta(before, after, XFER_BYTES)
    post = _hist_delta(before, after, POST_TIME)
    descs = _hist_delta(before, after, NUM_DESCS)
    counters = {
        name: after["counters"].get(name + "_total", 0.0) - before["counters"].get(name + "_total", 0.0)
        for name in NIXL_COUNTERS
    }
    out: dict[str, Any] = {
        "exported": t is not None,
        "transfers": 0,
        **{k.split(":")[1]: v for k, v in counters.items()},
    }
    if t is None or by is None or t["count"] <= 0:
        return out
    n = t["count"]
    out.update(
        {
            "transfers": int(n),
            "bytes": by["sum"],
            "xfer_time_s_sum": t["sum"],
            "xfer_time_s_mean": t["sum"] / n,
            "xfer_time_s_p50_est": histogram_quantile(0.5, t["buckets"]),
            "xfer_time_s_p90_est": histogram_quantile(0.9, t["buckets"]),
            "xfer_time_s_p99_est": histogram_quantile(0.99, t["buckets"]),
            "bytes_per_transfer": by["sum"] / by["count"] if by["count"] else None,
            "bandwidth_gbps": (by["sum"] / t["sum"] / 1e9) if t["sum"] > 0 else None,
            "post_time_s_mean": post["sum"] / post["count"] if post and post["count"] else None,
            "descriptors_per_transfer": descs["sum"] / descs["count"] if descs and descs["count"] else None,
        }
    )
    if requests:
        out.update(
            {
                "requests": requests,
                "transfers_per_request": n / requests,
                "bytes_per_request": by["sum"] / requests,
                "xfer_time_s_per_request": t["sum"] / requests,
            }
        )
    return out


def counter_deltas(before: Snapshot, after: Snapshot) -> dict[str, float]:
    """Raw deltas of the counters in :data:`DELTA_PREFIXES` (zeros dropped)."""
    out = {}
    for name, v in after["counters"].items():
        d = v - before["counters"].get(name, 0.0)
        if d:
            out[name] = d
    return dict(sorted(out.items()))


def worker_report(
    before: dict[str, Snapshot | None],
    after: dict[str, Snapshot | None],
    requests: int | None = None,
    link_peak_gbps: float | None = None,
) -> dict[str, Any]:
    """Per worker URL: NIXL delta + counter deltas; ``total`` sums NIXL over all workers."""
    per: dict[str, Any] = {}
    tot_bytes = tot_time = tot_n = 0.0
    for url, a in after.items():
        b = before.get(url)
        if a is None or b is None:
            per[url] = {"error": "metrics not reachable"}
            continue
        nd = nixl_delta(b, a, requests)
        per[url] = {"nixl": nd, "counters": counter_deltas(b, a)}
        if nd["transfers"]:
            tot_bytes += nd["bytes"]
            tot_time += nd["xfer_time_s_sum"]
            tot_n += nd["transfers"]
    total: dict[str, Any] = {"transfers": int(tot_n), "bytes": tot_bytes, "xfer_time_s_sum": tot_time}
    if tot_n:
        total["xfer_time_s_mean"] = tot_time / tot_n
        total["bandwidth_gbps"] = tot_bytes / tot_time / 1e9 if tot_time > 0 else None
        if requests:
            total["xfer_time_s_per_request"] = tot_time / requests
            total["bytes_per_request"] = tot_bytes / requests
        if link_peak_gbps and total.get("bandwidth_gbps"):
            total["link_peak_gbps"] = link_peak_gbps
            total["fraction_of_link_peak"] = total["bandwidth_gbps"] / link_peak_gbps
    return {"workers": per, "nixl_total": total}
