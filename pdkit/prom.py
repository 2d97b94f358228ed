"""The one reader of Prometheus text pages (``/metrics``) in pdkit, built on prometheus_client's own parser.

Why one module: the agent (vLLM's load), ``pdkit status``, the benchmark's worker snapshots, the simulator
and the tests each read ``/metrics`` pages, some through prometheus_client's parser and some with
hand-written line splitters that disagreed on details (whether a sample without labels counts; a label
test by substring, so ``reason="x"`` also matched ``other_reason="x"``).  prometheus_client is already a
dependency and its parser is the reference for the format (escapes in label values, timestamps,
``+Inf``/``NaN``), so every reader goes through it here and the rules below hold everywhere.

Rules:

* A sample is picked by its **sample name**, as the page writes it: a counter ``foo`` is read as
  ``foo_total`` (its ``foo_created`` is another sample and is never added in), a histogram as
  ``foo_bucket`` / ``foo_sum`` / ``foo_count``, a gauge by its own name.  (prometheus_client names a
  counter's *family* without ``_total``; :func:`families` gives the families for readers that group by
  family or type.)
* A label given must match exactly: ``total(page, "pdkit_requests_total", mode="disagg")`` adds the
  samples whose ``mode`` label is ``disagg``; labels not given are summed over; a sample without a given
  label does not match.
* An absent series reads as 0 (a sum over no samples).

A ``page`` is the text itself or what :func:`families` returned for it, so a caller asking several
questions of one page parses it once.  :func:`fetch` reads a process's page over HTTP for the scripts
and checks that ask it synchronously (the frontend and agent read theirs in their own event loops).
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterable

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

Page = str | list[Metric]


def families(text: str) -> list[Metric]:
    """The metric families of a Prometheus text page, parsed once (raises ValueError on malformed text)."""
    return list(text_string_to_metric_families(text))


def samples(page: Page, name: str, /, **labels: str) -> list[Sample]:
    """The samples named ``name`` whose labels include ``labels`` exactly (see the module's rules)."""
    fams = families(page) if isinstance(page, str) else page
    return [
        s
        for fam in fams
        for s in fam.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def total(page: Page, name: str, /, **labels: str) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels`` exactly; 0 when there are none."""
    return sum((s.value for s in samples(page, name, **labels)), 0.0)


def totals(page: Page, names: Iterable[str]) -> dict[str, float]:
    """``{name: total(page, name)}`` for each name, from one parse of the page."""
    fams = families(page) if isinstance(page, str) else page
    return {name: total(fams, name) for name in names}


def by_label(page: Page, name: str, *keys: str) -> dict[str, float]:
    """Sums of the samples named ``name`` grouped by the values of ``keys``, joined with ``/``
    (``by_label(page, "pdkit_retries_total", "role", "reason")`` -> ``{"decode/connect_error": 1.0}``);
    a sample without one of the labels counts under an empty value."""
    out: dict[str, float] = {}
    for s in samples(page, name):
        key = "/".join(s.labels.get(k, "") for k in keys)
        out[key] = out.get(key, 0.0) + s.value
    return out


def fetch(base_url: str, timeout_s: float = 10.0) -> str:
    """The text of ``base_url``'s ``/metrics`` page (``http://host:port``); raises OSError when unreachable."""
    with urllib.request.urlopen(base_url.rstrip("/") + "/metrics", timeout=timeout_s) as resp:
        return str(resp.read().decode())


def fetch_totals(base_url: str, names: Iterable[str], timeout_s: float = 10.0) -> dict[str, float]:
    """``totals`` of ``base_url``'s page, read once: each series summed over its labels, 0 when absent."""
    return totals(fetch(base_url, timeout_s), names)
