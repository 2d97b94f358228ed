"""The Grafana dashboard (configs/grafana/pdkit.json) is current and names only metrics that exist.

pdkit's own series come from the real registries (frontend, KV routing) and PdConnector's counter list;
vLLM's from the metric-name literals in the installed vLLM 0.26.0 package (its source is the authority).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pdkit import grafana
from pdkit.frontend.metrics import FrontendMetrics
from pdkit.routing.kv_metrics import KvRoutingMetrics

ROOT = Path(__file__).resolve().parent.parent

SUFFIXES = ("_bucket", "_sum", "_count", "_total")
METRIC = re.compile(r"(?:pdkit_|pdkit:|vllm:)[a-zA-Z0-9_:]+")


def base_name(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def dashboard_metrics() -> set[str]:
    doc = json.loads((ROOT / "configs" / "grafana" / "pdkit.json").read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    assert exprs
    return {base_name(m) for e in exprs for m in METRIC.findall(e)}


def test_committed_dashboard_is_what_the_script_writes() -> None:
    committed = json.loads((ROOT / "configs" / "grafana" / "pdkit.json").read_text())
    assert committed == grafana.dashboard(), "run: python -m pdkit.grafana"


def test_pdkit_series_in_the_dashboard_exist() -> None:
    fe = FrontendMetrics()
    KvRoutingMetrics(fe.registry)
    known = {m.name for m in fe.registry.collect()}
    pd_types = pytest.importorskip("pdkit.connectors.pd_types")  # PdConnector's module imports vllm
    known |= {f"pdkit:{pd_types.MICROSECOND_COUNTERS.get(c, c)}" for c in pd_types.PD_COUNTERS}
    wanted = {m for m in dashboard_metrics() if m.startswith("pdkit")}
    assert wanted and wanted <= known, sorted(wanted - known)


def test_vllm_series_in_the_dashboard_exist_in_vllm() -> None:
    vllm = pytest.importorskip("vllm")
    src = "\n".join(p.read_text(errors="replace") for p in Path(vllm.__file__).parent.rglob("*.py")
                    if "metrics" in p.name or "stats" in p.name or "loggers" in p.name)  # fmt: skip
    literals = {base_name(m) for m in re.findall(r"[\"'](vllm:[a-zA-Z0-9_:]+)[\"']", src)}
    wanted = {m for m in dashboard_metrics() if m.startswith("vllm:")}
    assert wanted and wanted <= literals, sorted(wanted - literals)
