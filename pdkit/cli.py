"""The ``pdkit`` command line (Typer).

Every configuration mistake ends as one line on stderr and exit code 2 (see :mod:`pdkit.errors`); the
heavy modules (frontend, supervisor, simulator) are imported only by the command that needs them, so
``pdkit --help`` and ``--dry-run`` stay fast and need neither vllm nor a GPU.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from pdkit.config import Deployment, load_deployment
from pdkit.errors import ConfigError
from pdkit.flags import takes_settings
from pdkit.launch_options import (
    ConfigOpt,
    LaunchOptions,
    ModelOpt,
    NameOpt,
    NoLmcOpt,
    TpOpt,
    gpu_groups,
    group_overrides,
)

try:  # typer >= 0.29 bundles its own click and raises its exceptions, not click's
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
except ImportError:  # older typer: the real click
    from click.exceptions import ClickException, NoArgsIsHelpError, UsageError  # type: ignore[assignment]

app = typer.Typer(
    name="pdkit",
    help="Disaggregated prefill/decode serving on vLLM in one command.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)
launch_app = typer.Typer(help="Start a frontend and its vLLM (or simulated) workers.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect the configuration pdkit generates.", no_args_is_help=True)
app.add_typer(launch_app, name="launch")
app.add_typer(config_app, name="config")


def _run_launch(dep: Deployment, dry_run: bool, as_json: bool, smoke_test: bool) -> None:
    from pdkit.plan import build_plan, format_plan
    from pdkit.ports import busy_port_warnings, check_ports_free

    plan = build_plan(dep)
    if dep.backend == "ray":  # issue 20: pdkit/backends/
        from pdkit.backends import run_ray

        raise typer.Exit(run_ray(dep, plan, dry_run, as_json, smoke_test))
    if dry_run:
        plan.warnings += busy_port_warnings(plan, dep.port_offset)  # a dry run starts nothing: warn only
        typer.echo(plan.model_dump_json(indent=2) if as_json else format_plan(plan))
        return
    check_ports_free(plan, dep.port_offset)  # before anything starts: one line naming port and key
    from pdkit.supervisor import run_launch

    raise typer.Exit(run_launch(plan, smoke_test=smoke_test))


def _check_stack(dep: Deployment, dry_run: bool, allow_untested: bool) -> None:
    """Before any vLLM engine starts: the same verdict as ``pdkit doctor`` (pdkit/doctor.py), or exit 2."""
    if dry_run or dep.engine != "vllm":
        return
    from pdkit.doctor import check_launch

    for warning in check_launch(
        lmcache_enabled=dep.lmcache.enabled,
        disagg=dep.mode == "disagg",
        allow_untested=allow_untested,
        vllm_version=dep.vllm_version,
    ):
        typer.echo(f"pdkit: warning: {warning}", err=True)


# --------------------------------------------------------------------------------------------------
# pdkit launch agg | disagg


@launch_app.command("agg")
@takes_settings
def launch_agg(
    gpu: Annotated[list[str] | None, typer.Option("--gpu", "--gpus", help="GPU ids, e.g. 0 or 0,1.")] = None,
    tp: TpOpt = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Number of agg workers.")] = None,
    *,
    opts: LaunchOptions,
) -> None:
    """Frontend + aggregated vLLM worker(s) with LMCache offloading (default: one worker on GPU 0)."""
    overrides: dict[str, Any] = {"mode": "agg", **opts.overrides()}
    groups = gpu_groups("--gpu", gpu, tp or 1)
    if opts.share_gpus and groups is None and opts.config is None and workers:
        overrides.update(group_overrides("agg", [[0]] * workers, tp, None))  # every worker on GPU 0
    else:
        overrides.update(group_overrides("agg", groups, tp, workers))
    _launch(opts, overrides)


@launch_app.command("disagg")
@takes_settings
def launch_disagg(
    prefill_gpu: Annotated[
        list[str] | None,
        typer.Option("--prefill-gpu", "--prefill-gpus", help="Prefill GPU ids (one worker per TP group)."),
    ] = None,
    decode_gpu: Annotated[
        list[str] | None,
        typer.Option("--decode-gpu", "--decode-gpus", help="Decode GPU ids (one worker per TP group)."),
    ] = None,
    tp: TpOpt = None,
    prefill_tp: Annotated[int | None, typer.Option("--prefill-tp", help="TP size of each prefill worker.")] = None,
    decode_tp: Annotated[int | None, typer.Option("--decode-tp", help="TP size of each decode worker.")] = None,
    prefill_workers: Annotated[int | None, typer.Option("--prefill-workers", help="Prefill count (sim).")] = None,
    decode_workers: Annotated[int | None, typer.Option("--decode-workers", help="Decode count (sim).")] = None,
    *,
    opts: LaunchOptions,
) -> None:
    """Frontend + prefill worker(s) (PdConnector: LMCache + NIXL) + decode worker(s) (NIXL)."""
    overrides: dict[str, Any] = {"mode": "disagg", **opts.overrides()}
    p_tp, d_tp = prefill_tp or tp, decode_tp or tp
    p_groups = gpu_groups("--prefill-gpu", prefill_gpu, p_tp or 1)
    d_groups = gpu_groups("--decode-gpu", decode_gpu, d_tp or 1)
    if opts.share_gpus and p_groups is None and d_groups is None and opts.config is None:
        p_groups = d_groups = [[0]]  # one GPU for both roles
    overrides.update(group_overrides("prefill", p_groups, p_tp, None))
    overrides.update(group_overrides("decode", d_groups, d_tp, None))
    if prefill_workers is not None:
        overrides.update(group_overrides("prefill", None, None, prefill_workers))
    if decode_workers is not None:
        overrides.update(group_overrides("decode", None, None, decode_workers))
    _launch(opts, overrides)


def _launch(opts: LaunchOptions, overrides: dict[str, Any]) -> None:
    dep = load_deployment(opts.config, overrides)
    _check_stack(dep, opts.dry_run, opts.allow_untested_stack)
    _run_launch(dep, opts.dry_run, opts.json_, opts.smoke_test)


# --------------------------------------------------------------------------------------------------
# pdkit doctor


@app.command("doctor")
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (for scripts).")] = False,
    no_lmcache: NoLmcOpt = False,
    mode: Annotated[str, typer.Option("--mode", help="disagg (needs NIXL) or agg.")] = "disagg",
) -> None:
    """Show the stack pdkit would run here (vLLM, torch, LMCache, NIXL, GPUs) and whether it would run it."""
    from pdkit.doctor import run_doctor

    raise typer.Exit(run_doctor(as_json, lmcache_enabled=not no_lmcache, disagg=mode != "agg"))


# --------------------------------------------------------------------------------------------------
# pdkit config show


@config_app.command("show")
def config_show(
    mode: Annotated[str, typer.Option("--mode", help="agg or disagg.")] = "disagg",
    role: Annotated[str | None, typer.Option("--role", help="prefill, decode or agg.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Print the KV-transfer config, serve flags and env of one role as JSON."""
    from pdkit.plan import build_plan, worker_kv

    dep = load_deployment(config, {"mode": mode})
    allowed = dep.roles()
    role = role or allowed[-1]
    if role not in allowed:
        raise ConfigError("--role", f"{mode} mode has no {role} role", f"use one of: {', '.join(allowed)}")
    spec = next(p for p in build_plan(dep).workers() if p.role == role)
    role_kv = worker_kv(dep, role, spec.index)
    out = {
        "mode": mode,
        "role": role,
        "kv_transfer_config": role_kv.kv_transfer_config,
        "serve_args": role_kv.serve_args,
        "env": role_kv.env,
        "kv_events_config": spec.kv_events_config,
    }
    typer.echo(json.dumps(out, indent=2))


# --------------------------------------------------------------------------------------------------
# pdkit worker (agent), frontend and sim-worker


@app.command(
    "worker",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def worker(
    ctx: typer.Context,
    role: Annotated[str, typer.Option("--role", help="prefill | decode | agg.")],
    frontend: Annotated[str, typer.Option("--frontend", help="Frontend registry, tcp://HOST:PORT.")],
    worker_id: Annotated[str | None, typer.Option("--worker-id", help="Unique name (default ROLE-HOST-PORT).")] = None,
    url: Annotated[str | None, typer.Option("--url", help="This worker's engine URL as others reach it.")] = None,
    served_model_name: NameOpt = None,
    engine: Annotated[str, typer.Option("--engine", help="vllm | sim.")] = "vllm",
    startup_timeout_s: Annotated[float, typer.Option("--startup-timeout-s")] = 900.0,
    kv_events_replay_endpoint: Annotated[str | None, typer.Option("--kv-events-replay-endpoint")] = None,
    kv_events_endpoint: Annotated[
        str | None, typer.Option("--kv-events-endpoint", help="The engine's bound KV-event publisher.")
    ] = None,
    token_file: Annotated[
        str | None, typer.Option("--token-file", help="File holding the deployment token (else env PDKIT_TOKEN).")
    ] = None,
    nixl_side_channel: Annotated[str | None, typer.Option("--nixl-side-channel", help="HOST:PORT")] = None,
    block_size: Annotated[int, typer.Option("--block-size")] = 16,
    heartbeat_interval_s: Annotated[float, typer.Option("--heartbeat-interval-s")] = 1.0,
    config: ConfigOpt = None,
    index: Annotated[int, typer.Option("--index", help="Worker index in its group (with --config).")] = 0,
    gpus: Annotated[str | None, typer.Option("--gpus", help="GPU ids of this worker, e.g. 0,1.")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Engine HTTP port.")] = None,
    host: Annotated[str | None, typer.Option("--host", help="Address other hosts reach this worker at.")] = None,
    model: ModelOpt = None,
) -> None:
    """Run one worker agent and its engine: register, heartbeat, deregister (multi-node: one per node).

    The engine command follows ``--``; without it, it is built from ``--config``/flags like ``launch`` does.
    """
    from pdkit.worker_cli import run_agent_cli

    raise typer.Exit(run_agent_cli(**locals()))


@app.command("status", help="Show a running deployment: workers, load, KV caches, hits, failures.")
def status(
    endpoint: Annotated[str, typer.Option("--endpoint", help="The frontend's URL.")] = "http://127.0.0.1:8000",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    from pdkit.status import fetch_status, render_status

    st = fetch_status(_http_url("--endpoint", endpoint))
    typer.echo(json.dumps(st.to_json(), indent=1) if as_json else render_status(st))


def _http_url(flag: str, url: str) -> str:
    """``url`` if it is an ``http(s)://host[:port]`` URL; anything else is the caller's mistake."""
    from urllib.parse import urlsplit

    fix = "give the frontend's URL, e.g. http://127.0.0.1:8000"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number or out of range
    except ValueError as exc:
        raise ConfigError(flag, f"'{url}' is not a valid URL ({exc})", fix) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(flag, f"'{url}' is not an http:// or https:// URL with a host", fix)
    return url


def _register_component_commands() -> None:
    """Mount the commands whose modules own their options (frontend, simulator, benchmark)."""
    from pdkit.bench.cli import bench, bench_compare, bench_fleet
    from pdkit.frontend.cli import frontend
    from pdkit.sim.cli import sim_worker

    app.command("frontend", help="Run the OpenAI-compatible P/D frontend.")(frontend)
    app.command("sim-worker", help="Run one simulated vLLM engine (a stand-in, not vLLM).")(sim_worker)
    app.command("bench", help="Benchmark an OpenAI endpoint: rate sweeps, multi-turn, LMCache cold/warm.")(bench)
    app.command("bench-compare", help="Merge bench result JSONs into comparison plots and a table.")(bench_compare)
    app.command(
        "bench-fleet",
        help="Simulated fleet (real frontend, simulated engines): routing policies compared on one workload.",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
        add_help_option=False,
    )(bench_fleet)


_register_component_commands()


def _one_line(text: str) -> str:
    """Click messages may span lines (suggestions, lists); the rule is one line per error."""
    return "; ".join(part.strip() for part in text.strip().splitlines() if part.strip())


def _usage_error_line(exc: UsageError) -> str:
    """``pdkit: error: <click's message> (see 'pdkit launch disagg --help')``: one line, no usage block."""
    line = f"pdkit: error: {_one_line(exc.format_message())}"
    ctx = exc.ctx
    if ctx is not None and ctx.command.get_help_option(ctx) is not None:
        line += f" (see '{ctx.command_path} {ctx.help_option_names[0]}')"
    return line


def main() -> None:
    """Console entry point: every mistake of the caller ends as one line on stderr and exit code 2.

    Why ``standalone_mode=False`` and our own handlers: click's standalone handling prints a usage
    block plus an error (several lines), and typer >= 0.29 raises exceptions of its bundled click
    (``typer._click``), which an ``import click`` check never matches -- they escaped as tracebacks.
    """
    try:
        rv = app(prog_name="pdkit", standalone_mode=False)
    except ConfigError as exc:
        typer.echo(f"pdkit: error: {_one_line(str(exc))}", err=True)
        sys.exit(2)
    except NoArgsIsHelpError as exc:  # ``pdkit`` / ``pdkit launch`` alone: the help is the answer
        typer.echo(exc.format_message())
        sys.exit(2)
    except UsageError as exc:  # bad flag, value, missing option or subcommand (BadParameter, NoSuchOption...)
        typer.echo(_usage_error_line(exc), err=True)
        sys.exit(2)
    except ClickException as exc:  # e.g. FileError: not a usage mistake, still one line
        typer.echo(f"pdkit: error: {_one_line(exc.format_message())}", err=True)
        sys.exit(exc.exit_code if exc.exit_code else 1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("Aborted.", err=True)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
