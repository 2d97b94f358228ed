"""One process of a deployment, as the supervisor starts it (pdkit/plan.py builds them).

A module of its own, below both of its builders: plan.py (workers, frontend) imports lmcache_server.py, which
builds the ``lmcache server`` sidecars' specs; with ProcessSpec in plan.py the two imported each other.
"""

from __future__ import annotations

import shlex
from typing import Any, Literal

from pydantic import BaseModel, Field


class ProcessSpec(BaseModel):
    """One process of a deployment, as the supervisor starts it."""

    name: str
    role: Literal["frontend", "prefill", "decode", "agg"]
    index: int = 0
    host: str = "127.0.0.1"
    argv: list[str]
    engine_argv: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    cuda_visible_devices: str | None = None
    ports: dict[str, int] = Field(default_factory=dict)
    url: str | None = None
    kv_transfer_config: dict[str, Any] | None = None
    kv_events_config: dict[str, Any] | None = None
    log_file: str
    startup_timeout_s: float = 900.0
    # A helper process of one worker (its ``lmcache server``, lmcache.mode=mp): the worker's name.  It
    # starts before the worker, is ready when ``health_url`` answers 200, and stops after it.
    sidecar_of: str | None = None
    health_url: str | None = None

    def command_line(self) -> str:
        return shlex.join(self.engine_argv or self.argv)
