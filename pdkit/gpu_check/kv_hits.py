"""What the frontend predicted against what each engine hit, per worker, read at one moment.

Why a module: the KV-routing GPU check and the stack check both compare the frontend's predicted
prefix hits with the engines' own counters, before and after a workload; one reader keeps them
measuring the same things (each script keeps its own JSON names through a rename table).
"""

from __future__ import annotations

from typing import Any

from pdkit import prom
from pdkit.agent import parse_load
from pdkit.status import fetch_status


def kv_hit_snapshot(frontend: str) -> dict[str, dict[str, Any]]:
    """Per worker id: its role, the frontend's predicted and heartbeat-learnt hit tokens (as ``pdkit
    status`` reads them) and the engine's own prefix-cache and LMCache counters from its ``/metrics``."""
    out: dict[str, dict[str, Any]] = {}
    for w in fetch_status(frontend).workers:
        engine = parse_load(prom.fetch(w.url))
        out[w.worker_id] = {
            "role": w.role,
            "predicted": w.predicted_hit_tokens,
            "via_heartbeats": w.actual_hit_tokens,
            "fe_queries": w.queried_tokens,
            "gpu_hits": engine.prefix_cache_hits or 0.0,
            "lmcache_hits": engine.lmcache_hit_tokens or 0.0,
            "queried": engine.prefix_cache_queries or 0.0,
        }
    return out


def renamed(snapshot: dict[str, dict[str, Any]], names: dict[str, str]) -> dict[str, dict[str, Any]]:
    """``snapshot`` with each worker's entries picked and renamed: ``names`` maps new name -> snapshot key."""
    return {wid: {new: entry[old] for new, old in names.items()} for wid, entry in snapshot.items()}
