"""``pdkit sim-worker``: one simulated engine as a process (the lead registers :func:`sim_worker`).

Kept strict on purpose: the launcher passes only these options, so an unknown flag is a launcher bug
worth failing loudly on.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Annotated

import typer

from pdkit.sim.settings import SIM_ROLES, SimSettings, default_model_path


def sim_worker(
    role: Annotated[str, typer.Option("--role", help="prefill | decode | agg")] = "agg",
    host: Annotated[str, typer.Option("--host", help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="HTTP port (0 = pick a free one).")] = 8100,
    served_model_name: Annotated[str, typer.Option("--served-model-name", help="Model name clients use.")] = "synth",
    model: Annotated[
        Path | None, typer.Option("--model", help="Folder with tokenizer.json, tokenizer_config.json, config.json.")
    ] = None,
    block_size: Annotated[int, typer.Option("--block-size", help="KV block size in tokens.")] = 16,
    kv_capacity_blocks: Annotated[int, typer.Option("--kv-capacity-blocks", help="KV cache size in blocks.")] = 50_000,
    kv_events_endpoint: Annotated[
        str, typer.Option("--kv-events-endpoint", help="ZMQ PUB endpoint (tcp://*:5557 binds); empty = off.")
    ] = "",
    kv_events_replay_endpoint: Annotated[
        str, typer.Option("--kv-events-replay-endpoint", help="ZMQ ROUTER endpoint for replay; empty = off.")
    ] = "",
    kv_events_topic: Annotated[str, typer.Option("--kv-events-topic", help="Topic frame of every batch.")] = "",
    time_scale: Annotated[
        float, typer.Option("--time-scale", help="Multiply simulated latencies (0 = no sleeps).")
    ] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Output-model seed (same on every worker).")] = 0,
    kv_lease_s: Annotated[
        float, typer.Option("--kv-lease-duration", help="Seconds a prefill holds KV for the decode (NIXL: 30).")
    ] = 30.0,
    max_model_len: Annotated[
        int | None, typer.Option("--max-model-len", help="Context window (default: the model config's).")
    ] = None,
    advertise_host: Annotated[
        str | None, typer.Option("--advertise-host", help="Host put in kv_transfer_params (default: --host).")
    ] = None,
    hash_seed: Annotated[
        str | None,
        typer.Option("--hash-seed", help="Block-hash seed (vLLM uses PYTHONHASHSEED; default: that variable)."),
    ] = None,
    kv_transport: Annotated[
        str, typer.Option("--kv-transport", help="How KV moves P->D: http (built in) or nixl (needs nixl).")
    ] = "http",
    kv_wire_bytes_per_block: Annotated[
        int, typer.Option("--kv-wire-bytes-per-block", help="nixl transport: bytes really moved per block.")
    ] = 0,
    log_level: Annotated[str, typer.Option("--log-level", help="debug | info | warning")] = "info",
) -> None:
    """Run a simulated vLLM worker (OpenAI API, NIXL-style P/D params, vLLM metrics and KV events)."""
    if role not in SIM_ROLES:
        raise typer.BadParameter(f"must be one of {', '.join(SIM_ROLES)}", param_hint="--role")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = SimSettings(
        role=role,  # type: ignore[arg-type]
        host=host,
        port=port,
        served_model_name=served_model_name,
        model=model or default_model_path(),
        block_size=block_size,
        kv_capacity_blocks=kv_capacity_blocks,
        kv_events_endpoint=kv_events_endpoint or None,
        kv_events_replay_endpoint=kv_events_replay_endpoint or None,
        kv_events_topic=kv_events_topic,
        time_scale=time_scale,
        seed=seed,
        kv_lease_s=kv_lease_s,
        max_model_len=max_model_len,
        advertise_host=advertise_host,
        kv_transport=kv_transport,  # type: ignore[arg-type]
        kv_wire_bytes_per_block=kv_wire_bytes_per_block,
    )
    if hash_seed is not None:
        settings.hash_seed = hash_seed
    try:
        settings.validate()
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    asyncio.run(_main(settings))


async def _main(settings: SimSettings) -> None:
    from pdkit.sim.server import serve_sim_worker

    task = asyncio.create_task(serve_sim_worker(settings))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        pass
