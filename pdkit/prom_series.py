"""Declaring pdkit's own Prometheus series on a registry the caller owns (the frontend's, the router's).

Why a private registry per owner: tests and the launcher run several frontends in one process, and the
global default registry would refuse the second set of names.  Why this small class: every series takes
that registry and its label names, and the declarations read best as one line of name, help and labels;
both metrics modules (pdkit/frontend/metrics.py, pdkit/routing/kv_metrics.py) declare through it.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Series:
    """Factory of counters, gauges and histograms registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def counter(self, name: str, doc: str, *labels: str) -> Counter:
        return Counter(name, doc, list(labels), registry=self.registry)

    def gauge(self, name: str, doc: str, *labels: str) -> Gauge:
        return Gauge(name, doc, list(labels), registry=self.registry)

    def histogram(self, name: str, doc: str, *labels: str, buckets: Sequence[float]) -> Histogram:
        return Histogram(name, doc, list(labels), buckets=buckets, registry=self.registry)
