"""The Grafana dashboard of a pdkit deployment, written to ``configs/grafana/pdkit.json``.

Why generated: a dashboard is a few hundred lines of JSON in which a renamed metric silently becomes an
empty panel.  Here every panel is one line (title, PromQL, unit), and ``tests/test_dashboard.py`` checks
that each metric an expression names is one pdkit or vLLM 0.26.0 really exports.

Scrape targets it assumes (Prometheus): the frontend (``/metrics``: ``pdkit_*``) and every engine
(``/metrics``: ``vllm:*`` and PdConnector's ``pdkit:*``), with the engine label ``instance``.

Usage: python -m pdkit.grafana [--out configs/grafana/pdkit.json] (``scripts/make_dashboard.py`` is the
same).  In the package so the test imports the dashboard's definition like any module.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent.parent / "configs" / "grafana" / "pdkit.json"  # the checkout's copy


def q(quantile: float, metric: str, by: str = "") -> str:
    group = f"le, {by}" if by else "le"
    return f"histogram_quantile({quantile}, sum by ({group}) (rate({metric}_bucket[$__rate_interval])))"


# (row title, [(panel title, [(PromQL, legend)], unit)])
ROWS: list[tuple[str, list[tuple[str, list[tuple[str, str]], str]]]] = [
    ("Requests (frontend)", [
        ("Requests by outcome", [("sum by (status) (rate(pdkit_requests_total[$__rate_interval]))", "{{status}}")],
         "reqps"),
        ("TTFT", [(q(0.5, "pdkit_time_to_first_token_seconds"), "p50"),
                  (q(0.99, "pdkit_time_to_first_token_seconds"), "p99")], "s"),
        ("Inter-token latency", [(q(0.5, "pdkit_inter_token_latency_seconds"), "p50"),
                                 (q(0.99, "pdkit_inter_token_latency_seconds"), "p99")], "s"),
        ("Prefill hop / decode hop p99", [(q(0.99, "pdkit_prefill_hop_seconds"), "prefill hop"),
                                          (q(0.99, "pdkit_decode_hop_seconds"), "decode hop")], "s"),
        ("Retries and local-prefill fallbacks",
         [("sum by (role, reason) (rate(pdkit_retries_total[$__rate_interval]))", "retry {{role}} {{reason}}"),
          ("sum by (reason) (rate(pdkit_fallbacks_total[$__rate_interval]))", "fallback {{reason}}"),
          ("rate(pdkit_stream_errors_total[$__rate_interval])", "stream broke after first byte")], "reqps"),
    ]),
    ("Workers", [
        ("Registered workers", [("pdkit_registry_workers", "{{role}}")], "short"),
        ("In flight per worker (frontend)", [("pdkit_worker_inflight", "{{worker_id}}")], "short"),
        ("Running / waiting (engine)", [("vllm:num_requests_running", "running {{instance}}"),
                                        ("vllm:num_requests_waiting", "waiting {{instance}}")], "short"),
        ("KV cache usage (engine)", [("vllm:kv_cache_usage_perc", "{{instance}}")], "percentunit"),
    ]),
    ("KV-aware routing", [
        ("Predicted vs actual prefix hits",
         [("sum by (worker) (rate(pdkit_kv_predicted_hit_tokens_total[$__rate_interval]))", "predicted {{worker}}"),
          ("sum by (worker) (rate(pdkit_kv_actual_hit_tokens_total[$__rate_interval]))", "actual {{worker}}")],
         "short"),
        ("Prefix-hit rate (engine)",
         [("sum by (instance) (rate(vllm:prefix_cache_hits_total[$__rate_interval])) / "
           "sum by (instance) (rate(vllm:prefix_cache_queries_total[$__rate_interval]))", "{{instance}}")],
         "percentunit"),
        ("Blocks the index holds", [("pdkit_kv_index_blocks", "{{worker}} {{tier}}")], "short"),
        ("KV-event lag", [("pdkit_kv_event_lag_seconds", "{{worker}}")], "s"),
        ("Event gaps, replays, index resets",
         [("sum by (worker) (rate(pdkit_kv_event_gaps_total[$__rate_interval]))", "gaps {{worker}}"),
          ("sum by (result) (rate(pdkit_kv_event_replays_total[$__rate_interval]))", "replay {{result}}"),
          ("sum by (reason) (rate(pdkit_kv_index_resets_total[$__rate_interval]))", "reset {{reason}}")], "short"),
    ]),
    ("P→D transfer and LMCache (engines)", [
        ("NIXL bandwidth while transferring",
         [("sum by (instance) (rate(vllm:nixl_bytes_transferred_sum[$__rate_interval])) / "
           "sum by (instance) (rate(vllm:nixl_xfer_time_seconds_sum[$__rate_interval]))", "{{instance}}")], "Bps"),
        ("NIXL transfer time", [(q(0.5, "vllm:nixl_xfer_time_seconds"), "p50"),
                                (q(0.99, "vllm:nixl_xfer_time_seconds"), "p99"),
                                (q(0.99, "vllm:nixl_post_time_seconds"), "post p99")], "s"),
        ("Descriptors per transfer",
         [("sum(rate(vllm:nixl_num_descriptors_sum[$__rate_interval])) / "
           "sum(rate(vllm:nixl_num_descriptors_count[$__rate_interval]))", "mean")], "short"),
        ("NIXL failures", [("sum(rate(vllm:nixl_num_failed_transfers_total[$__rate_interval]))", "failed transfers"),
                           ("sum(rate(vllm:nixl_num_kv_expired_reqs_total[$__rate_interval]))", "expired leases")],
         "short"),
        ("Tokens loaded by PdConnector",
         [("sum by (instance) (rate(pdkit:lmcache_hit_tokens_total[$__rate_interval]))", "LMCache {{instance}}"),
          ("sum by (instance) (rate(pdkit:nixl_load_tokens_total[$__rate_interval]))", "NIXL {{instance}}")],
         "short"),
        ("Transfer verification (verify_transfers)",
         [("sum(rate(pdkit:kv_verify_checked_blocks_total[$__rate_interval]))", "checked blocks"),
          ("sum(rate(pdkit:kv_verify_mismatch_blocks_total[$__rate_interval]))", "mismatching blocks"),
          ("sum(rate(pdkit:kv_verify_unsent_total[$__rate_interval]))", "sent without fingerprints")], "short"),
        ("Verification time per request (added to TTFT)",
         [("sum(rate(pdkit:kv_fingerprint_seconds_total[$__rate_interval])) / "
           "sum(rate(pdkit:kv_fingerprint_requests_total[$__rate_interval]))", "prefill: fingerprint"),
          ("sum(rate(pdkit:kv_verify_seconds_total[$__rate_interval])) / "
           "sum(rate(pdkit:kv_verify_requests_total[$__rate_interval]))", "decode: check")], "s"),
    ]),
]  # fmt: skip


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    pid = 0
    y = 0
    for row_title, row_panels in ROWS:
        pid += 1
        panels.append({"id": pid, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})  # fmt: skip
        y += 1
        for i, (title, targets, unit) in enumerate(row_panels):
            pid += 1
            panels.append({
                "id": pid, "type": "timeseries", "title": title,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": 8, "x": (i % 3) * 8, "y": y + (i // 3) * 8},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [{"refId": chr(ord("A") + k), "expr": expr, "legendFormat": legend}
                            for k, (expr, legend) in enumerate(targets)],
            })  # fmt: skip
        y += 8 * ((len(row_panels) + 2) // 3)
    return {
        "title": "pdkit: disaggregated prefill/decode on vLLM",
        "uid": "pdkit-overview",
        "schemaVersion": 39,
        "time": {"from": "now-30m", "to": "now"},
        "refresh": "10s",
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus"}]},
        "panels": panels,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dashboard(), indent=1) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
