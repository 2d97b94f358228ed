"""A progress bar that needs nothing heavy: ``rich`` when importable, else one stderr line.

Why not always rich: the benchmark runs on GPU hosts with a bare environment; it must not fail or add a
dependency for a cosmetic feature.  ``enabled=False`` (``--no-progress``) keeps logs clean in CI.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any


class Progress:
    """``with Progress("8192x256 @ 2 rps", total) as p: p.advance(ok=True)``."""

    def __init__(self, title: str, total: int, enabled: bool = True) -> None:
        self.title, self.total, self.enabled = title, total, enabled
        self.done = self.failed = 0
        self._rich: Any = None
        self._task: Any = None
        self._t0 = time.monotonic()
        self._last_draw = 0.0

    def __enter__(self) -> Progress:
        if not self.enabled:
            return self
        try:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("failed {task.fields[failed]}"),
                TimeElapsedColumn(),
                transient=False,
            )
            self._rich.__enter__()
            self._task = self._rich.add_task(self.title, total=self.total, failed=0)
        except ImportError:
            self._rich = None
            self._draw(force=True)
        return self

    def advance(self, ok: bool = True) -> None:
        self.done += 1
        self.failed += 0 if ok else 1
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.update(self._task, advance=1, failed=self.failed)
        else:
            self._draw()

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < 0.2 and self.done < self.total:
            return
        self._last_draw = now
        width = 30
        filled = int(width * self.done / self.total) if self.total else width
        bar = "#" * filled + "-" * (width - filled)
        sys.stderr.write(f"\r{self.title} [{bar}] {self.done}/{self.total} failed {self.failed} {now - self._t0:6.1f}s")
        sys.stderr.flush()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.__exit__(et, ev, tb)
        else:
            self._draw(force=True)
            sys.stderr.write("\n")
