"""Reading a child process's output line by line, for the agent and the supervisor."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator


async def output_lines(stream: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """Each line of ``stream`` (raw bytes) until EOF.

    A line longer than the reader's limit raises inside ``readline``; it is skipped rather than ending
    the loop, so one runaway log line cannot stop a process's output from being read (and the process
    from blocking on a full pipe).
    """
    while True:
        try:
            raw = await stream.readline()
        except (ValueError, asyncio.LimitOverrunError):
            continue
        if not raw:
            return
        yield raw
