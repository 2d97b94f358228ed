"""One benchmark run: settings in, result dict (and files) out.  The CLI is a thin layer over this.

Why prompts are built before each point: tokenizing hundreds of 8k prompts takes seconds of CPU, which
inside the event loop would delay sends and stretch the measured latencies.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import aiohttp

from pdkit.bench import report
from pdkit.bench.prompts import PromptFactory
from pdkit.bench.stats import ItlStat, Slo, summarize
from pdkit.bench.worker_metrics import scrape_all, worker_report
from pdkit.bench.workloads import Api, RequestSpec, Runner, RunnerSettings
from pdkit.flags import Flag

Workload = Literal["sweep", "multiturn", "repeat"]


def _shape(value: str) -> tuple[int, int]:
    parts = value.lower().replace(":", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--shape {value!r}: write INPUTxOUTPUT tokens, e.g. 8192x256")
    return int(parts[0]), int(parts[1])


def _shapes(values: list[str]) -> list[tuple[int, int]]:
    return [_shape(v) for v in values]


def _rates(values: list[str]) -> list[float]:
    out: list[float] = []
    for v in values:
        for part in v.split(","):
            part = part.strip()
            if part:
                out.append(math.inf if part in ("inf", "max") else float(part))
    return out


def _json_object(value: str) -> dict[str, Any]:
    obj = json.loads(value)
    if not isinstance(obj, dict):
        raise ValueError("--extra-body must be a JSON object")
    return obj


# result JSON "settings": the config's fields but these (the SLO goes in as one "slo" object, as before)
_NOT_IN_SETTINGS = ("argv", "slo_ttft_s", "slo_itl_s", "slo_itl_stat")
_LIST = list[str] | None  # a repeatable flag; None (not given) leaves the field's default


@dataclass
class BenchConfig:
    """Everything ``pdkit bench`` accepts: each field's flag, help and default are declared here once
    (``pdkit.flags``: the command's options are derived from them; docs/benchmarks.md)."""

    endpoint: Annotated[str, Flag("--endpoint", "Base URL of the frontend or engine.")] = "http://127.0.0.1:8000"
    workload: Annotated[Workload, Flag("--workload", "sweep | multiturn | repeat.", cli_type=str)] = "sweep"
    label: Annotated[str | None, Flag("--label", "Name of this run in files and plots (agg, disagg).")] = None
    model: Annotated[str | None, Flag("--model", "Served model name (default: first of /v1/models).")] = None
    api: Annotated[Api, Flag("--api", "completions | chat.", cli_type=str)] = "completions"
    shapes: Annotated[
        list[tuple[int, int]],
        Flag("--shape", "INPUTxOUTPUT tokens, repeatable (default 8192x256).", cli_type=_LIST, cli_default=None,
             parse=_shapes),
    ] = field(default_factory=lambda: [(8192, 256)])  # fmt: skip
    rates: Annotated[
        list[float],
        Flag("--rate", "Poisson rates in req/s, comma list or repeated; inf = burst.", cli_type=_LIST,
             cli_default=None, parse=_rates),
    ] = field(default_factory=lambda: [1.0])  # fmt: skip
    num_requests: Annotated[int, Flag("--num-requests", "Requests per sweep point.")] = 100
    max_duration_s: Annotated[float, Flag("--max-duration", "Seconds to issue requests per point.")] = 300.0
    timeout_s: Annotated[float, Flag("--timeout", "Per-request limit, seconds (then: failed).")] = 600.0
    max_concurrency: Annotated[int | None, Flag("--max-concurrency", "Cap on requests in flight (default none).")] = (
        None
    )
    warmup: Annotated[int, Flag("--warmup", "Unrecorded requests before each shape.")] = 2
    seed: Annotated[int | None, Flag("--seed", "Prompt/arrival seed (default random, recorded).")] = None
    slo_ttft_s: Annotated[float, Flag("--slo-ttft", "Goodput TTFT limit, seconds.")] = Slo.ttft_s
    slo_itl_s: Annotated[float, Flag("--slo-itl", "Goodput ITL limit, seconds.")] = Slo.itl_s
    slo_itl_stat: Annotated[
        ItlStat, Flag("--slo-itl-stat", "Per-request ITL figure held to --slo-itl: p99|p90|p50|mean|max.", cli_type=str)
    ] = Slo.itl_stat
    tokenizer: Annotated[
        str | None, Flag("--tokenizer", "Model folder or tokenizer.json (default: embedded model).")
    ] = None
    # multiturn
    sessions: Annotated[int, Flag("--sessions", "multiturn: conversations.")] = 16
    turns: Annotated[int, Flag("--turns", "multiturn: turns per conversation.")] = 4
    system_len: Annotated[int, Flag("--system-len", "multiturn: shared system prefix tokens.")] = 2048
    user_len: Annotated[int, Flag("--user-len", "multiturn: tokens per user turn.")] = 256
    turn_output_len: Annotated[int, Flag("--turn-output-len", "multiturn: answer tokens.")] = 128
    think_time_s: Annotated[float, Flag("--think-time", "multiturn: seconds between turns.")] = 0.0
    # repeat
    num_prefixes: Annotated[int, Flag("--num-prefixes", "repeat: distinct prefixes.")] = 8
    repeats: Annotated[int, Flag("--repeats", "repeat: passes (1 cold + N-1 warm).")] = 2
    repeat_input_len: Annotated[int, Flag("--repeat-input-len", "repeat: prompt tokens.")] = 8192
    repeat_output_len: Annotated[int, Flag("--repeat-output-len", "repeat: output tokens.")] = 16
    repeat_suffix_len: Annotated[
        int, Flag("--repeat-suffix-len", "repeat: fresh tokens after the prefix per request.")
    ] = 0
    repeat_concurrency: Annotated[int, Flag("--repeat-concurrency", "repeat: in flight.")] = 1
    # metrics and output
    metrics_urls: Annotated[
        list[str],
        Flag("--metrics-url", "Engine /metrics URL for NIXL stats, repeatable.", cli_type=_LIST, cli_default=None),
    ] = field(default_factory=list)
    discover_workers: Annotated[
        bool, Flag("--discover-workers/--no-discover-workers", "Scrape workers listed by /workers.")
    ] = True
    link_json: Annotated[Path | None, Flag("--link-json", "scripts/link_bandwidth.py result: NIXL vs link peak.")] = (
        None
    )
    out_dir: Annotated[Path, Flag("--out-dir", "Folder for JSON and PNG files.")] = Path("bench-results")
    output: Annotated[Path | None, Flag("--output", "JSON file (default: OUT_DIR/LABEL-...).")] = None
    plots: Annotated[bool, Flag("--plots/--no-plots", "Write PNG plots (matplotlib).")] = True
    progress: Annotated[bool, Flag("--progress/--no-progress", "Show a progress bar.")] = True
    save_requests: Annotated[bool, Flag("--save-requests/--no-save-requests", "Per-request rows in the JSON.")] = True
    ignore_eos: Annotated[
        bool, Flag("--ignore-eos/--no-ignore-eos", "Send ignore_eos so outputs have fixed length.")
    ] = True
    extra_body: Annotated[
        dict[str, Any],
        Flag("--extra-body", "JSON merged into every request.", cli_type=str | None, cli_default=None,
             parse=_json_object),
    ] = field(default_factory=dict)  # fmt: skip
    argv: list[str] | None = None  # the command line, recorded in the result (set by the CLI)

    @property
    def slo(self) -> Slo:
        """The goodput objectives (three flags, one object for the statistics)."""
        return Slo(self.slo_ttft_s, self.slo_itl_s, self.slo_itl_stat)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad option."""
        if self.workload not in ("sweep", "multiturn", "repeat"):
            raise ValueError(f"--workload {self.workload!r}: use sweep, multiturn or repeat")
        if self.api not in ("completions", "chat"):
            raise ValueError(f"--api {self.api!r}: use completions or chat")
        if not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(f"--endpoint must be an http(s) URL, got {self.endpoint!r}")
        if self.workload == "sweep" and (not self.shapes or not self.rates):
            raise ValueError("--shape and --rate need at least one value each for the sweep workload")
        for i, o in self.shapes:
            if i < 2 or o < 1:
                raise ValueError(f"--shape {i}x{o}: input must be >= 2 tokens and output >= 1")
        if any(r <= 0 or math.isnan(r) for r in self.rates):
            raise ValueError("--rate values must be positive (use inf for all at once)")
        if self.num_requests < 1 or self.max_duration_s <= 0 or self.timeout_s <= 0:
            raise ValueError("--num-requests, --max-duration and --timeout must be positive")
        if self.repeats < 2 and self.workload == "repeat":
            raise ValueError("--repeats must be >= 2 (one cold pass and at least one warm pass)")
        if self.repeat_suffix_len >= self.repeat_input_len:
            raise ValueError("--repeat-suffix-len must be shorter than --repeat-input-len")
        if self.slo.itl_stat not in ("p99", "p90", "p50", "mean", "max"):
            raise ValueError("--slo-itl-stat must be one of p99, p90, p50, mean, max")


async def _get_json(session: aiohttp.ClientSession, url: str) -> Any:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as r:
            return await r.json(content_type=None) if r.status == 200 else None
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
        return None


async def server_info(session: aiohttp.ClientSession, endpoint: str) -> dict[str, Any]:
    """What the endpoint says about itself: models, version, and (pdkit frontend) its workers."""
    base = endpoint.rstrip("/")
    models = await _get_json(session, base + "/v1/models")
    return {
        "endpoint": base,
        "models": [m.get("id") for m in (models or {}).get("data", [])] if isinstance(models, dict) else None,
        "version": await _get_json(session, base + "/version"),
        "workers": await _get_json(session, base + "/workers"),
    }


def worker_metrics_urls(cfg: BenchConfig, info: dict[str, Any]) -> list[str]:
    urls = list(cfg.metrics_urls)
    workers = info.get("workers")
    if cfg.discover_workers and isinstance(workers, dict):
        for w in workers.get("workers", []):
            url = str(w.get("url", "")).rstrip("/")
            if url and url + "/metrics" not in urls:
                urls.append(url + "/metrics")
    return urls


def link_peak(path: Path | None) -> float | None:
    """``peak_gbps`` from a ``scripts/link_bandwidth.py`` result file."""
    if path is None:
        return None
    data = json.loads(Path(path).read_text())
    peak = data.get("peak_gbps")
    return float(peak) if peak else None


def _rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def _requests_json(cfg: BenchConfig, records: list[Any]) -> list[dict[str, Any]]:
    return [r.as_json() for r in sorted(records, key=lambda r: r.start_s)] if cfg.save_requests else []


def _rate_json(rate: float) -> dict[str, Any]:
    """A point's offered rate: the number (``None`` for a burst) and its label."""
    return {"rate": None if math.isinf(rate) else rate, "rate_label": _rate_label(rate)}


def _measured_json(
    cfg: BenchConfig, records: list[Any], summary: dict[str, Any], before: Any, after: Any, peak: float | None
) -> dict[str, Any]:
    """The closing keys of a rated point: the workers' metrics over it and its requests."""
    return {
        "worker_metrics": _workers_json(before, after, summary["completed"], peak),
        "requests": _requests_json(cfg, records),
    }


async def run_benchmark(cfg: BenchConfig) -> dict[str, Any]:
    """Run the configured workload; write the JSON (and plots); return the result dict."""
    cfg.validate()
    seed = cfg.seed if cfg.seed is not None else random.SystemRandom().randrange(2**31)
    started = report.now_iso()
    connector = aiohttp.TCPConnector(limit=cfg.max_concurrency or 0, limit_per_host=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        info = await server_info(session, cfg.endpoint)
        model = cfg.model or ((info.get("models") or [None])[0])
        if not model:
            raise ValueError(f"{cfg.endpoint}/v1/models lists no model; pass --model")
        prompts = PromptFactory(cfg.tokenizer, seed=seed)
        runner = Runner(
            RunnerSettings(
                endpoint=cfg.endpoint,
                model=model,
                api=cfg.api,
                timeout_s=cfg.timeout_s,
                max_concurrency=cfg.max_concurrency,
                ignore_eos=cfg.ignore_eos,
                extra_body=cfg.extra_body,
                progress=cfg.progress,
            ),
            session,
            prompts,
            seed,
        )
        murls = worker_metrics_urls(cfg, info)
        peak = link_peak(cfg.link_json)
        label = cfg.label or cfg.workload
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = cfg.output or cfg.out_dir / f"{report._safe(label)}-{cfg.workload}-{stamp}.json"
        points: list[dict[str, Any]] = []
        result: dict[str, Any] = {
            "schema": report.SCHEMA,
            "label": label,
            "workload": cfg.workload,
            "complete": False,
            "command": report.command_line(cfg.argv),
            "started_at": started,
            "finished_at": None,
            "environment": report.environment(),
            "server": info,
            "worker_metrics_urls": murls,
            "link_peak_gbps": peak,
            "settings": {
                **{
                    k: v for k, v in asdict(cfg).items() if k not in ("argv", "slo_ttft_s", "slo_itl_s", "slo_itl_stat")
                },
                "slo": asdict(cfg.slo),
                "seed": seed,
                "model": model,
                "rates": [_rate_label(r) for r in cfg.rates],
            },
            "points": points,
            "files": {"json": str(path), "plots": []},
        }

        def checkpoint(point: dict[str, Any]) -> None:
            """Write what is done after every point: an interrupted long run keeps its finished points."""
            points.append(point)
            report.write_json(result, path)

        if cfg.workload == "sweep":
            await _sweep(cfg, runner, session, murls, peak, checkpoint)
        elif cfg.workload == "multiturn":
            checkpoint(await _multiturn(cfg, runner, session, murls, peak))
        else:
            checkpoint(await _repeat(cfg, runner, session, murls, peak))
    result["complete"] = True
    result["finished_at"] = report.now_iso()
    if cfg.plots:
        prefix = path.stem + "-"
        result["files"]["plots"] = [str(p) for p in report.plot_results([result], path.parent, prefix)]
    report.write_json(result, path)
    return result


async def _measure(
    session: aiohttp.ClientSession, murls: list[str], coro: Any
) -> tuple[Any, dict[str, Any] | None, dict[str, Any] | None]:
    before = await scrape_all(session, murls) if murls else None
    res = await coro
    after = await scrape_all(session, murls) if murls else None
    return res, before, after


def _workers_json(before: Any, after: Any, ok: int, peak: float | None) -> dict[str, Any] | None:
    if before is None or after is None:
        return None
    return worker_report(before, after, ok or None, peak)


async def _warmup(cfg: BenchConfig, runner: Runner, input_len: int, output_len: int) -> None:
    if cfg.warmup <= 0:
        return
    specs = [runner.fixed_spec(input_len, output_len, {"warmup": True}) for _ in range(cfg.warmup)]
    await runner.run_arrivals(specs, math.inf, cfg.max_duration_s, f"warmup {input_len}x{output_len}")


async def _sweep(
    cfg: BenchConfig,
    runner: Runner,
    session: aiohttp.ClientSession,
    murls: list[str],
    peak: float | None,
    checkpoint: Callable[[dict[str, Any]], None],
) -> None:
    for input_len, output_len in cfg.shapes:
        shape = f"{input_len}x{output_len}"
        await _warmup(cfg, runner, input_len, output_len)
        for rate in cfg.rates:
            specs = [runner.fixed_spec(input_len, output_len, {}) for _ in range(cfg.num_requests)]
            name = f"{shape}@{_rate_label(rate)}"
            (records, arrivals), before, after = await _measure(
                session, murls, runner.run_arrivals(specs, rate, cfg.max_duration_s, name)
            )
            summary = summarize(records, cfg.slo)
            checkpoint(
                {
                    "name": name,
                    "shape_key": shape,
                    "shape": {"input_len": input_len, "output_len": output_len},
                    **_rate_json(rate),
                    "arrivals": arrivals,
                    "summary": summary,
                    **_measured_json(cfg, records, summary, before, after, peak),
                }
            )


async def _multiturn(
    cfg: BenchConfig, runner: Runner, session: aiohttp.ClientSession, murls: list[str], peak: float | None
) -> dict[str, Any]:
    system = runner.prompts.random_text(cfg.system_len).lstrip()
    rate = cfg.rates[0]
    t_stop = time.perf_counter() + cfg.max_duration_s  # no new turn after the point's time limit
    sessions = [
        runner.conversation(i, system, cfg.turns, cfg.user_len, cfg.turn_output_len, cfg.think_time_s, t_stop)
        for i in range(cfg.sessions)
    ]
    name = f"multiturn {cfg.sessions}x{cfg.turns} @{_rate_label(rate)} sess/s"
    (records, arrivals), before, after = await _measure(
        session, murls, runner.run_sessions(sessions, rate, cfg.max_duration_s, name, cfg.sessions * cfg.turns)
    )
    summary = summarize(records, cfg.slo)
    by_turn = {
        t: summarize(rs, cfg.slo) for t, rs in sorted(report.group_by(records, "turn").items(), key=lambda x: int(x[0]))
    }
    return {
        "name": name,
        **_rate_json(rate),
        "arrivals": {**arrivals, "turns_not_sent": cfg.sessions * cfg.turns - len(records)},
        "summary": summary,
        "by_turn": by_turn,
        **_measured_json(cfg, records, summary, before, after, peak),
    }


async def _repeat(
    cfg: BenchConfig, runner: Runner, session: aiohttp.ClientSession, murls: list[str], peak: float | None
) -> dict[str, Any]:
    prefix_len = cfg.repeat_input_len - cfg.repeat_suffix_len
    if cfg.api == "chat":
        prefixes = [runner.prompts.chat_user_message(prefix_len)["content"] for _ in range(cfg.num_prefixes)]
    else:
        prefixes = [runner.prompts.completion_prompt(prefix_len) for _ in range(cfg.num_prefixes)]
    runner.s.max_concurrency = cfg.repeat_concurrency
    phases: dict[str, Any] = {}
    workers: dict[str, Any] = {}
    all_records = []
    for rep in range(cfg.repeats):
        phase = "cold" if rep == 0 else "warm"
        specs: list[RequestSpec] = []
        for i, prefix in enumerate(prefixes):
            tags = {"phase": phase, "repeat": rep, "prefix": i}
            if cfg.repeat_suffix_len:
                specs.append(runner.fixed_spec(cfg.repeat_input_len, cfg.repeat_output_len, tags, prefix=prefix))
            else:
                payload: dict[str, Any] = (
                    {"messages": [{"role": "user", "content": prefix}]} if cfg.api == "chat" else {"prompt": prefix}
                )
                expected = runner.prompts.chat_len(payload["messages"]) if cfg.api == "chat" else cfg.repeat_input_len
                specs.append(RequestSpec(runner.next_id("rep"), payload, expected, cfg.repeat_output_len, tags))
        (records, _), before, after = await _measure(
            session, murls, runner.run_arrivals(specs, math.inf, cfg.max_duration_s, f"repeat pass {rep} ({phase})")
        )
        all_records.extend(records)
        ok = sum(1 for r in records if r.ok)
        workers[f"pass{rep}"] = _workers_json(before, after, ok, peak)
    for phase, recs in report.group_by(all_records, "phase").items():
        phases[phase] = summarize(recs, cfg.slo)
    cold, warm = phases.get("cold"), phases.get("warm")
    ratio: dict[str, float | None] = {}
    for stat in ("p50", "mean", "p90"):
        c = cold["ttft_s"][stat] if cold else None
        w = warm["ttft_s"][stat] if warm else None
        ratio[f"ttft_{stat}_warm_over_cold"] = (w / c) if c and w is not None else None
    return {
        "name": f"repeat {cfg.num_prefixes} prefixes x{cfg.repeats}",
        "rate": None,
        "rate_label": "sequential" if cfg.repeat_concurrency == 1 else f"concurrency {cfg.repeat_concurrency}",
        "shape": {
            "input_len": cfg.repeat_input_len,
            "output_len": cfg.repeat_output_len,
            "suffix_len": cfg.repeat_suffix_len,
        },
        "summary": summarize(all_records, cfg.slo),
        "phases": phases,
        "warm_vs_cold": ratio,
        "worker_metrics": workers,
        "requests": _requests_json(cfg, all_records),
    }
