"""``pdkit bench`` and ``pdkit bench-compare``: plain Typer-annotated functions the main CLI registers.

``scripts/bench_serving.py`` runs the same functions without the ``pdkit`` entry point.  Option errors
end as one line on stderr and exit code 2, like the rest of pdkit's CLI.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from pdkit.bench.stats import Slo


def _fail(msg: str) -> typer.Exit:
    typer.echo(f"pdkit bench: {msg}", err=True)
    return typer.Exit(2)


def _shape(value: str) -> tuple[int, int]:
    parts = value.lower().replace(":", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--shape {value!r}: write INPUTxOUTPUT tokens, e.g. 8192x256")
    return int(parts[0]), int(parts[1])


def _rates(values: list[str]) -> list[float]:
    out: list[float] = []
    for v in values:
        for part in v.split(","):
            part = part.strip()
            if part:
                out.append(math.inf if part in ("inf", "max") else float(part))
    return out


def bench(
    endpoint: Annotated[str, typer.Option("--endpoint", help="Base URL of the frontend or engine.")] = (
        "http://127.0.0.1:8000"
    ),
    workload: Annotated[str, typer.Option("--workload", help="sweep | multiturn | repeat.")] = "sweep",
    label: Annotated[
        str | None, typer.Option("--label", help="Name of this run in files and plots (agg, disagg).")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Served model name (default: first of /v1/models).")
    ] = None,
    api: Annotated[str, typer.Option("--api", help="completions | chat.")] = "completions",
    shape: Annotated[
        list[str] | None, typer.Option("--shape", help="INPUTxOUTPUT tokens, repeatable (default 8192x256).")
    ] = None,
    rate: Annotated[
        list[str] | None, typer.Option("--rate", help="Poisson rates in req/s, comma list or repeated; inf = burst.")
    ] = None,
    num_requests: Annotated[int, typer.Option("--num-requests", help="Requests per sweep point.")] = 100,
    max_duration: Annotated[float, typer.Option("--max-duration", help="Seconds to issue requests per point.")] = 300.0,
    timeout: Annotated[float, typer.Option("--timeout", help="Per-request limit, seconds (then: failed).")] = 600.0,
    max_concurrency: Annotated[
        int | None, typer.Option("--max-concurrency", help="Cap on requests in flight (default none).")
    ] = None,
    warmup: Annotated[int, typer.Option("--warmup", help="Unrecorded requests before each shape.")] = 2,
    seed: Annotated[int | None, typer.Option("--seed", help="Prompt/arrival seed (default random, recorded).")] = None,
    slo_ttft: Annotated[float, typer.Option("--slo-ttft", help="Goodput TTFT limit, seconds.")] = 2.0,
    slo_itl: Annotated[float, typer.Option("--slo-itl", help="Goodput ITL limit, seconds.")] = 0.025,
    slo_itl_stat: Annotated[
        str, typer.Option("--slo-itl-stat", help="Per-request ITL figure held to --slo-itl: p99|p90|p50|mean|max.")
    ] = "p99",
    tokenizer: Annotated[
        str | None, typer.Option("--tokenizer", help="Model folder or tokenizer.json (default: embedded model).")
    ] = None,
    sessions: Annotated[int, typer.Option("--sessions", help="multiturn: conversations.")] = 16,
    turns: Annotated[int, typer.Option("--turns", help="multiturn: turns per conversation.")] = 4,
    system_len: Annotated[int, typer.Option("--system-len", help="multiturn: shared system prefix tokens.")] = 2048,
    user_len: Annotated[int, typer.Option("--user-len", help="multiturn: tokens per user turn.")] = 256,
    turn_output_len: Annotated[int, typer.Option("--turn-output-len", help="multiturn: answer tokens.")] = 128,
    think_time: Annotated[float, typer.Option("--think-time", help="multiturn: seconds between turns.")] = 0.0,
    num_prefixes: Annotated[int, typer.Option("--num-prefixes", help="repeat: distinct prefixes.")] = 8,
    repeats: Annotated[int, typer.Option("--repeats", help="repeat: passes (1 cold + N-1 warm).")] = 2,
    repeat_input_len: Annotated[int, typer.Option("--repeat-input-len", help="repeat: prompt tokens.")] = 8192,
    repeat_output_len: Annotated[int, typer.Option("--repeat-output-len", help="repeat: output tokens.")] = 16,
    repeat_suffix_len: Annotated[
        int, typer.Option("--repeat-suffix-len", help="repeat: fresh tokens after the prefix per request.")
    ] = 0,
    repeat_concurrency: Annotated[int, typer.Option("--repeat-concurrency", help="repeat: in flight.")] = 1,
    metrics_url: Annotated[
        list[str] | None, typer.Option("--metrics-url", help="Engine /metrics URL for NIXL stats, repeatable.")
    ] = None,
    discover_workers: Annotated[
        bool, typer.Option("--discover-workers/--no-discover-workers", help="Scrape workers listed by /workers.")
    ] = True,
    link_json: Annotated[
        Path | None, typer.Option("--link-json", help="scripts/link_bandwidth.py result: NIXL vs link peak.")
    ] = None,
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Folder for JSON and PNG files.")] = Path("bench-results"),
    output: Annotated[Path | None, typer.Option("--output", help="JSON file (default: OUT_DIR/LABEL-...).")] = None,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write PNG plots (matplotlib).")] = True,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    save_requests: Annotated[
        bool, typer.Option("--save-requests/--no-save-requests", help="Per-request rows in the JSON.")
    ] = True,
    ignore_eos: Annotated[
        bool, typer.Option("--ignore-eos/--no-ignore-eos", help="Send ignore_eos so outputs have fixed length.")
    ] = True,
    extra_body: Annotated[str | None, typer.Option("--extra-body", help="JSON merged into every request.")] = None,
) -> None:
    """Benchmark an OpenAI-compatible endpoint: rate sweeps, multi-turn sessions, LMCache cold/warm."""
    from pdkit.bench.run import BenchConfig, run_benchmark

    try:
        if workload not in ("sweep", "multiturn", "repeat"):
            raise ValueError(f"--workload {workload!r}: use sweep, multiturn or repeat")
        if api not in ("completions", "chat"):
            raise ValueError(f"--api {api!r}: use completions or chat")
        extra: dict[str, Any] = json.loads(extra_body) if extra_body else {}
        if not isinstance(extra, dict):
            raise ValueError("--extra-body must be a JSON object")
        cfg = BenchConfig(
            endpoint=endpoint,
            workload=workload,  # type: ignore[arg-type]
            model=model,
            api=api,  # type: ignore[arg-type]
            label=label,
            shapes=[_shape(s) for s in shape] if shape else [(8192, 256)],
            rates=_rates(rate) if rate else [1.0],
            num_requests=num_requests,
            max_duration_s=max_duration,
            timeout_s=timeout,
            max_concurrency=max_concurrency,
            warmup=warmup,
            seed=seed,
            slo=Slo(slo_ttft, slo_itl, slo_itl_stat),  # type: ignore[arg-type]
            tokenizer=tokenizer,
            sessions=sessions,
            turns=turns,
            system_len=system_len,
            user_len=user_len,
            turn_output_len=turn_output_len,
            think_time_s=think_time,
            num_prefixes=num_prefixes,
            repeats=repeats,
            repeat_input_len=repeat_input_len,
            repeat_output_len=repeat_output_len,
            repeat_suffix_len=repeat_suffix_len,
            repeat_concurrency=repeat_concurrency,
            metrics_urls=list(metric_url for metric_url in (metrics_url or [])),
            discover_workers=discover_workers,
            link_json=link_json,
            out_dir=out_dir,
            output=output,
            plots=plots,
            progress=progress,
            save_requests=save_requests,
            ignore_eos=ignore_eos,
            extra_body=extra,
            argv=list(sys.argv),
        )
        cfg.validate()
    except (ValueError, json.JSONDecodeError) as exc:
        raise _fail(str(exc)) from None
    try:
        result = asyncio.run(run_benchmark(cfg))
    except (ValueError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:
        where = cfg.output or cfg.out_dir
        typer.echo(f'pdkit bench: interrupted; finished points are in {where} ("complete": false)', err=True)
        raise typer.Exit(130) from None
    _print_summary(result)


def _print_summary(result: dict[str, Any]) -> None:
    from pdkit.bench.report import comparison_table

    typer.echo(comparison_table([result]))
    failed = sum(p["summary"]["failed"] for p in result["points"])
    if failed:
        typer.echo(f"{failed} request(s) failed; see 'errors' in the JSON", err=True)
    typer.echo(f"results: {result['files']['json']}")
    for p in result["files"]["plots"]:
        typer.echo(f"plot: {p}")


def bench_compare(
    results: Annotated[list[Path], typer.Argument(help="Result JSON files of `pdkit bench` (e.g. agg, disagg).")],
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Folder for the comparison plots.")] = Path(
        "bench-results/compare"
    ),
    prefix: Annotated[str, typer.Option("--prefix", help="File name prefix of the plots.")] = "compare-",
) -> None:
    """Merge several benchmark results into comparison plots and one Markdown table."""
    from pdkit.bench.report import comparison_table, load_results, plot_results

    try:
        loaded = load_results(results)
    except (OSError, ValueError) as exc:
        raise _fail(str(exc)) from None
    for p in plot_results(loaded, out_dir, prefix):
        typer.echo(f"plot: {p}")
    typer.echo(comparison_table(loaded))


def bench_fleet(ctx: typer.Context) -> None:
    """The fleet simulation (pdkit/bench/fleet.py): its own flags, ``pdkit bench-fleet --help`` lists them."""
    from pdkit.bench.fleet import main

    raise typer.Exit(main(list(ctx.args)))
