"""Prometheus metrics of the frontend (``pdkit_`` prefix), one registry per :class:`Frontend`.

A private ``CollectorRegistry`` (not the global default) lets tests and the launcher run several
frontends in one process without duplicate-metric errors.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from pdkit.prom_series import Series

# Latency buckets from sub-millisecond (router overhead, ITL) to minutes (long generations).
_LAT = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)
SEED_OUTCOMES = ("seeded", "ended_at_prefill", "refused", "fallback")
_ITL = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)


class FrontendMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        series = Series(self.registry)
        counter, gauge, histogram = series.counter, series.gauge, series.histogram
        self.requests = counter("pdkit_requests", "Client requests by routing mode and HTTP status", "mode", "status")
        self.ttft = histogram(
            "pdkit_time_to_first_token_seconds",
            "Streamed requests: arrival to the first token byte sent",
            "mode",
            buckets=_LAT,
        )
        self.itl = histogram(
            "pdkit_inter_token_latency_seconds", "Streamed requests: gap between SSE events", "mode", buckets=_ITL
        )
        self.e2e = histogram("pdkit_e2e_request_latency_seconds", "Arrival to last byte", "mode", buckets=_LAT)
        self.prefill_hop = histogram(
            "pdkit_prefill_hop_seconds", "Prefill hop (max_tokens=1) duration, successful hops", buckets=_LAT
        )
        self.decode_hop = histogram(
            "pdkit_decode_hop_seconds",
            "Decode (or single) hop duration, request sent to last byte",
            "mode",
            buckets=_LAT,
        )
        self.retries = counter("pdkit_retries", "Hops retried on another worker of the same role", "role", "reason")
        self.fallbacks = counter("pdkit_fallbacks", "Disagg requests prefilled on the decode worker instead", "reason")
        self.stream_errors = counter(
            "pdkit_stream_errors", "Streams ended with an SSE error event after the first byte"
        )
        self.client_disconnects = counter(
            "pdkit_client_disconnects", "Requests whose client went away (upstream aborted)"
        )
        self.inflight = gauge("pdkit_worker_inflight", "Requests this frontend has on each worker", "worker_id", "role")
        self.workers = gauge("pdkit_registry_workers", "Registered live workers", "role")
        self.registry_messages = counter(
            "pdkit_registry_messages", "Agent messages by type and result", "type", "result"
        )
        self.actual_hit_tokens = counter(
            "pdkit_kv_actual_hit_tokens",
            "Prompt tokens the workers report as cache hits (heartbeat deltas of vllm:prefix_cache_hits = "
            "source prefix_cache, pdkit:lmcache_hit_tokens = source lmcache)",
            "worker",
            "source",
        )
        self.actual_query_tokens = counter(
            "pdkit_kv_actual_query_tokens",
            "Prompt tokens the workers looked up in their prefix cache (heartbeat deltas of vllm:prefix_cache_queries)",
            "worker",
        )
        # Admission queue (pdkit.frontend.admission): ``role`` is what the request waits for first
        # (prefill for a disaggregated request, which needs a prefill and a decode slot at once).
        self.queue_depth = gauge("pdkit_admission_queue_depth", "Requests waiting for a worker slot", "role")
        self.queue_wait = histogram(
            "pdkit_admission_queue_wait_seconds",
            "Arrival to admission (0 when a slot was free)",
            "role",
            buckets=(0.0,) + _LAT + (300.0, 600.0),
        )
        self.admission_rejections = counter(
            "pdkit_admission_rejections",
            "Requests refused 503 by admission: queue_full, queue_timeout, no_worker, draining",
            "reason",
        )
        # First-token seeding (docs/seeding.md): what happened to each disaggregated request the switch
        # applies to.  seeded: the decode continued the prefill's token; ended_at_prefill: that token was
        # the whole answer (no decode hop); refused: the request takes the unseeded path (n > 1, echo,
        # tools, X-Pdkit-Seed: off, ...); fallback: seeding failed before anything reached the client.
        self.seeded_hops = counter(
            "pdkit_frontend_seeded_hops",
            "Disaggregated requests by first-token seeding outcome: seeded, ended_at_prefill, refused, fallback",
            "outcome",
        )
        for outcome in SEED_OUTCOMES:
            self.seeded_hops.labels(outcome)
        for role in ("prefill", "decode", "agg"):
            self.workers.labels(role=role).set(0)
            self.queue_depth.labels(role).set(0)

    def render(self) -> bytes:
        return generate_latest(self.registry)


# Load field -> (counter, source label); the fields are optional in the heartbeat (see ActualHits).
_HIT_FIELDS = (
    ("prefix_cache_hits", "prefix_cache"),
    ("lmcache_hit_tokens", "lmcache"),
    ("prefix_cache_queries", None),
)


class ActualHits:
    """Turns the cumulative cache counters a heartbeat may carry into ``pdkit_kv_actual_*`` counters.

    Why deltas of heartbeats: the agent already scrapes the engine's ``/metrics`` every heartbeat, so the
    frontend learns the *actual* prefix hits (to set beside ``pdkit_kv_predicted_hit_tokens_total``)
    without scraping anything itself.  The first value seen for a worker is a baseline (what it hit
    before this frontend knew it is not ours to count); a value lower than the last one means the
    engine restarted, so the new value is all new.  Fields absent from the heartbeat (older agents,
    ``None``) are skipped, so this works with and without the optional protocol fields.
    """

    def __init__(self, metrics: FrontendMetrics) -> None:
        self.metrics = metrics
        self._last: dict[str, dict[str, float]] = {}

    def observe(self, worker: Any, load: Any) -> None:
        wid = str(worker.worker_id)
        last = self._last.setdefault(wid, {})
        for field, source in _HIT_FIELDS:
            value = getattr(load, field, None)
            if value is None:
                continue
            value = float(value)
            prev = last.get(field)
            last[field] = value
            if prev is None:
                continue
            delta = value - prev if value >= prev else value
            if delta <= 0:
                continue
            if source is None:
                self.metrics.actual_query_tokens.labels(wid).inc(delta)
            else:
                self.metrics.actual_hit_tokens.labels(wid, source).inc(delta)

    def forget(self, worker_id: str) -> None:
        """Forget one worker's baseline (it left; O(1), for the registry's per-worker hook)."""
        self._last.pop(worker_id, None)

    def retain(self, worker_ids: Container[str]) -> None:
        """Forget baselines of workers that left (a returning worker starts a new baseline)."""
        for wid in [w for w in self._last if w not in worker_ids]:
            del self._last[wid]
