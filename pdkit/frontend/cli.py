"""``pdkit frontend``: the plain function the lead registers as a Typer command.

Why a plain function: ``pdkit/cli.py`` owns the Typer app; this module takes its options from the
settings' own flags (:class:`~pdkit.frontend.settings.FrontendSettings`, :mod:`pdkit.flags`) and runs
:class:`~pdkit.frontend.server.Frontend` until SIGINT/SIGTERM, then drains in-flight requests for
``--stop-grace-s``.  Misuse ends as one line on stderr and exit 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys

import typer

from pdkit.flags import takes_settings
from pdkit.frontend.settings import FrontendProcessOptions, FrontendSettings
from pdkit.stop_signals import stop_event


@takes_settings
def frontend(*, settings: FrontendSettings, process: FrontendProcessOptions) -> None:
    """Serve the OpenAI API, route to registered workers, orchestrate prefill → decode."""
    logging.basicConfig(level=process.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from pdkit.errors import ConfigError
    from pdkit.secret import resolve_token

    try:
        token = resolve_token(settings.token, process.token_file)
    except ConfigError as exc:
        print(f"pdkit frontend: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
    settings.token = token or None
    settings.api_key = settings.api_key or None
    if not process.kv_events:
        settings.kv_events_port = None
    model_dir = settings.model_dir
    try:
        settings.validate()
        if not process.kv_events and settings.policy == "kv_aware":
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
    main = serve(settings, process.stop_grace_s)
    raise typer.Exit(uvloop.run(main) if uvloop is not None else asyncio.run(main))


async def serve(settings: FrontendSettings, stop_grace_s: float = 30.0) -> int:
    """Run a frontend until SIGINT/SIGTERM; returns the exit code (2 when a port is taken)."""
    from pdkit.frontend.server import BindError, Frontend

    fe = Frontend(settings)
    stop = stop_event()
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
