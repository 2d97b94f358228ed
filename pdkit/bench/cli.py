"""``pdkit bench`` and ``pdkit bench-compare``: plain Typer-annotated functions the main CLI registers.

``scripts/bench_serving.py`` runs the same functions without the ``pdkit`` entry point.  Option errors
end as one line on stderr and exit code 2, like the rest of pdkit's CLI.  ``pdkit bench``'s options are
:class:`~pdkit.bench.run.BenchConfig`'s fields (flag, help and default declared there once).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from pdkit.bench.run import BenchConfig
from pdkit.flags import takes_settings


def _fail(msg: str) -> typer.Exit:
    typer.echo(f"pdkit bench: {msg}", err=True)
    return typer.Exit(2)


@takes_settings(on_error=_fail)
def bench(cfg: BenchConfig) -> None:
    """Benchmark an OpenAI-compatible endpoint: rate sweeps, multi-turn sessions, LMCache cold/warm."""
    from pdkit.bench.run import run_benchmark

    cfg.argv = list(sys.argv)
    try:
        cfg.validate()
    except ValueError as exc:
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
