"""Latency statistics and goodput over :class:`~pdkit.bench.client.RequestRecord` lists.

Definitions (kept identical everywhere so runs compare):

* TTFT: request sent -> first streamed chunk that carries a token.
* ITL: the gap between two consecutive token-carrying chunks, pooled over all successful requests
  (so long requests weigh more, as they do for a user watching the stream).
* TPOT: per request ``(e2e - ttft) / (output_tokens - 1)``; requests with one token have none.
* Goodput: successful requests whose TTFT <= ``ttft_s`` and whose per-request ITL statistic
  (``itl_stat``: p99 by default, so one stall caused by another request's prefill counts) <= ``itl_s``,
  divided by the measurement window.  A failed request is never good.
* Window: first request sent -> last request finished, so throughput includes the drain.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from pdkit.bench.client import RequestRecord

PERCENTILES = (50, 90, 99)
ItlStat = Literal["p99", "p90", "p50", "mean", "max"]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile with linear interpolation between ranks (numpy's default); None if empty."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def distribution(values: Sequence[float]) -> dict[str, float | int | None]:
    """``{count, mean, min, max, p50, p90, p99}`` (seconds in, seconds out)."""
    out: dict[str, float | int | None] = {"count": len(values)}
    out["mean"] = sum(values) / len(values) if values else None
    out["min"] = min(values) if values else None
    out["max"] = max(values) if values else None
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(values, q)
    return out


@dataclass(frozen=True)
class Slo:
    """Latency objectives a request must meet to count towards goodput."""

    ttft_s: float = 2.0
    itl_s: float = 0.025
    itl_stat: ItlStat = "p99"

    def request_itl(self, itls: Sequence[float]) -> float | None:
        """The per-request ITL figure compared with ``itl_s`` (None: fewer than two tokens)."""
        if not itls:
            return None
        if self.itl_stat == "mean":
            return sum(itls) / len(itls)
        if self.itl_stat == "max":
            return max(itls)
        return percentile(itls, float(self.itl_stat[1:]))

    def is_good(self, rec: RequestRecord) -> bool:
        if not rec.ok or rec.ttft_s is None or rec.ttft_s > self.ttft_s:
            return False
        itl = self.request_itl(rec.itl_s)
        return itl is None or itl <= self.itl_s


def tpot(rec: RequestRecord) -> float | None:
    """Time per output token after the first, or None for a failed or one-token request."""
    if not rec.ok or rec.ttft_s is None or rec.e2e_s is None or rec.output_tokens < 2:
        return None
    return (rec.e2e_s - rec.ttft_s) / (rec.output_tokens - 1)


def window(records: Iterable[RequestRecord]) -> float:
    """Seconds from the first request sent to the last one finished (0 when nothing ran)."""
    starts, ends = [], []
    for r in records:
        starts.append(r.start_s)
        ends.append(r.start_s + (r.e2e_s if r.e2e_s is not None else r.elapsed_s))
    return max(ends) - min(starts) if starts else 0.0


def summarize(records: Sequence[RequestRecord], slo: Slo, duration_s: float | None = None) -> dict[str, Any]:
    """Everything a results table needs, from per-request records (failed ones included)."""
    ok = [r for r in records if r.ok]
    dur = window(records) if duration_s is None else duration_s
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    itls = [g for r in ok for g in r.itl_s]
    tpots = [t for t in (tpot(r) for r in ok) if t is not None]
    e2es = [r.e2e_s for r in ok if r.e2e_s is not None]
    out_tok = sum(r.output_tokens for r in ok)
    in_tok = sum(r.prompt_tokens or 0 for r in ok)
    good = sum(1 for r in records if slo.is_good(r))
    errors = Counter(r.error or "unknown" for r in records if not r.ok)

    def rate(x: float) -> float | None:
        return x / dur if dur > 0 else None

    return {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": dict(sorted(errors.items())),
        "duration_s": dur,
        "request_throughput_rps": rate(len(ok)),
        "output_token_throughput_tps": rate(out_tok),
        "input_token_throughput_tps": rate(in_tok),
        "total_token_throughput_tps": rate(out_tok + in_tok),
        "output_tokens": out_tok,
        "input_tokens": in_tok,
        "prompt_len_mismatches": sum(
            1 for r in ok if r.prompt_tokens is not None and r.expected_prompt_tokens not in (None, r.prompt_tokens)
        ),
        "ttft_s": distribution(ttfts),
        "itl_s": distribution(itls),
        "tpot_s": distribution(tpots),
        "e2e_s": distribution(e2es),
        "goodput": {
            "slo": asdict(slo),
            "good_requests": good,
            "good_fraction": good / len(records) if records else None,
            "goodput_rps": rate(good),
        },
    }
