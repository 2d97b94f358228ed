"""``pdkit status``: one look at a running deployment, from its frontend alone.

Why: an operator's first questions -- which workers are up, how loaded, what their caches hold, whether
KV-aware routing predicts the hits the engines really get, how many requests failed or were retried --
are answered by two endpoints the frontend already serves (``/workers`` and ``/metrics``).  This module
reads both once and prints a table (or JSON), so nobody has to read Prometheus text by eye.  Standard
library only: it must work wherever ``pdkit`` is installed, next to a frontend or far from it.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

from pdkit import prom
from pdkit.errors import ConfigError


@dataclass
class WorkerStatus:
    worker_id: str
    role: str
    url: str
    model: str
    last_seen_s_ago: float
    inflight: int
    running: int
    waiting: int
    kv_usage: float
    index_blocks: dict[str, int]
    predicted_hit_tokens: float
    actual_hit_tokens: float
    queried_tokens: float

    @property
    def prediction_error(self) -> float | None:
        """|predicted - actual| / actual over the frontend's lifetime (None before any actual hit)."""
        if self.actual_hit_tokens <= 0:
            return None
        return abs(self.predicted_hit_tokens - self.actual_hit_tokens) / self.actual_hit_tokens


@dataclass
class FleetStatus:
    endpoint: str
    mode: str
    policy: str
    workers: list[WorkerStatus]
    requests: dict[str, float] = field(default_factory=dict)  # HTTP status (or outcome) -> count
    retries: dict[str, float] = field(default_factory=dict)  # "role/reason" -> count
    fallbacks: dict[str, float] = field(default_factory=dict)  # reason -> count

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for w, raw in zip(self.workers, out["workers"], strict=True):
            raw["prediction_error"] = w.prediction_error
        return out


def _get(url: str, timeout_s: float) -> str:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return str(resp.read().decode())
    except urllib.error.HTTPError as exc:
        raise ConfigError("--endpoint", f"{url} answered HTTP {exc.code}", "point it at a pdkit frontend") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(
            "--endpoint",
            f"cannot reach {url} ({reason})",
            "is the deployment running (`pdkit launch ...`)? pass the frontend's URL with --endpoint",
        ) from None


def fetch_status(endpoint: str, timeout_s: float = 5.0) -> FleetStatus:
    """Read ``/workers`` and ``/metrics`` of the frontend at ``endpoint`` (``http://host:port``)."""
    base = endpoint.rstrip("/")
    try:
        workers_doc = json.loads(_get(base + "/workers", timeout_s))
    except json.JSONDecodeError:
        raise ConfigError("--endpoint", f"{base}/workers is not JSON", "point it at a pdkit frontend") from None
    if not isinstance(workers_doc, dict) or "workers" not in workers_doc:
        raise ConfigError("--endpoint", f"{base}/workers is not a pdkit frontend's", "point it at a pdkit frontend")
    page = prom.families(_get(base + "/metrics", timeout_s))
    predicted = prom.by_label(page, "pdkit_kv_predicted_hit_tokens_total", "worker")
    actual = prom.by_label(page, "pdkit_kv_actual_hit_tokens_total", "worker")
    queried = prom.by_label(page, "pdkit_kv_actual_query_tokens_total", "worker")
    workers = []
    for w in workers_doc.get("workers", []):
        wid = str(w.get("worker_id"))
        load = w.get("load") or {}
        workers.append(
            WorkerStatus(
                worker_id=wid,
                role=str(w.get("role")),
                url=str(w.get("url")),
                model=str(w.get("model")),
                last_seen_s_ago=float(w.get("last_seen_s_ago") or 0.0),
                inflight=int(w.get("inflight") or 0),
                running=int(load.get("running") or 0),
                waiting=int(load.get("waiting") or 0),
                kv_usage=float(load.get("kv_usage") or 0.0),
                index_blocks={k: int(v) for k, v in (w.get("kv_index_blocks") or {}).items()},
                predicted_hit_tokens=predicted.get(wid, 0.0),
                actual_hit_tokens=actual.get(wid, 0.0),
                queried_tokens=queried.get(wid, 0.0),
            )
        )
    return FleetStatus(
        endpoint=base,
        mode=str(workers_doc.get("mode")),
        policy=str(workers_doc.get("policy")),
        workers=workers,
        requests=prom.by_label(page, "pdkit_requests_total", "status"),
        retries=prom.by_label(page, "pdkit_retries_total", "role", "reason"),
        fallbacks=prom.by_label(page, "pdkit_fallbacks_total", "reason"),
    )


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _tokens(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else f"{n:.0f}"


def render_status(st: FleetStatus) -> str:
    """The human view: a worker table, then request outcomes, retries and fallbacks."""
    out = [f"frontend {st.endpoint}  mode {st.mode}  policy {st.policy}  workers {len(st.workers)}"]
    if not st.workers:
        out.append("no worker is registered: start them (`pdkit launch ...` or `pdkit worker ...`) and see their logs")
    else:
        rows = []
        for w in sorted(st.workers, key=lambda w: (w.role, w.worker_id)):
            blocks = w.index_blocks
            cached = "/".join(str(blocks.get(t, 0)) for t in ("GPU", "CPU", "DISK")) if blocks else "-"
            hit_rate = f"{w.actual_hit_tokens / w.queried_tokens:.0%}" if w.queried_tokens else "-"
            err = w.prediction_error
            rows.append([
                w.worker_id, w.role, w.url, f"{w.last_seen_s_ago:.1f}s", str(w.inflight),
                f"{w.running}/{w.waiting}", f"{w.kv_usage:.0%}", cached, hit_rate,
                f"{_tokens(w.predicted_hit_tokens)}/{_tokens(w.actual_hit_tokens)}",
                f"{err:.1%}" if err is not None else "-",
            ])  # fmt: skip
        header = ["worker", "role", "url", "seen", "inflight", "run/wait", "kv", "index GPU/CPU/DISK",
                  "hit rate", "hits pred/actual", "pred err"]  # fmt: skip
        out.append(_table(header, rows))
    if st.requests:
        out.append("requests: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(st.requests.items())))
    if st.retries:
        out.append("retries: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(st.retries.items())))
    if st.fallbacks:
        out.append("local-prefill fallbacks: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(st.fallbacks.items())))
    return "\n".join(out)
