"""``pdkit sim-worker``: one simulated engine as a process (the lead registers :func:`sim_worker`).

Kept strict on purpose: the launcher passes only these options, so an unknown flag is a launcher bug
worth failing loudly on.  The options are :class:`~pdkit.sim.settings.SimSettings`' own flags
(:mod:`pdkit.flags`), so the launch plan's argv (``to_flags``) and this command cannot drift apart.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

import typer

from pdkit.flags import Flag, takes_settings
from pdkit.sim.settings import SIM_ROLES, SimSettings
from pdkit.stop_signals import on_stop_signal


@takes_settings
def sim_worker(
    *, settings: SimSettings, log_level: Annotated[str, Flag("--log-level", "debug | info | warning")] = "info"
) -> None:
    """Run a simulated vLLM worker (OpenAI API, NIXL-style P/D params, vLLM metrics and KV events)."""
    if settings.role not in SIM_ROLES:
        raise typer.BadParameter(f"must be one of {', '.join(SIM_ROLES)}", param_hint="--role")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings.validate()
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    asyncio.run(_main(settings))


async def _main(settings: SimSettings) -> None:
    from pdkit.sim.server import serve_sim_worker

    task = asyncio.create_task(serve_sim_worker(settings))
    on_stop_signal(task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        pass
