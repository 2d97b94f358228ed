"""``pdkit frontend``: the plain function the lead registers as a Typer command.

Why a plain function: ``pdkit/cli.py`` owns the Typer app; this module only declares the options
(typer ``Annotated``) and runs :class:`~pdkit.frontend.server.Frontend` until SIGINT/SIGTERM, then
drains in-flight requests for ``--stop-grace-s``.  Misuse ends as one line on stderr and exit 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from typing import Annotated

import typer


def frontend(
    host: Annotated[str, typer.Option("--host", help="Bind address of HTTP and ZMQ (off loopback needs a token).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option("--port", help="HTTP port of the OpenAI API.")] = 8000,
    zmq_port: Annotated[int, typer.Option("--zmq-port", help="ZMQ ROUTER port workers register with.")] = 8100,
    mode: Annotated[str, typer.Option("--mode", help="agg (one hop) or disagg (prefill → decode).")] = "disagg",
    policy: Annotated[str, typer.Option("--policy", help="round_robin | least_loaded | kv_aware.")] = ("least_loaded"),
    token: Annotated[
        str | None, typer.Option("--token", envvar="PDKIT_TOKEN", help="Shared registry token (env PDKIT_TOKEN).")
    ] = None,
    token_file: Annotated[
        str | None, typer.Option("--token-file", help="File holding the registry token (mode 0600).")
    ] = None,
    disagg_min_prompt_tokens: Annotated[
        int, typer.Option("--disagg-min-prompt-tokens", help="Shorter prompts skip the prefill hop (0 = never).")
    ] = 0,
    prefill_timeout_s: Annotated[
        float, typer.Option("--prefill-timeout-s", help="Prefill hop timeout before trying elsewhere.")
    ] = 60.0,
    heartbeat_interval_s: Annotated[
        float, typer.Option("--heartbeat-interval-s", help="Heartbeat pace told to agents.")
    ] = 1.0,
    liveness_timeout_s: Annotated[
        float | None, typer.Option("--liveness-timeout-s", help="Drop a silent worker after this (default 3 beats).")
    ] = None,
    max_inflight_per_worker: Annotated[
        int, typer.Option("--max-inflight-per-worker", help="Requests per worker at most; more wait in the queue.")
    ] = 256,
    max_queued: Annotated[
        int, typer.Option("--max-queued", help="Requests that may wait for a worker slot; more get 503.")
    ] = 4096,
    queue_timeout_s: Annotated[
        float, typer.Option("--queue-timeout-s", help="Longest wait for a worker slot before 503.")
    ] = 600.0,
    decode_first_byte_timeout_s: Annotated[
        float,
        typer.Option("--decode-first-byte-timeout-s", help="A streamed decode hop without a first byte by then fails."),
    ] = 120.0,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="PDKIT_API_KEY", help="Require Authorization: Bearer KEY on /v1/*."),
    ] = None,
    max_model_len: Annotated[
        int | None, typer.Option("--max-model-len", help="Context length (default: what workers report).")
    ] = None,
    tokenizer: Annotated[
        str | None, typer.Option("--tokenizer", help="tokenizer.json for exact prompt lengths (default chars/4).")
    ] = None,
    kv_events_port: Annotated[
        int,
        typer.Option(
            "--kv-events-port",
            help="Unused: the frontend reads each registered worker's own KV-event socket (docs/security.md).",
        ),
    ] = 8101,
    kv_events: Annotated[
        bool,
        typer.Option(
            "--kv-events/--no-kv-events", help="Keep a KV index (required by kv_aware; off: no KV-event sockets)."
        ),
    ] = True,
    hash_seed: Annotated[
        str, typer.Option("--hash-seed", help="The workers' PYTHONHASHSEED (the deployment's hash_seed).")
    ] = "0",
    model_dir: Annotated[
        str | None,
        typer.Option("--model-dir", help="Served model folder: tokenizer + chat template (default: embedded model)."),
    ] = None,
    block_size: Annotated[int, typer.Option("--block-size", help="The workers' KV block size.")] = 16,
    seed_first_token: Annotated[
        bool,
        typer.Option(
            "--seed-first-token/--no-seed-first-token",
            help="Disagg: stream the prefill's first token at once and seed the decode with it (opt-in until "
            "proven on a GPU; docs/seeding.md).",
        ),
    ] = False,
    stop_grace_s: Annotated[float, typer.Option("--stop-grace-s", help="Drain time on SIGTERM.")] = 30.0,
    log_level: Annotated[str, typer.Option("--log-level", help="debug | info | warning.")] = "info",
) -> None:
    """Serve the OpenAI API, route to registered workers, orchestrate prefill → decode."""
    from pdkit.frontend.settings import FrontendSettings

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from pdkit.errors import ConfigError
    from pdkit.secret import resolve_token

    try:
        token = resolve_token(token, token_file)
    except ConfigError as exc:
        print(f"pdkit frontend: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
    settings = FrontendSettings(
        host=host,
        port=port,
        zmq_port=zmq_port,
        mode=mode,  # type: ignore[arg-type]
        policy=policy,
        token=token or None,
        disagg_min_prompt_tokens=disagg_min_prompt_tokens,
        prefill_timeout_s=prefill_timeout_s,
        heartbeat_interval_s=heartbeat_interval_s,
        liveness_timeout_s=liveness_timeout_s,
        max_inflight_per_worker=max_inflight_per_worker,
        max_queued=max_queued,
        queue_timeout_s=queue_timeout_s,
        decode_first_byte_timeout_s=decode_first_byte_timeout_s,
        api_key=api_key or None,
        max_model_len=max_model_len,
        tokenizer=tokenizer,
        kv_events_port=kv_events_port if kv_events else None,
        hash_seed=hash_seed,
        model_dir=model_dir,
        block_size=block_size,
        seed_first_token=seed_first_token,
    )
    try:
        settings.validate()
        if not kv_events and policy == "kv_aware":
            raise ValueError("policy kv_aware needs the KV-event socket; drop --no-kv-events")
        if model_dir is not None and settings.kv_events_enabled:
            from pathlib import Path

            if not (Path(model_dir) / "tokenizer.json").is_file():
                raise ValueError(f"--model-dir {model_dir} has no tokenizer.json (KV routing tokenizes as the workers)")
    except ValueError as exc:
        print(f"pdkit frontend: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
    try:
        import uvloop  # optional: a faster event loop when installed
    except ImportError:
        uvloop = None  # type: ignore[assignment]
    main = serve(settings, stop_grace_s)
    raise typer.Exit(uvloop.run(main) if uvloop is not None else asyncio.run(main))


async def serve(settings: object, stop_grace_s: float = 30.0) -> int:
    """Run a frontend until SIGINT/SIGTERM; returns the exit code (2 when a port is taken)."""
    from pdkit.frontend.server import BindError, Frontend
    from pdkit.frontend.settings import FrontendSettings

    assert isinstance(settings, FrontendSettings)
    fe = Frontend(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await fe.start()
    except BindError as exc:
        print(f"pdkit frontend: {exc}", file=sys.stderr, flush=True)
        # Close what did bind, but never wait long for it: the launcher waits on this exit.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(fe.stop(0), timeout=2.0)
        return 2
    print(f"pdkit frontend ({settings.mode}) serving at {fe.url}/v1, registry at {fe.zmq_endpoint}", file=sys.stderr)
    await stop.wait()
    await fe.stop(stop_grace_s)
    return 0
