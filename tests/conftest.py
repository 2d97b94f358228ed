"""Shared test helpers."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest


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
