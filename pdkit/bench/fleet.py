"""Fleet simulation on one machine: a real pdkit Frontend and N simulated prefill/decode workers, one
multi-turn shared-prefix workload, replayed once per routing policy (issue 6 item 6, issue 7 item 4).

Why this shape:

* The frontend, the simulators and the KV events are the real code (HTTP, ZMQ registry, ZMQ KV events
  in vLLM's wire format); only the GPU is modelled (``pdkit/sim/latency.py``, calibrated on an H200),
  and ``--time-scale`` shrinks every modelled duration.  All times in the tables are *simulated*:
  wall-clock measurements divided by the time scale.
* The workers run in a child process and the frontend plus the load generator in this one, so the
  2 cores of a small machine both work.  A CPU-bound event loop delays every request by its backlog, and
  that delay is divided by the time scale too (it is *amplified* in simulated time); each run therefore
  reports the CPU use of both processes and the event-loop lag (how late a 10 ms timer fires).  When the
  lag is not small against the TTFT the results are distorted: use a larger ``--time-scale``.
* The workload is generated once (seeded) and replayed for every policy: sessions start as a Poisson
  process; each picks one of a few long shared system prompts and runs several turns (user message ->
  streamed answer -> think time -> next turn with the whole history), so successive turns share a
  growing prefix.  The KV capacity of each worker is small enough that the caches fill and evict within
  a run.
* Prefix-hit rates come from the simulators' own ``vllm:prefix_cache_hits`` / ``queries`` counters.

Run ``pdkit bench-fleet --help`` (``python scripts/simulate.py`` is the same); results go to ``--out`` as
JSON plus PNG plots.  In the package (not only a script) so the worker process, started with ``spawn``,
imports this module by its name like any other, and the tests import it without touching ``sys.path``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

from pdkit.bench.client import RequestRecord, send_streaming

POLICIES = ("round_robin", "least_loaded", "kv_aware")


# ------------------------------------------------------------------------------------------ workload


@dataclass
class Turn:
    user: str
    max_tokens: int
    think_s: float  # simulated seconds after the previous answer before this turn is sent


@dataclass
class Session:
    start_s: float  # simulated seconds from the run's start
    system: int
    turns: list[Turn]


@dataclass
class Workload:
    systems: list[str]
    sessions: list[Session]

    @property
    def num_requests(self) -> int:
        return sum(len(s.turns) for s in self.sessions)


@dataclass
class WorkloadSpec:
    """Shapes in tokens and simulated seconds."""

    session_rate: float = 1.0  # Poisson session starts per simulated second
    duration_s: float = 60.0  # sessions start within this window
    num_systems: int = 6
    system_tokens: int = 1000
    turns_min: int = 3
    turns_max: int = 8
    user_tokens_mean: float = 120.0
    doc_tokens_mean: float = 0.0  # per-session context in the first user turn (a pasted document); 0: none
    output_tokens_mean: float = 60.0
    think_s_mean: float = 2.0
    seed: int = 0


def lognormal_int(rng: random.Random, mean: float, sigma: float = 0.5, lo: int = 4) -> int:
    mu = math.log(mean) - sigma**2 / 2  # so that the mean is ``mean``
    return max(lo, int(rng.lognormvariate(mu, sigma)))


def make_workload(spec: WorkloadSpec) -> Workload:
    from pdkit.bench.prompts import PromptFactory

    rng = random.Random(spec.seed)
    text = PromptFactory(seed=spec.seed)
    systems = [text.random_text(spec.system_tokens) for _ in range(spec.num_systems)]
    sessions: list[Session] = []
    t = 0.0
    while True:
        t += rng.expovariate(spec.session_rate)
        if t > spec.duration_s:
            break
        n = rng.randint(spec.turns_min, spec.turns_max)
        doc = text.random_text(lognormal_int(rng, spec.doc_tokens_mean, 0.4)) + "\n\n" if spec.doc_tokens_mean else ""
        turns = [
            Turn(
                user=(doc if i == 0 else "") + text.random_text(lognormal_int(rng, spec.user_tokens_mean)),
                max_tokens=lognormal_int(rng, spec.output_tokens_mean),
                think_s=rng.expovariate(1 / spec.think_s_mean) if i else 0.0,
            )
            for i in range(n)
        ]
        sessions.append(Session(t, rng.randrange(spec.num_systems), turns))
    return Workload(systems, sessions)


# --------------------------------------------------------------------------------- worker process


@dataclass
class FleetSpec:
    prefill: int = 4
    decode: int = 8
    kv_capacity_blocks: int = 6000
    time_scale: float = 0.5
    hash_seed: str = "0"
    heartbeat_s: float = 0.25


def _worker_main(fleet: FleetSpec, zmq_endpoint: str, kv_endpoint: str, conn: Any) -> None:
    """Child process: start the simulated workers, register them, report their counters at the end."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_workers(fleet, zmq_endpoint, kv_endpoint, conn))


async def _workers(fleet: FleetSpec, zmq_endpoint: str, kv_endpoint: str, conn: Any) -> None:
    from pdkit.frontend.testing import announce
    from pdkit.protocol import Load
    from pdkit.sim.server import SimWorker
    from pdkit.sim.settings import SimSettings

    sims: dict[str, SimWorker] = {}
    for role, n in (("prefill", fleet.prefill), ("decode", fleet.decode)):
        for i in range(n):
            wid = f"{role}-{i}"
            sims[wid] = SimWorker(
                SimSettings(
                    role=role,  # type: ignore[arg-type]
                    time_scale=fleet.time_scale,
                    hash_seed=fleet.hash_seed,
                    kv_capacity_blocks=fleet.kv_capacity_blocks,
                    kv_events_endpoint=kv_endpoint,
                    kv_events_bind=False,
                    kv_events_replay_endpoint="tcp://127.0.0.1:0",
                    kv_events_topic=wid,
                )
            )
            await sims[wid].start()
    clients = {}
    for wid, w in sims.items():
        clients[wid] = await announce(
            zmq_endpoint, w.url, w.settings.role, wid, interval_s=fleet.heartbeat_s,
            kv_events_topic=wid, kv_events_replay_endpoint=w.kv_events_replay_endpoint,
        )  # fmt: skip

    async def loads() -> None:  # what the agent would scrape from /metrics, read directly
        while True:
            for wid, w in sims.items():
                e = w.engine
                assert e is not None
                waiting = len(e.waiting) + len(e.ready) + len(e.remote_wait)
                clients[wid].load = Load(running=len(e.running), waiting=waiting, kv_usage=e.pool.usage)
            await asyncio.sleep(fleet.heartbeat_s / 2)

    lag = LoopLag()
    tasks = [asyncio.create_task(loads()), asyncio.create_task(lag.run())]
    cpu0 = time.process_time()
    conn.send({wid: w.url for wid, w in sims.items()})
    await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # "stop"
    cpu = time.process_time() - cpu0
    for t in tasks:
        t.cancel()
    counters = {wid: sim_counters(w) for wid, w in sims.items()}
    conn.send({"counters": counters, "cpu_s": cpu, "loop_lag_ms": lag.summary()})
    for c in clients.values():
        await c.close()
    for w in sims.values():
        await w.stop()


def sim_counters(w: Any) -> dict[str, float]:
    from pdkit import prom

    want = {
        "vllm:prefix_cache_hits_total": "hits",
        "vllm:prefix_cache_queries_total": "queries",
        "vllm:prompt_tokens_total": "prompt_tokens",
        "vllm:generation_tokens_total": "generation_tokens",
        "vllm:num_preemptions_total": "preemptions",
        "vllm:request_success_total": "requests",
    }
    out = {want[name]: v for name, v in prom.totals(w.metrics.render().decode(), want).items()}
    e = w.engine
    out["cached_blocks"] = float(e.pool.num_cached_blocks) if e is not None else 0.0
    return out


class LoopLag:
    """How late a 10 ms timer fires: the event loop's backlog, i.e. what CPU saturation adds to latency."""

    def __init__(self) -> None:
        self.samples: list[float] = []

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(0.01)
            self.samples.append((loop.time() - t - 0.01) * 1e3)

    def summary(self) -> dict[str, float]:
        return {"p50": pct(self.samples, 50), "p99": pct(self.samples, 99), "max": max(self.samples, default=0.0)}


def pct(xs: list[float], q: float) -> float:
    """pdkit's percentile (:func:`pdkit.bench.stats.percentile`, interpolating); NaN when there are none."""
    from pdkit.bench.stats import percentile

    p = percentile(xs, q)
    return float("nan") if p is None else p


# ------------------------------------------------------------------------------------ one run


SESSION_TURN_TIMEOUT_S = 3600.0  # one turn at most (wall): the fleet run measures, it never gives up early


async def run_session(
    http: Any, url: str, wl: Workload, idx: int, scale: float, t0: float, out: list[RequestRecord]
) -> None:
    """One conversation, turn after turn, through pdkit's bench client (:func:`pdkit.bench.client.
    send_streaming`: the same token clock and failure codes as ``pdkit bench``); each turn's times are
    turned from wall into simulated seconds.  A failed turn ends the session (counted as not ok)."""
    s = wl.sessions[idx]
    per = scale or 1.0  # wall -> simulated seconds (time scale 0: no modelled time, report wall time)
    await asyncio.sleep(max(0.0, t0 + s.start_s * scale - time.perf_counter()))
    messages: list[dict[str, str]] = [{"role": "system", "content": wl.systems[s.system]}]
    for ti, turn in enumerate(s.turns):
        if turn.think_s:
            await asyncio.sleep(turn.think_s * scale)
        messages.append({"role": "user", "content": turn.user})
        body = {"model": "synth", "messages": list(messages), "max_tokens": turn.max_tokens}
        r = RequestRecord(f"s{idx}-t{ti}", tags={"session": idx, "turn": ti})
        await send_streaming(http, url + "/v1/chat/completions", body, r, SESSION_TURN_TIMEOUT_S, t0)
        r.ttft_s = None if r.ttft_s is None else r.ttft_s / per
        r.e2e_s = None if r.e2e_s is None else r.e2e_s / per
        r.itl_s = [x / per for x in r.itl_s]
        out.append(r)
        if not r.ok:
            return
        messages.append({"role": "assistant", "content": r.text})


async def run_policy(policy: str, fleet: FleetSpec, wl: Workload, disagg_min: int) -> dict[str, Any]:
    import aiohttp

    from pdkit.frontend import Frontend, FrontendSettings

    fe = Frontend(
        FrontendSettings(
            port=0, zmq_port=0, kv_events_port=0, kv_events_shared_sub=True, mode="disagg", policy=policy,
            hash_seed=fleet.hash_seed,
            heartbeat_interval_s=fleet.heartbeat_s, disagg_min_prompt_tokens=disagg_min,
            max_inflight_per_worker=4096, prefill_timeout_s=600,
        )
    )  # fmt: skip
    await fe.start()
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    assert fe.kv_events_endpoint is not None
    proc = ctx.Process(target=_worker_main, args=(fleet, fe.zmq_endpoint, fe.kv_events_endpoint, child))
    proc.start()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, parent.recv)  # workers registered
    n_workers = fleet.prefill + fleet.decode
    while len(fe.registry.workers) < n_workers:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    results: list[RequestRecord] = []
    lag = LoopLag()
    lag_task = asyncio.create_task(lag.run())
    connector = aiohttp.TCPConnector(limit=0)
    cpu0, t0 = time.process_time(), time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as http:
        await asyncio.gather(
            *(run_session(http, fe.url, wl, i, fleet.time_scale, t0, results) for i in range(len(wl.sessions)))
        )
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    lag_task.cancel()
    parent.send("stop")
    child_report = await loop.run_in_executor(None, parent.recv)
    text = fe.metrics.render().decode()
    await fe.stop(grace_s=1)
    proc.join(timeout=30)
    return summarize(policy, fleet, wl, results, wall, cpu, lag.summary(), child_report, text)


def summarize(
    policy: str, fleet: FleetSpec, wl: Workload, results: list[RequestRecord], wall: float, cpu: float,
    lag: dict[str, float], child: dict[str, Any], fe_metrics: str,
) -> dict[str, Any]:  # fmt: skip
    from pdkit import prom

    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None]
    itl = [x * 1e3 for r in ok for x in r.itl_s]
    counters: dict[str, dict[str, float]] = child["counters"]

    def role_sum(role: str, key: str) -> float:
        return sum(c[key] for wid, c in counters.items() if wid.startswith(role))

    def rate(role: str) -> float:
        q = role_sum(role, "queries")
        return role_sum(role, "hits") / q if q else 0.0

    sim_wall = wall / (fleet.time_scale or 1.0)
    predicted = prom.total(fe_metrics, "pdkit_kv_predicted_hit_tokens_total")
    return {
        "policy": policy,
        "requests": len(results),
        "ok": len(ok),
        "ttft_ms": {
            "p50": pct(ttft, 50),
            "p90": pct(ttft, 90),
            "p99": pct(ttft, 99),
            "mean": statistics.fmean(ttft) if ttft else float("nan"),
        },  # fmt: skip
        "itl_ms": {"p50": pct(itl, 50), "p99": pct(itl, 99)},
        "e2e_ms_p50": pct([r.e2e_s * 1e3 for r in ok if r.e2e_s is not None], 50),
        "throughput_req_s": len(ok) / sim_wall,
        "throughput_out_tok_s": sum(r.output_tokens for r in ok) / sim_wall,
        "prefix_hit_rate": {"prefill": rate("prefill"), "decode": rate("decode")},
        "prefill_prompt_tokens": role_sum("prefill", "queries"),
        "prefill_hit_tokens": role_sum("prefill", "hits"),
        "predicted_hit_tokens": predicted,
        "actual_hit_tokens": role_sum("prefill", "hits") + role_sum("decode", "hits"),
        "preemptions": role_sum("prefill", "preemptions") + role_sum("decode", "preemptions"),
        "direct_cached_requests": prom.total(fe_metrics, "pdkit_requests_total", mode="direct_cached"),
        "wall_s": wall,
        "simulated_s": sim_wall,
        "cpu": {"frontend_and_client": cpu / wall, "workers": child["cpu_s"] / wall},
        "loop_lag_ms": {"frontend_and_client": lag, "workers": child["loop_lag_ms"]},
        "per_worker": counters,
        "ttft_samples_ms": ttft,
    }


# ----------------------------------------------------------------------------------- reporting


def table(runs: list[dict[str, Any]]) -> str:
    head = (
        "| policy | req ok | TTFT p50 / p90 / p99 (ms) | ITL p50 / p99 (ms) | req/s | out tok/s | "
        "prefix hits prefill / decode | CPU fe+client / workers | loop lag p99 fe / workers (ms wall) |"
    )
    lines = [head, "|" + " --- |" * 9]
    for r in runs:
        t, i, h, c, lag = r["ttft_ms"], r["itl_ms"], r["prefix_hit_rate"], r["cpu"], r["loop_lag_ms"]
        lines.append(
            f"| {r['policy']} | {r['ok']}/{r['requests']} | {t['p50']:.0f} / {t['p90']:.0f} / {t['p99']:.0f} | "
            f"{i['p50']:.1f} / {i['p99']:.1f} | {r['throughput_req_s']:.1f} | {r['throughput_out_tok_s']:.0f} | "
            f"{h['prefill']:.1%} / {h['decode']:.1%} | {c['frontend_and_client']:.0%} / {c['workers']:.0%} | "
            f"{lag['frontend_and_client']['p99']:.1f} / {lag['workers']['p99']:.1f} |"
        )
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    names = [r["policy"] for r in runs]
    for r in runs:
        xs = sorted(r["ttft_samples_ms"])
        axes[0].plot(xs, [(k + 1) / len(xs) for k in range(len(xs))], label=r["policy"])
    axes[0].set_xscale("log")
    axes[0].set_xlabel("TTFT (simulated ms)")
    axes[0].set_ylabel("CDF")
    axes[0].legend()
    w = 0.25
    for j, q in enumerate(("p50", "p90", "p99")):
        axes[1].bar([k + (j - 1) * w for k in range(len(runs))], [r["ttft_ms"][q] for r in runs], w, label=q)
    axes[1].set_xticks(range(len(runs)), names)
    axes[1].set_ylabel("TTFT (simulated ms)")
    axes[1].legend()
    axes[2].bar([k - w / 2 for k in range(len(runs))], [r["prefix_hit_rate"]["prefill"] for r in runs], w,
                label="prefill workers")  # fmt: skip
    axes[2].bar([k + w / 2 for k in range(len(runs))], [r["prefix_hit_rate"]["decode"] for r in runs], w,
                label="decode workers")  # fmt: skip
    axes[2].set_xticks(range(len(runs)), names)
    axes[2].set_ylabel("prefix-cache hit rate (tokens)")
    axes[2].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag or value is one line and exit code 2, like the rest of pdkit's CLI."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"pdkit bench-fleet: error: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    ap = _OneLineParser(
        prog="pdkit bench-fleet", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--fleet", default="4x8", help="PxD, e.g. 4x8 or 8x16 (several: comma-separated)")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--time-scale", type=float, default=0.5)
    ap.add_argument("--kv-capacity-blocks", type=int, default=6000)
    ap.add_argument("--session-rate", type=float, default=1.0, help="sessions per simulated second (4P/8D; scaled "
                    "with the fleet size)")  # fmt: skip
    ap.add_argument("--duration-s", type=float, default=60.0, help="simulated seconds during which sessions start")
    ap.add_argument("--num-systems", type=int, default=6)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--turns", default="3-8")
    ap.add_argument("--user-tokens", type=float, default=120.0)
    ap.add_argument("--doc-tokens", type=float, default=0.0, help="mean per-session context in the first turn")
    ap.add_argument("--output-tokens", type=float, default=60.0)
    ap.add_argument("--think-s", type=float, default=2.0)
    ap.add_argument("--disagg-min-prompt-tokens", type=int, default=0)
    ap.add_argument("--hash-seed", default="0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("docs/results/fleet-sim"))
    ap.add_argument("--tag", default="", help="file name suffix")
    ap.add_argument("--no-plot", action="store_true")
    a = ap.parse_args(argv)
    os.environ.setdefault("PYTHONHASHSEED", a.hash_seed)
    lo, hi = (int(x) for x in a.turns.split("-"))
    a.out.mkdir(parents=True, exist_ok=True)
    for fleet_s in a.fleet.split(","):
        p, d = (int(x) for x in fleet_s.split("x"))
        factor = p / 4
        spec = WorkloadSpec(
            session_rate=a.session_rate * factor, duration_s=a.duration_s, num_systems=a.num_systems,
            system_tokens=a.system_tokens, turns_min=lo, turns_max=hi, user_tokens_mean=a.user_tokens,
            output_tokens_mean=a.output_tokens, think_s_mean=a.think_s, seed=a.seed, doc_tokens_mean=a.doc_tokens,
        )  # fmt: skip
        wl = make_workload(spec)
        fleet = FleetSpec(prefill=p, decode=d, kv_capacity_blocks=a.kv_capacity_blocks, time_scale=a.time_scale,
                          hash_seed=a.hash_seed)  # fmt: skip
        print(f"{p}P/{d}D: {len(wl.sessions)} sessions, {wl.num_requests} requests", file=sys.stderr, flush=True)
        runs = []
        for policy in a.policies.split(","):
            r = asyncio.run(run_policy(policy, fleet, wl, a.disagg_min_prompt_tokens))
            hits = r["prefix_hit_rate"]["prefill"]
            print(f"  {policy}: TTFT p50 {r['ttft_ms']['p50']:.0f} ms, prefill hits {hits:.1%}, "
                  f"wall {r['wall_s']:.0f} s, CPU {r['cpu']}", file=sys.stderr, flush=True)  # fmt: skip
            runs.append(r)
        name = f"fleet-{p}p{d}d{a.tag}"
        title = f"{p}P/{d}D, {wl.num_requests} chat turns, time scale {a.time_scale}"
        report = {"fleet": asdict(fleet), "workload": asdict(spec), "num_sessions": len(wl.sessions),
                  "num_requests": wl.num_requests, "command": " ".join(sys.argv), "runs": runs}  # fmt: skip
        (a.out / f"{name}.json").write_text(json.dumps(report, indent=1))
        if not a.no_plot:
            plot(runs, a.out / f"{name}.png", title)
        print(f"\n{title}\n{table(runs)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
