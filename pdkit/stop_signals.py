"""SIGINT and SIGTERM as one "stop" for a process's event loop.

Why one place: every long-running pdkit process (frontend, simulated engine, launcher) stops the same
way on Ctrl-C and on the supervisor's SIGTERM (drain, then exit), so the pair of signals and how they
reach the loop are written once.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

__all__ = ["STOP_SIGNALS", "on_stop_signal", "stop_event"]

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)


def on_stop_signal(callback: Callable[[], object]) -> None:
    """Call ``callback`` in the running loop on SIGINT or SIGTERM (instead of the default handlers)."""
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, callback)


def stop_event() -> asyncio.Event:
    """An event the running loop sets on SIGINT or SIGTERM."""
    stop = asyncio.Event()
    on_stop_signal(stop.set)
    return stop
