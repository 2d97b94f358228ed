"""Process supervision for ``pdkit launch``: start in order, wait for readiness, restart, stop cleanly.

Why each process gets its own session (process group): a worker agent's engine (vLLM and its engine-core
children) lives in the agent's group, so one ``killpg`` reaches all of them and Ctrl-C in the terminal
reaches only the supervisor, which then stops everything in order: the frontend first (it stops
admitting and lets in-flight requests finish within the grace period), then the workers (SIGTERM, then
SIGKILL).  Nothing is left running and no port stays bound.

Why supervision degrades instead of dying: a deployment with one prefill worker in a crash loop can
still serve (its decode workers prefill locally), so a process whose restart budget (``max_restarts``
within ``restart_window_s``) is spent stays down and is reported, and the rest keeps serving.  Only the
loss of what the mode cannot do without stops everything: the frontend, the last agg worker (agg) or
the last decode worker (disagg).  Before an agent is restarted, whatever is left of its process group
(an engine that outlived it, vLLM's engine cores) is killed, so the new engine finds its ports free.
A process that failed because another process holds its port is not restarted at all.
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import aiohttp

from pdkit.agent import EXIT_BAD_ENGINE_BUILD, EXIT_PORT_BUSY, PORT_BUSY_NEEDLE
from pdkit.plan import LaunchPlan, ProcessSpec
from pdkit.secret import install_secret
from pdkit.stop_signals import stop_event
from pdkit.streams import output_lines

TAIL_LINES = 30
GROUP_EXIT_WAIT_S = 5.0  # how long a dead agent's leftover processes get to vanish after SIGKILL

# The roles a mode cannot serve without (the frontend is always required).
REQUIRED_ROLE = {"agg": "agg", "disagg": "decode"}


class StartupError(RuntimeError):
    """A process failed to come up; the message quotes its last log lines."""


class PortBusyError(StartupError):
    """A process could not bind a port another process holds: ``pdkit launch`` exits with code 2."""


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
    crashes: deque[float] = field(default_factory=deque)  # monotonic times of exits within the window
    down: str | None = None  # why it stays down for good (budget spent, busy port, broken build)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def last_lines(self) -> str:
        return "\n".join(f"    {line}" for line in self.tail) or "    (no output)"

    def port_busy_line(self) -> str | None:
        """The agent's (or frontend's) own line about a port held by another process, if it printed one."""
        lines = list(self.tail)
        for line in reversed(lines):
            if "error:" in line and ("already in use" in line or PORT_BUSY_NEEDLE in line.lower()):
                return line
        return next((line for line in reversed(lines) if PORT_BUSY_NEEDLE in line.lower()), None)


class Supervisor:
    """Starts a :class:`LaunchPlan`, watches it and stops it."""

    def __init__(
        self,
        plan: LaunchPlan,
        *,
        console: bool = True,
        max_restarts: int | None = None,
        restart_window_s: float | None = None,
        restart_backoff_s: float | None = None,
        stop_grace_s: float = 30.0,
    ) -> None:
        """Restart settings default to the plan's ``supervision`` section; arguments override them."""
        sv = plan.supervision
        self.plan = plan
        self.console = console
        self.max_restarts = sv.max_restarts if max_restarts is None else max_restarts
        self.restart_window_s = sv.restart_window_s if restart_window_s is None else restart_window_s
        self.restart_backoff_s = sv.restart_backoff_s if restart_backoff_s is None else restart_backoff_s
        self.max_backoff_s = sv.max_backoff_s
        self.stop_grace_s = stop_grace_s
        self.procs = {spec.name: Managed(spec) for spec in plan.processes}
        self.stopping = False
        self.failed: str | None = None  # what made the deployment stop (one line), set by watch()

    # ---------------------------------------------------------------------------------------- start

    async def start(self) -> None:
        Path(self.plan.run_dir).mkdir(parents=True, exist_ok=True)
        install_secret(self.plan)  # per-deployment token in <run_dir>/token (0600) and every PDKIT_TOKEN
        for warning in self.plan.warnings:
            self._say(f"warning: {warning}")
        frontend = self.procs["frontend"]
        await self._spawn(frontend)
        await self._wait_http(frontend, f"{frontend.spec.url}/health")
        workers = [m for m in self.procs.values() if m.spec.role != "frontend" and m.spec.sidecar_of is None]
        ready = {m.spec.name: asyncio.Event() for m in workers}

        async def bring_up(m: Managed, after: list[Managed]) -> None:
            if after:
                self._say(f"{m.spec.name} starts once {', '.join(a.spec.name for a in after)} is ready (shared GPU)")
            for other in after:
                await ready[other.spec.name].wait()
            await self._start_sidecars(m)
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
        # Every worker registered; /readiness also needs each role live and healthy (docs/frontend.md).
        await self._wait_http(frontend, f"{frontend.spec.url}/readiness", timeout_s=30.0)
        self._print_table()

    def _sidecars(self, worker: Managed) -> list[Managed]:
        return [self.procs[s.name] for s in self.plan.sidecars(worker.spec.name)]

    async def _start_sidecars(self, worker: Managed) -> None:
        """A worker's ``lmcache server`` (mp mode) first, ready on its health URL before the engine starts:
        LMCacheMPConnector connects to it while the engine starts up."""
        for side in self._sidecars(worker):
            await self._spawn(side)
            await self._wait_http(side, side.spec.health_url or "")
            self._say(f"{side.spec.name} ready in {side.ready_after_s or 0.0:.1f} s")

    async def _spawn(self, m: Managed) -> None:
        spec = m.spec
        env = {**os.environ, **spec.env}
        if spec.role != "frontend":
            env.setdefault("PDKIT_PROBE_TIMEOUT_S", f"{self.plan.supervision.probe_timeout_s:g}")
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
        m.tail.clear()  # this run's lines only: an earlier run's "address already in use" must not count
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

    async def _wait_http(self, m: Managed, url: str, timeout_s: float | None = None) -> None:
        """Until ``url`` answers 200; for ``timeout_s`` from now, or the process's start-up timeout."""
        deadline = m.started_at + m.spec.startup_timeout_s if timeout_s is None else time.monotonic() + timeout_s
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
            busy = m.port_busy_line()
            if m.proc.returncode == EXIT_PORT_BUSY or busy is not None:
                raise PortBusyError(f"{m.spec.name} cannot start: {busy or 'one of its ports is taken'}")
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
        """Keep every process up until ``stop`` is set (0), or until the deployment cannot serve (1).

        Each process has its own keeper task, so one worker's restart backoff never delays noticing
        another's crash.
        """
        lost = asyncio.Event()
        keepers = [asyncio.create_task(self._keep(m, lost)) for m in self.procs.values() if m.proc is not None]
        stopper = asyncio.create_task(stop.wait())
        loser = asyncio.create_task(lost.wait())
        try:
            await asyncio.wait({stopper, loser}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stopper, loser, *keepers):
                task.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)
        return 1 if self.failed else 0

    async def _keep(self, m: Managed, lost: asyncio.Event) -> None:
        """Restart ``m`` whenever it exits, until its budget is spent; then report what that means."""
        while True:
            assert m.proc is not None
            await m.proc.wait()
            if self.stopping:
                return
            await self._reap_group(m)
            delay = self._next_restart(m)
            if delay is None:
                self._report_down(m)
                if self._check_serving():
                    lost.set()
                return
            await asyncio.sleep(delay)
            if self.stopping:
                return
            try:
                await self._spawn(m)
            except OSError as exc:  # e.g. the run directory became unwritable: it cannot come back
                m.down = f"it cannot be started again: {exc}"
                self._report_down(m)
                if self._check_serving():
                    lost.set()
                return

    def _next_restart(self, m: Managed) -> float | None:
        """Seconds until ``m`` is restarted, or None (``m.down`` says why) when it stays down."""
        assert m.proc is not None
        rc = m.proc.returncode
        if rc == EXIT_BAD_ENGINE_BUILD:
            m.down = "its engine build is broken (see its log)"
            return None
        if rc == EXIT_PORT_BUSY or m.port_busy_line() is not None:
            m.down = f"another process holds its port ({m.port_busy_line() or 'see its log'})"
            return None
        now = time.monotonic()
        while m.crashes and now - m.crashes[0] > self.restart_window_s:
            m.crashes.popleft()
        if len(m.crashes) >= self.max_restarts:
            m.down = (
                f"it exited with code {rc} and was restarted {len(m.crashes)} times within "
                f"{self.restart_window_s:g} s (supervision.max_restarts={self.max_restarts})"
            )
            return None
        delay = min(self.restart_backoff_s * (2 ** len(m.crashes)), self.max_backoff_s)
        m.crashes.append(now)
        m.restarts += 1
        self._say(
            f"{m.spec.name} exited with code {rc}; restart {len(m.crashes)}/{self.max_restarts} "
            f"(within {self.restart_window_s:g} s) in {delay:g} s"
        )
        return delay

    def _report_down(self, m: Managed) -> None:
        self._say(
            f"{m.spec.name} is down for good: {m.down}; not restarting it. Last lines of {m.spec.log_file}:\n"
            f"{m.last_lines()}"
        )

    def _check_serving(self) -> bool:
        """After a process went down for good: True (and ``self.failed`` set) if the deployment must stop."""
        if self.procs["frontend"].down is not None:
            self.failed = f"the frontend is down for good ({self.procs['frontend'].down}); stopping the deployment"
        else:
            required = REQUIRED_ROLE.get(self.plan.mode, "decode")
            for role in {m.spec.role for m in self.procs.values()} - {"frontend"}:
                group = [m for m in self.procs.values() if m.spec.role == role and m.spec.sidecar_of is None]
                if any(m.down is None for m in group):
                    continue
                names = ", ".join(m.spec.name for m in group)
                if role == required:
                    self.failed = (
                        f"no {role} worker left ({names} down for good): a {self.plan.mode} deployment cannot "
                        f"serve without one; stopping the deployment"
                    )
                elif role == "prefill":
                    self._say(f"no prefill worker left ({names} down for good): decode workers prefill locally")
        if self.failed:
            self._say(f"error: {self.failed}")
        return self.failed is not None

    async def _reap_group(self, m: Managed) -> None:
        """SIGKILL what is left of a dead process's group and wait (bounded) until it is gone.

        An agent that died by SIGKILL leaves its engine's children (and, without PR_SET_PDEATHSIG, the
        engine) holding ports and GPU memory; a restart would then fail on "Address already in use".
        """
        assert m.proc is not None
        pgid = m.proc.pid
        _signal_group(m, signal.SIGKILL)
        deadline = time.monotonic() + GROUP_EXIT_WAIT_S
        while group_alive(pgid):
            if time.monotonic() > deadline:
                self._say(f"warning: processes of {m.spec.name}'s group {pgid} survive SIGKILL; restarting anyway")
                return
            await asyncio.sleep(0.05)

    # ----------------------------------------------------------------------------------------- stop

    async def stop(self) -> None:
        """Frontend first (drains in-flight requests), then workers; SIGKILL whatever outlives the grace."""
        self.stopping = True
        frontend = self.procs["frontend"]
        await self._stop_group([frontend], self.stop_grace_s + 5)
        sidecars = [m for m in self.procs.values() if m.spec.sidecar_of is not None]
        engines = [m for m in self.procs.values() if m is not frontend and m not in sidecars]
        await self._stop_group(engines, self.stop_grace_s)
        await self._stop_group(sidecars, self.stop_grace_s)  # after the engines that store into them
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


def group_alive(pgid: int) -> bool:
    """Whether a process group still has a running (not zombie) member."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: signal 0 reaches zombies too, which is good enough here
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    return any(len(f) > 2 and f[2] == str(pgid) and f[0] not in ("Z", "X") for _pid, f in proc_stats())


def proc_stats() -> Iterator[tuple[int, list[str]]]:
    """``(pid, [state, ppid, pgrp, ...])`` of every process in Linux's ``/proc``, skipping ones gone meanwhile.

    ``/proc/PID/stat`` is "pid (comm) state ppid pgrp ...", and comm may hold spaces and parentheses,
    so the fields are split after the last ')'.  (scripts/gpu_check_stack.py walks process trees with it.)
    """
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        yield int(entry.name), stat[stat.rfind(")") + 2 :].split()


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
    headers = {"Authorization": f"Bearer {plan.api_key}"} if plan.api_key else None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
        async with http.post(f"{plan.frontend_url}/v1/chat/completions", json=body, headers=headers) as resp:
            text = await resp.text()
            print(f"chat completion ({resp.status}): {text}", flush=True)
            if resp.status != 200:
                return False
            answer = json.loads(text)["choices"][0]["message"]["content"]
            print(f"pdkit smoke test: the model answered {answer!r}", flush=True)
    return True


async def _launch(plan: LaunchPlan, smoke_test: bool) -> int:
    sup = Supervisor(plan)
    stop = stop_event()
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
    except PortBusyError as exc:
        sup._say(f"error: {exc}")
        return 2
    except StartupError as exc:
        sup._say(f"error: {exc}")
        return 1
    finally:
        await sup.stop()
        sup._say("stopped all processes")


def run_launch(plan: LaunchPlan, smoke_test: bool = False) -> int:
    """Blocking entry for ``pdkit launch``: returns the process exit code."""
    return asyncio.run(_launch(plan, smoke_test))
