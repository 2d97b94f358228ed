"""The Ray actor that runs one pdkit process (a worker agent with its engine, or the frontend) on its node.

Why the actor re-plans its own process: the node is known only once Ray has placed the actor, and Ray
may place it again elsewhere after a node loss, so URLs, the NIXL side channel and the KV-event
endpoints are built where it runs, from the same :mod:`pdkit.plan` functions the local backend uses,
with this node's address in place of the configured host.

Why the actor exits when its process exits: Ray restarts a dead actor (``max_restarts``) on its
placement-group bundle; an actor that merely noticed its agent died would never be restarted.  Exits
that a restart cannot fix (a port held by another process, a broken engine build) keep the actor alive
and reported as down instead, as the local supervisor does.  The agent runs under
:mod:`pdkit.parent_death`, so when Ray kills the actor (``ray.kill``, a node's raylet dying) the agent
and its engine die with it and the next incarnation finds its ports free.

This module imports ``ray``; only :mod:`pdkit.backends.ray_backend` imports it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from pdkit.agent import EXIT_BAD_ENGINE_BUILD, EXIT_PORT_BUSY
from pdkit.config import Deployment, Role
from pdkit.parent_death import wrap as tie_to_parent
from pdkit.plan import ProcessSpec, frontend_spec, worker_spec

LOOPBACK = "127.0.0.1"
TAIL_LINES = 30
STALE_GROUP_WAIT_S = 5.0
TOKEN_ENV = "PDKIT_TOKEN"


@dataclass(frozen=True)
class ProcessJob:
    """What an actor needs to build its process on whichever node it lands on (pickled by Ray)."""

    dep: Deployment  # the frontend host already resolved to an address every node reaches
    role: str  # "frontend" or a worker role
    index: int
    run_dir: str
    loopback: bool  # every node is this machine: keep 127.0.0.1 (tests, one-node clusters)
    secret: str | None
    probe_timeout_s: float

    @property
    def name(self) -> str:
        return "frontend" if self.role == "frontend" else f"{self.role}-{self.index}"

    def spec_for(self, host: str, run_dir: Path) -> ProcessSpec:
        """The process as :mod:`pdkit.plan` builds it, with ``host`` as this process's address."""
        dep = self.dep
        if self.role == "frontend":
            dep = dep.model_copy(update={"frontend": dep.frontend.model_copy(update={"host": host})})
            spec = frontend_spec(dep, run_dir)
        else:
            role: Role = self.role  # type: ignore[assignment]
            group = dep.group(role).model_copy(update={"host": host})
            spec = worker_spec(dep.model_copy(update={role: group}), role, self.index, run_dir)
        if self.secret:
            spec.env[TOKEN_ENV] = self.secret
        else:
            spec.env.pop(TOKEN_ENV, None)
        return spec


def usable_run_dir(path: str) -> Path:
    """The plan's run directory on this node, or one under the temp dir where it cannot be made."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        return Path(path)
    except OSError:
        fallback = Path(tempfile.gettempdir()) / "pdkit-run"
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


def _prepare_local_sockets(spec: ProcessSpec) -> None:
    """Private directories for ``ipc://`` KV-event sockets (present once the security branch is in)."""
    try:
        from pdkit.secret import prepare_ipc_dirs  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return
    events = spec.kv_events_config or {}
    prepare_ipc_dirs([events.get("endpoint"), events.get("replay_endpoint")])


def _group_alive(pgid: int) -> bool:
    from pdkit.supervisor import group_alive

    return group_alive(pgid)


class ProcessActor:
    """One pdkit process on a Ray node; see the module docstring.  Created by ``ray.remote(...)``."""

    def __init__(self, job: ProcessJob) -> None:
        self.job = job
        self.host = LOOPBACK if job.loopback else ray.util.get_node_ip_address()
        self.run_dir = usable_run_dir(job.run_dir)
        self.spec = job.spec_for(self.host, self.run_dir)
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.down: str | None = None
        self.stopping = False
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self.pgid_file = self.run_dir / "ray" / f"{job.name}.pgid"
        self._kill_previous_incarnation()
        _prepare_local_sockets(self.spec)
        started = threading.Event()
        # The thread that starts the process lives as long as the process: PR_SET_PDEATHSIG fires when
        # the forking *thread* ends (see pdkit.parent_death).
        threading.Thread(target=self._run, args=(started,), name=f"pdkit-{job.name}", daemon=True).start()
        started.wait(timeout=30)

    def __repr__(self) -> str:  # Ray prefixes the actor's log lines with it
        return self.job.name

    def _kill_previous_incarnation(self) -> None:
        """An actor that died by SIGKILL may leave its engine's children: kill that group first."""
        try:
            pgid = int(self.pgid_file.read_text())
        except (OSError, ValueError):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        deadline = time.monotonic() + STALE_GROUP_WAIT_S
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def _env(self) -> dict[str, str]:
        env = {**os.environ, **self.spec.env}
        if self.job.role != "frontend":
            env.setdefault("PDKIT_PROBE_TIMEOUT_S", f"{self.job.probe_timeout_s:g}")
            gpu_ids = [str(g) for g in ray.get_gpu_ids()]
            if self.job.dep.engine == "vllm" and gpu_ids:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_ids)  # Ray's choice, not the plan's GPU ids
        return env

    def _run(self, started: threading.Event) -> None:
        spec = self.spec
        Path(spec.log_file).parent.mkdir(parents=True, exist_ok=True)
        with open(spec.log_file, "a", buffering=1) as log:
            try:
                self.proc = subprocess.Popen(
                    tie_to_parent(spec.argv),
                    env=self._env(),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                self.down = f"cannot start {spec.argv[0]}: {exc}"
                started.set()
                return
            self.pgid_file.parent.mkdir(parents=True, exist_ok=True)
            self.pgid_file.write_text(str(self.proc.pid))
            started.set()
            assert self.proc.stdout is not None
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace").rstrip()
                self.tail.append(line)
                log.write(line + "\n")
                print(line, flush=True)  # Ray forwards it to the driver, prefixed with this actor's name
            self.returncode = rc = self.proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the engine's children, if any outlived the agent
        if self.stopping:
            return
        if rc == EXIT_PORT_BUSY:
            self.down = "another process holds one of its ports (see its log)"
        elif rc == EXIT_BAD_ENGINE_BUILD:
            self.down = "its engine build is broken (see its log)"
        if self.down:
            print(f"pdkit: {self.job.name} is down for good: {self.down}", flush=True)
            return
        print(f"pdkit: {self.job.name} exited with code {rc}; its actor exits so that Ray restarts it", flush=True)
        sys.stdout.flush()
        os._exit(1)

    # ------------------------------------------------------------------------------- remote methods

    def info(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {
            "name": self.job.name,
            "host": self.host,
            "node_id": ctx.get_node_id(),
            "pid": self.proc.pid if self.proc is not None else None,
            "url": self.spec.url,
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "down": self.down,
            "log_file": self.spec.log_file,
        }

    def last_lines(self) -> list[str]:
        return list(self.tail)

    def stop(self, grace_s: float) -> int | None:
        """SIGTERM the process group (the agent deregisters and stops its engine), SIGKILL after the grace."""
        self.stopping = True
        proc = self.proc
        if proc is None:
            return None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        with contextlib.suppress(OSError):
            self.pgid_file.unlink()
        return proc.returncode
