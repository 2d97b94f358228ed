"""pdkit.prom: the one reader of Prometheus text pages (sample names, exact labels, one parse)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pdkit import prom


def page() -> str:
    reg = CollectorRegistry()
    c = Counter("pdkit_requests", "requests", ["mode", "status"], registry=reg)
    c.labels(mode="disagg", status="200").inc(3)
    c.labels(mode="agg", status="200").inc(2)
    c.labels(mode="disagg", status="502").inc()
    Gauge("pdkit_depth", "depth", registry=reg).set(4)
    h = Histogram("pdkit_ttft_seconds", "ttft", ["mode"], buckets=(0.1, 1.0), registry=reg)
    h.labels(mode="disagg").observe(0.05)
    h.labels(mode="disagg").observe(0.5)
    Counter("pdkit_other", "with a label that contains 'mode'", ["other_mode"], registry=reg).labels("agg").inc(7)
    return generate_latest(reg).decode()


def test_counter_is_read_by_its_total_sample_and_labels_match_exactly() -> None:
    text = page()
    assert prom.total(text, "pdkit_requests_total") == 6  # summed over labels; _created not added
    assert prom.total(text, "pdkit_requests_total", mode="disagg") == 4
    assert prom.total(text, "pdkit_requests_total", mode="disagg", status="200") == 3
    assert prom.total(text, "pdkit_requests_total", mode="disag") == 0  # exact, not a prefix
    assert prom.total(text, "pdkit_requests") == 0  # the family name is not a sample name
    assert prom.total(text, "pdkit_other_total", mode="agg") == 0  # other_mode is another label
    assert prom.total(text, "pdkit_missing_total") == 0


def test_gauge_histogram_and_one_parse() -> None:
    fams = prom.families(page())
    assert prom.total(fams, "pdkit_depth") == 4
    assert prom.total(fams, "pdkit_ttft_seconds_count", mode="disagg") == 2
    assert prom.total(fams, "pdkit_ttft_seconds_sum") == pytest.approx(0.55)
    assert prom.total(fams, "pdkit_ttft_seconds_bucket", le="0.1") == 1
    assert [s.labels["le"] for s in prom.samples(fams, "pdkit_ttft_seconds_bucket")] == ["0.1", "1.0", "+Inf"]
    assert prom.totals(fams, ["pdkit_depth", "pdkit_requests_total"]) == {"pdkit_depth": 4, "pdkit_requests_total": 6}


def test_by_label_groups_and_joins_keys() -> None:
    text = page()
    assert prom.by_label(text, "pdkit_requests_total", "status") == {"200": 5, "502": 1}
    assert prom.by_label(text, "pdkit_requests_total", "mode", "status") == {
        "disagg/200": 3,
        "agg/200": 2,
        "disagg/502": 1,
    }
    assert prom.by_label(text, "pdkit_depth", "mode") == {"": 4}  # a missing label counts as empty
