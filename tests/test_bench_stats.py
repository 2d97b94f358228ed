"""Benchmark statistics on synthetic records with known timings (no server, no clocks)."""

from __future__ import annotations

import numpy as np
import pytest

from pdkit.bench.client import RequestRecord
from pdkit.bench.stats import Slo, distribution, percentile, summarize, tpot
from pdkit.bench.worker_metrics import histogram_quantile, nixl_delta, parse_metrics


def rec(
    start: float, ttft: float | None, itl: list[float], ok: bool = True, prompt: int = 100, error: str | None = None
) -> RequestRecord:
    r = RequestRecord(f"r{start}", start_s=start, ok=ok, error=error, prompt_tokens=prompt if ok else None)
    if ok:
        r.ttft_s = ttft
        r.itl_s = list(itl)
        r.output_tokens = len(itl) + 1
        r.e2e_s = (ttft or 0.0) + sum(itl)
        r.elapsed_s = r.e2e_s
    else:
        r.elapsed_s = 0.5
    return r


@pytest.mark.parametrize("values", [[3.0], [1.0, 2.0], [5.0, 1.0, 4.0, 2.0, 3.0], list(np.linspace(0, 1, 37) ** 2)])
@pytest.mark.parametrize("q", [0, 1, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear(values: list[float], q: float) -> None:
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edges() -> None:
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1.0], 101)
    d = distribution([0.1, 0.2, 0.3, 0.4])
    assert d["count"] == 4 and d["mean"] == pytest.approx(0.25) and d["min"] == 0.1 and d["max"] == 0.4
    assert d["p50"] == pytest.approx(0.25)


def test_tpot_and_itl_slo_statistics() -> None:
    r = rec(0.0, 0.5, [0.01, 0.02, 0.03, 0.10])
    assert r.e2e_s == pytest.approx(0.66)
    assert tpot(r) == pytest.approx(0.16 / 4)
    assert Slo(itl_stat="max").request_itl(r.itl_s) == pytest.approx(0.10)
    assert Slo(itl_stat="mean").request_itl(r.itl_s) == pytest.approx(0.04)
    assert Slo(itl_stat="p50").request_itl(r.itl_s) == pytest.approx(0.025)
    assert tpot(rec(0.0, 0.5, [])) is None  # one token: no TPOT
    assert tpot(rec(0.0, None, [], ok=False)) is None


def test_goodput_counts_only_requests_within_both_slos() -> None:
    slo = Slo(ttft_s=1.0, itl_s=0.025, itl_stat="max")
    records = [
        rec(0.0, 0.5, [0.01] * 9),  # good
        rec(1.0, 0.9, [0.02] * 9),  # good (edges are inclusive)
        rec(2.0, 1.5, [0.01] * 9),  # TTFT too slow
        rec(3.0, 0.2, [0.01] * 8 + [0.2]),  # one stall breaks the max-ITL SLO
        rec(4.0, 0.2, []),  # one token: judged on TTFT only -> good
        rec(5.0, None, [], ok=False, error="http_500"),  # failed: never good
        rec(6.0, None, [], ok=False, error="timeout"),
    ]
    s = summarize(records, slo)
    assert s["requests"] == 7 and s["completed"] == 5 and s["failed"] == 2
    assert s["errors"] == {"http_500": 1, "timeout": 1}
    assert s["goodput"]["good_requests"] == 3
    assert s["goodput"]["good_fraction"] == pytest.approx(3 / 7)
    # window: first start (0.0) to the last end: failed request at 6.0 ran 0.5 s -> 6.5 s
    assert s["duration_s"] == pytest.approx(6.5)
    assert s["goodput"]["goodput_rps"] == pytest.approx(3 / 6.5)
    # a p99 per-request ITL ignores nothing here but interpolates: same verdicts for these records
    assert summarize(records, Slo(ttft_s=1.0, itl_s=0.025))["goodput"]["good_requests"] == 3


def test_throughput_arithmetic() -> None:
    records = [rec(float(i), 0.1, [0.01] * 9, prompt=1000) for i in range(4)]  # 10 tokens each
    s = summarize(records, Slo(), duration_s=8.0)
    assert s["output_tokens"] == 40 and s["input_tokens"] == 4000
    assert s["request_throughput_rps"] == pytest.approx(0.5)
    assert s["output_token_throughput_tps"] == pytest.approx(5.0)
    assert s["input_token_throughput_tps"] == pytest.approx(500.0)
    assert s["total_token_throughput_tps"] == pytest.approx(505.0)
    assert s["ttft_s"]["p50"] == pytest.approx(0.1)
    assert s["itl_s"]["count"] == 36 and s["itl_s"]["p99"] == pytest.approx(0.01)
    empty = summarize([], Slo())
    assert empty["requests"] == 0 and empty["request_throughput_rps"] is None


def test_prompt_length_mismatch_is_counted() -> None:
    a, b = rec(0.0, 0.1, [0.01]), rec(1.0, 0.1, [0.01])
    a.expected_prompt_tokens, b.expected_prompt_tokens = 100, 99
    assert summarize([a, b], Slo())["prompt_len_mismatches"] == 1


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    buckets = {0.01: 2.0, 0.05: 8.0, 0.1: 10.0, float("inf"): 10.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.01 + 0.04 * (5 - 2) / 6)
    assert histogram_quantile(0.1, buckets) == pytest.approx(0.005)
    assert histogram_quantile(0.5, {float("inf"): 0.0}) is None
    assert histogram_quantile(0.99, {0.1: 1.0, float("inf"): 5.0}) == pytest.approx(0.1)


METRICS_BEFORE = """
# TYPE vllm:nixl_xfer_time_seconds histogram
vllm:nixl_xfer_time_seconds_bucket{engine="0",le="0.005"} 1
vllm:nixl_xfer_time_seconds_bucket{engine="0",le="0.01"} 1
vllm:nixl_xfer_time_seconds_bucket{engine="0",le="+Inf"} 1
vllm:nixl_xfer_time_seconds_sum{engine="0"} 0.004
vllm:nixl_xfer_time_seconds_count{engine="0"} 1
# TYPE vllm:nixl_bytes_transferred histogram
vllm:nixl_bytes_transferred_bucket{engine="0",le="+Inf"} 1
vllm:nixl_bytes_transferred_sum{engine="0"} 1000000
vllm:nixl_bytes_transferred_count{engine="0"} 1
# TYPE vllm:nixl_num_failed_transfers counter
vllm:nixl_num_failed_transfers_total{engine="0"} 0
"""


def test_nixl_delta_between_two_scrapes() -> None:
    after = (
        METRICS_BEFORE.replace('le="0.01"} 1', 'le="0.01"} 3')
        .replace('le="+Inf"} 1\nvllm:nixl_xfer', 'le="+Inf"} 3\nvllm:nixl_xfer')
        .replace('sum{engine="0"} 0.004', 'sum{engine="0"} 0.020')
        .replace('seconds_count{engine="0"} 1', 'seconds_count{engine="0"} 3')
        .replace('transferred_sum{engine="0"} 1000000', 'transferred_sum{engine="0"} 33000000')
        .replace('transferred_count{engine="0"} 1', 'transferred_count{engine="0"} 3')
        .replace('failed_transfers_total{engine="0"} 0', 'failed_transfers_total{engine="0"} 1')
    )
    d = nixl_delta(parse_metrics(METRICS_BEFORE), parse_metrics(after), requests=2)
    assert d["transfers"] == 2 and d["bytes"] == pytest.approx(32e6)
    assert d["xfer_time_s_sum"] == pytest.approx(0.016) and d["xfer_time_s_mean"] == pytest.approx(0.008)
    assert d["bandwidth_gbps"] == pytest.approx(32e6 / 0.016 / 1e9)
    assert d["bytes_per_request"] == pytest.approx(16e6) and d["transfers_per_request"] == 1
    assert d["nixl_num_failed_transfers"] == 1
    assert d["xfer_time_s_p50_est"] == pytest.approx(0.0075)  # both new transfers fell in (0.005, 0.01]
    assert nixl_delta(parse_metrics(""), parse_metrics(""))["exported"] is False


def test_progress_falls_back_to_stderr_without_rich(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import builtins

    from pdkit.bench.progress import Progress

    real_import = builtins.__import__

    def no_rich(name: str, *a: object, **kw: object) -> object:
        if name.startswith("rich"):
            raise ImportError(name)
        return real_import(name, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_rich)
    with Progress("pt", 3) as p:
        p.advance(ok=True)
        p.advance(ok=False)
        p.advance(ok=True)
    err = capsys.readouterr().err
    assert err.endswith("\n") and "3/3 failed 1" in err
    with Progress("quiet", 2, enabled=False) as q:
        q.advance()
    assert capsys.readouterr().err == ""
