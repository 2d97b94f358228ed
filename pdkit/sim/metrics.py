"""Prometheus metrics of one simulated engine, under vLLM's own names and labels.

Why vLLM's names: the worker agent scrapes ``vllm:num_requests_running`` / ``vllm:num_requests_waiting``
/ ``vllm:kv_cache_usage_perc`` for heartbeats and the KV-aware router compares its predictions with
``vllm:prefix_cache_hits``; both must work unchanged against a real vLLM worker.  Labels are vLLM's
``model_name`` and ``engine`` ("0").  Each engine has its own registry so several simulated workers can
live in one process (tests, fleet simulation).  Simulator-only series use the ``pdkit_sim:`` prefix.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# vLLM's own bucket lists (seconds), so that a dashboard's histograms line up with a real worker's.  Kept
# compact (fmt: skip): they are data copied from vLLM, and a value a line spread them over 60 lines.
_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0,
    640.0, 2560.0,
)  # fmt: skip
_ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
_E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
    1920.0, 7680.0,
)  # fmt: skip


class SimMetrics:
    """All series of one engine; ``render()`` is the ``/metrics`` body."""

    def __init__(self, model_name: str, engine: str = "0") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"model_name": model_name, "engine": engine}
        names = list(labels)
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, names, registry=r).labels(**labels)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, names, registry=r).labels(**labels)

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, names, buckets=buckets, registry=r).labels(**labels)

        self.running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        self.waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.prefix_cache_queries = counter(
            "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."
        )
        self.prefix_cache_hits = counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        )
        self.preemptions = counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.prompt_tokens_cached = counter(
            "vllm:prompt_tokens_cached", "Number of cached prompt tokens (local prefix hits)."
        )
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self._success = Counter(
            "vllm:request_success", "Count of successfully processed requests.", [*names, "finished_reason"], registry=r
        )
        self._labels = labels
        self.ttft = hist(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", _TTFT_BUCKETS
        )
        self.itl = hist(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", _ITL_BUCKETS
        )
        self.e2e = hist(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", _E2E_BUCKETS
        )
        self.queue_time = hist(
            "vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", _E2E_BUCKETS
        )
        self.steps = Counter("pdkit_sim:engine_steps", "Simulated engine steps.", names, registry=r).labels(**labels)
        self._transfer_bytes = Counter(
            "pdkit_sim:kv_transfer_bytes", "Simulated KV bytes moved P->D.", [*names, "direction"], registry=r
        )
        self._transfer_failures = Counter(
            "pdkit_sim:kv_transfer_failures", "KV loads that failed (policy fail).", [*names, "reason"], registry=r
        )
        self.leases_expired = counter("pdkit_sim:kv_leases_expired", "Prefill KV leases that expired unread.")
        self.lease_extensions = counter("pdkit_sim:kv_lease_extensions", "Lease extensions by decode heartbeats.")
        self.leases_active = gauge("pdkit_sim:kv_leases_active", "Prefill KV leases waiting for a decode read.")

    @property
    def request_success(self) -> _Labeller:
        return _Labeller(self._success, self._labels)

    @property
    def kv_transfer_bytes(self) -> _Labeller:
        return _Labeller(self._transfer_bytes, self._labels)

    @property
    def kv_transfer_failures(self) -> _Labeller:
        return _Labeller(self._transfer_failures, self._labels)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Labeller:
    """``metrics.request_success.labels(finished_reason="stop").inc()`` with the engine labels filled in."""

    def __init__(self, metric: Counter, base: dict[str, str]) -> None:
        self._metric = metric
        self._base = base

    def labels(self, **extra: str) -> Counter:
        return self._metric.labels(**self._base, **extra)
