"""Process supervision for ``pdkit launch``: start in order, wait for readiness, restart, stop cleanly.

Why each process gets its own session (process group): a worker agent's engine (vLLM and its engine-core
children) lives in the agent's group, so one ``killpg`` reaches all of them and Ctrl-C in the terminal
reaches only the supervisor, which then stops everything in order: the frontend first (it stops
admitting and lets in-flight requests finish within the grace period), then the workers (SIGTERM, then
SIGKILL).  Nothing is left running and no port stays bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import aiohttp

from pdkit.agent import EXIT_BAD_ENGINE_BUILD
from pdkit.plan import LaunchPlan, ProcessSpec
from pdkit.secret import install_secret
from pdkit.streams import output_lines

TAIL_LINES = 30


class StartupError(RuntimeError):
    """A process failed to come up; the message quotes its last log lines."""


@dataclass
class Managed:
    """One supervised process and what the supervisor knows about it."""

    spec: ProcessSpec
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    started_at: float = 0.0
    ready_after_s: float | None = None
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    log: IO[str] | None = None
    pump: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def last_lines(self) -> str:
        return "\n".join(f"    {line}" for line in self.tail) or "    (no output)"


class Supervisor:
    """Starts a :class:`LaunchPlan`, watches it and stops it."""

    def __init__(
        self,
        plan: LaunchPlan,
        *,
        console: bool = True,
        max_restarts: int = 3,
        restart_backoff_s: float = 2.0,
        stop_grace_s: float = 30.0,
    ) -> None:
        self.plan = plan
        self.console = console
        self.max_restarts = max_restarts
        self.restart_backoff_s = restart_backoff_s
        self.stop_grace_s = stop_grace_s
        self.procs = {spec.name: Managed(spec) for spec in plan.processes}
        self.stopping = False
        self.failed: str | None = None

    # ---------------------------------------------------------------------------------------- start

    async def start(self) -> None:
        Path(self.plan.run_dir).mkdir(parents=True, exist_ok=True)
        install_secret(self.plan)  # per-deployment token in <run_dir>/token (0600) and every PDKIT_TOKEN
        for warning in self.plan.warnings:
            self._say(f"warning: {warning}")
        frontend = self.procs["frontend"]
        await self._spawn(frontend)
        await self._wait_http(frontend, f"{frontend.spec.url}/health")
        workers = [m for m in self.procs.values() if m.spec.role != "frontend"]
        ready = {m.spec.name: asyncio.Event() for m in workers}

        async def bring_up(m: Managed, after: list[Managed]) -> None:
            if after:
                self._say(f"{m.spec.name} starts once {', '.join(a.spec.name for a in after)} is ready (shared GPU)")
            for other in after:
                await ready[other.spec.name].wait()
            await self._spawn(m)
            await self._wait_registered(m)
            ready[m.spec.name].set()

        after = {m.spec.name: [self.procs[s.name] for s in self.plan.starts_after(m.spec)] for m in workers}
        tasks = [asyncio.ensure_future(bring_up(m, after[m.spec.name])) for m in workers]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:  # workers still waiting for a neighbour that failed
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        self._print_table()

    async def _spawn(self, m: Managed) -> None:
        spec = m.spec
        env = {**os.environ, **spec.env}
        Path(spec.log_file).parent.mkdir(parents=True, exist_ok=True)
        if m.log is None:
            m.log = open(spec.log_file, "w", buffering=1)  # noqa: SIM115 - closed in stop()
        m.proc = await asyncio.create_subprocess_exec(
            *spec.argv,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            limit=1 << 20,
        )
        m.started_at = time.monotonic()
        m.ready_after_s = None
        m.pump = asyncio.create_task(self._pump(m, m.proc))
        self._say(f"started {spec.name} (pid {m.proc.pid})")

    async def _pump(self, m: Managed, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for raw in output_lines(proc.stdout):
            line = raw.decode(errors="replace").rstrip()
            m.tail.append(line)
            if m.log is not None:
                m.log.write(line + "\n")
            if self.console:
                print(f"[{m.spec.name}] {line}", flush=True)

    async def _wait_http(self, m: Managed, url: str) -> None:
        deadline = m.started_at + m.spec.startup_timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while True:
                self._raise_if_exited(m)
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    async with http.get(url) as resp:
                        if resp.status == 200:
                            m.ready_after_s = time.monotonic() - m.started_at
                            return
                if time.monotonic() > deadline:
                    raise StartupError(self._timeout_message(m))
                await asyncio.sleep(0.2)

    async def _wait_registered(self, m: Managed) -> None:
        """Ready = the frontend lists the worker (its engine answered /health and it registered)."""
        deadline = m.started_at + m.spec.startup_timeout_s
        url = f"{self.plan.frontend_url}/workers"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while True:
                self._raise_if_exited(m)
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
                    async with http.get(url) as resp:
                        if m.spec.name in registered_ids(await resp.json()):
                            m.ready_after_s = time.monotonic() - m.started_at
                            self._say(f"{m.spec.name} ready in {m.ready_after_s:.1f} s")
                            return
                if time.monotonic() > deadline:
                    raise StartupError(self._timeout_message(m))
                await asyncio.sleep(0.25)

    def _raise_if_exited(self, m: Managed) -> None:
        if m.proc is not None and m.proc.returncode is not None:
            raise StartupError(
                f"{m.spec.name} exited during start-up with code {m.proc.returncode}; "
                f"last lines of {m.spec.log_file}:\n{m.last_lines()}"
            )

    def _timeout_message(self, m: Managed) -> str:
        return (
            f"{m.spec.name} not ready after {m.spec.startup_timeout_s:.0f} s; raise startup_timeout_s "
            f"or read {m.spec.log_file}; last lines:\n{m.last_lines()}"
        )

    def _print_table(self) -> None:
        rows = [("process", "role", "GPUs", "URL", "ready")]
        for m in self.procs.values():
            ready = f"{m.ready_after_s:.1f} s" if m.ready_after_s is not None else "-"
            rows.append((m.spec.name, m.spec.role, m.spec.cuda_visible_devices or "-", m.spec.url or "-", ready))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        self._say("all processes ready:\n" + "\n".join("    " + line for line in lines))
        self._say(f"serving the OpenAI API at {self.plan.frontend_url}/v1 (model '{self.plan.served_model_name}')")

    def _say(self, msg: str) -> None:
        print(f"pdkit: {msg}", file=sys.stderr, flush=True)

    # ---------------------------------------------------------------------------------------- watch

    async def watch(self, stop: asyncio.Event) -> int:
        """Restart crashed processes with bounded backoff until ``stop`` is set; 1 if restarts ran out."""
        while not stop.is_set():
            waits = {asyncio.create_task(m.proc.wait()): m for m in self.procs.values() if m.proc is not None}
            stopper = asyncio.create_task(stop.wait())
            done, pending = await asyncio.wait({stopper, *waits}, return_when=asyncio.FIRST_COMPLETED)
            for t in pending:
                t.cancel()
            if stopper in done:
                return 0
            for task in done:
                m = waits[task]
                if not await self._restart(m):
                    self.failed = m.spec.name
                    return 1
        return 0

    async def _restart(self, m: Managed) -> bool:
        assert m.proc is not None
        rc = m.proc.returncode
        if rc == EXIT_BAD_ENGINE_BUILD:
            self._say(f"{m.spec.name} has a broken engine build (see its log); not restarting it")
            return False
        if m.restarts >= self.max_restarts:
            self._say(
                f"{m.spec.name} exited with code {rc} and was restarted {m.restarts} times already; "
                f"giving up. Last lines of {m.spec.log_file}:\n{m.last_lines()}"
            )
            return False
        delay = self.restart_backoff_s * (2**m.restarts)
        m.restarts += 1
        self._say(f"{m.spec.name} exited with code {rc}; restart {m.restarts}/{self.max_restarts} in {delay:.0f} s")
        await asyncio.sleep(delay)
        if self.stopping:
            return True
        await self._spawn(m)
        return True

    # ----------------------------------------------------------------------------------------- stop

    async def stop(self) -> None:
        """Frontend first (drains in-flight requests), then workers; SIGKILL whatever outlives the grace."""
        self.stopping = True
        frontend = self.procs["frontend"]
        await self._stop_group([frontend], self.stop_grace_s + 5)
        await self._stop_group([m for m in self.procs.values() if m is not frontend], self.stop_grace_s)
        for m in self.procs.values():
            if m.pump is not None:
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(m.pump, timeout=2)
            if m.log is not None:
                m.log.close()
                m.log = None

    async def _stop_group(self, group: list[Managed], grace_s: float) -> None:
        live = [m for m in group if m.alive]
        for m in live:
            _signal_group(m, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for m in live:
            assert m.proc is not None
            try:
                await asyncio.wait_for(m.proc.wait(), timeout=max(deadline - time.monotonic(), 0.1))
            except asyncio.TimeoutError:
                self._say(f"{m.spec.name} did not stop within {grace_s:.0f} s; killing it")
        for m in group:
            # The leader may be gone while children (e.g. vLLM engine cores) linger: kill the group.
            _signal_group(m, signal.SIGKILL)
            if m.proc is not None and m.proc.returncode is None:
                await m.proc.wait()


def _signal_group(m: Managed, sig: int) -> None:
    if m.proc is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(m.proc.pid, sig)


def registered_ids(workers_json: object) -> set[str]:
    """Worker ids in the frontend's ``/workers`` answer (``{"workers": [{"worker_id": ...}, ...]}``)."""
    items = workers_json.get("workers", []) if isinstance(workers_json, dict) else []
    return {str(item["worker_id"]) for item in items if isinstance(item, dict) and "worker_id" in item}


# -------------------------------------------------------------------------------------------- entry


async def smoke_request(plan: LaunchPlan) -> bool:
    """One chat completion and one completion through the frontend; prints them."""
    body = {
        "model": plan.served_model_name,
        "messages": [{"role": "user", "content": "Say hello to pdkit."}],
        "max_tokens": 16,
        "temperature": 0,
    }
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
        async with http.post(f"{plan.frontend_url}/v1/chat/completions", json=body) as resp:
            text = await resp.text()
            print(f"chat completion ({resp.status}): {text}", flush=True)
            if resp.status != 200:
                return False
            answer = json.loads(text)["choices"][0]["message"]["content"]
            print(f"pdkit smoke test: the model answered {answer!r}", flush=True)
    return True


async def _launch(plan: LaunchPlan, smoke_test: bool) -> int:
    sup = Supervisor(plan)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        start = asyncio.create_task(sup.start())
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({start, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if stopper in done:
            start.cancel()
            sup._say("interrupted during start-up; stopping")
            return 130
        stopper.cancel()
        start.result()
        if smoke_test:
            return 0 if await smoke_request(plan) else 1
        rc = await sup.watch(stop)
        return rc
    except StartupError as exc:
        sup._say(f"error: {exc}")
        return 1
    finally:
        await sup.stop()
        sup._say("stopped all processes")


def run_launch(plan: LaunchPlan, smoke_test: bool = False) -> int:
    """Blocking entry for ``pdkit launch``: returns the process exit code."""
    return asyncio.run(_launch(plan, smoke_test))
