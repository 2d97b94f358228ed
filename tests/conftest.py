"""Shared test helpers."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack

import aiohttp
import pytest

from pdkit.sim.server import SimWorker
from pdkit.sim.settings import SimSettings


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """One client session for a test's HTTP calls to real servers on loopback."""
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Run ``pdkit ARGS`` in-process through the real console entry point; returns (code, out, err)."""
    from pdkit.cli import main

    def _run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["pdkit", *args])
        with pytest.raises(SystemExit) as exc:
            main()
        out, err = capsys.readouterr()
        code = exc.value.code if isinstance(exc.value.code, int) else 0
        return code, out, err

    return _run


@pytest.fixture
async def worker() -> AsyncIterator[SimWorker]:
    """One aggregated simulated worker on loopback, no simulated delays."""
    async with SimWorker(SimSettings(time_scale=0, hash_seed="0")) as w:
        yield w


@pytest.fixture
async def trio() -> AsyncIterator[tuple[SimWorker, SimWorker, SimWorker]]:
    """(prefill, decode, agg) simulated workers of one deployment (same seed and hash seed)."""
    async with AsyncExitStack() as stack:
        ws = [
            await stack.enter_async_context(SimWorker(SimSettings(role=role, time_scale=0, hash_seed="0")))
            for role in ("prefill", "decode", "agg")
        ]
        yield ws[0], ws[1], ws[2]
