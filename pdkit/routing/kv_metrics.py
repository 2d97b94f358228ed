"""Prometheus metrics of KV-aware routing (``pdkit_kv_`` prefix), registered on a registry the caller owns.

Why a caller-owned registry: the frontend keeps one private ``CollectorRegistry`` per instance (tests run
several frontends in one process); registering on the global default at import would collide.

The predicted-hit counters are in the same units as vLLM's own counters so that a dashboard can put
them side by side: ``pdkit_kv_predicted_hit_tokens_total{worker}`` against the worker's
``vllm:prefix_cache_hits_total`` (GPU tier; LMCache's hits for CPU/disk).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from pdkit.prom_series import Series

TIERS: tuple[str, ...] = ("GPU", "CPU", "DISK")


class KvRoutingMetrics:
    """All KV-routing series; every label set is created lazily (workers come and go)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        series = Series(registry)
        counter, gauge = series.counter, series.gauge
        self.index_blocks = gauge(
            "pdkit_kv_index_blocks", "Cached blocks the index holds per worker and tier", "worker", "tier"
        )
        self.batches = counter(
            "pdkit_kv_event_batches", "KV-event batches applied (live or replayed)", "worker", "source"
        )
        self.dropped = counter("pdkit_kv_event_batches_dropped", "KV-event batches not applied", "reason")
        self.lag = gauge(
            "pdkit_kv_event_lag_seconds", "Receive time minus the batch timestamp, last live batch", "worker"
        )
        self.gaps = counter("pdkit_kv_event_gaps", "Sequence gaps detected in a worker's stream", "worker")
        self.replays = counter(
            "pdkit_kv_event_replays",
            "Replay requests by outcome (ok, partial, failed, unavailable)",
            "worker",
            "result",
        )
        self.resets = counter(
            "pdkit_kv_index_resets",
            "Times a worker's entries were dropped (cleared, restart, gap, removed, overflow)",
            "worker",
            "reason",
        )
        self.prompt_blocks = counter(
            "pdkit_kv_routed_prompt_blocks", "Full prompt blocks of routed requests, by chosen worker", "worker", "role"
        )
        self.predicted_hit_blocks = counter(
            "pdkit_kv_predicted_hit_blocks",
            "Predicted prefix-hit blocks on the chosen worker, by the tier that holds them",
            "worker",
            "role",
            "tier",
        )
        self.predicted_hit_tokens = counter(
            "pdkit_kv_predicted_hit_tokens",
            "Predicted prefix-hit tokens on the chosen worker (vLLM's rule: at most prompt tokens - 1, whole blocks)",
            "worker",
            "role",
        )

    def set_index_size(self, worker: str, counts: dict[str, int]) -> None:
        for tier in TIERS:
            self.index_blocks.labels(worker, tier).set(counts.get(tier, 0))

    def forget_worker(self, worker: str) -> None:
        """Drop the gauges of a removed worker (counters stay: they are history)."""
        for tier in TIERS:
            try:
                self.index_blocks.remove(worker, tier)
            except KeyError:
                pass
        try:
            self.lag.remove(worker)
        except KeyError:
            pass
