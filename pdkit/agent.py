"""The worker agent: one engine process, announced to the frontend over ZMQ.

Why an agent instead of letting the frontend probe engines: the frontend must route only to engines
that are up, know their load without polling every engine on the request path, and notice a dead one
within a few heartbeats.  The agent starts the engine (``vllm serve`` or the simulator) as its child,
waits for ``/health``, registers (role, URL, NIXL side channel, KV-event endpoints, model), heartbeats
the load it scrapes from the engine's ``/metrics`` (vLLM's metric names) and deregisters on exit.  The
engine shares the agent's process group, so whoever stops the agent's group stops the engine with it, and
it runs under :mod:`pdkit.parent_death`, so it dies with the agent even when the agent is SIGKILLed.

Every probe of the engine (``/health`` and ``/metrics``) is bounded by ``probe_timeout_s``: a SIGSTOPped
or wedged engine still accepts TCP connections but never answers, and heartbeating "registered, load 0"
for it would keep it first in line for new requests.  Such a probe makes the heartbeat carry
``Load(healthy=False, unhealthy_reason=...)`` until the engine answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import zmq
import zmq.asyncio

from pdkit import prom
from pdkit.parent_death import wrap as tie_to_parent
from pdkit.protocol import (
    Ack,
    Load,
    WorkerInfo,
    encode,
    parse_message,
    peek_version,
    version_mismatch,
)
from pdkit.registry_session import RegistrySession
from pdkit.stop_signals import on_stop_signal
from pdkit.streams import output_lines

EXIT_ENGINE_DIED = 3
EXIT_STARTUP_TIMEOUT = 4
EXIT_BAD_ENGINE_BUILD = 5
# The engine cannot bind one of its ports because another process holds it: restarting cannot help.
EXIT_PORT_BUSY = 6

# What a failed bind prints: Python's OSError (vLLM's API server, aiohttp) and ZMQ (KV-event replay) alike.
PORT_BUSY_NEEDLE = "address already in use"
# Seconds one probe of the engine may take before the heartbeat reports it unhealthy (PDKIT_PROBE_TIMEOUT_S).
DEFAULT_PROBE_TIMEOUT_S = 3.0

# Engine log lines that mean "this start is broken even if it comes up": LMCache without its compiled
# extension (torch ABI mismatch) silently falls back to slow torch code paths.
FATAL_ENGINE_LINES = {
    "compiled extension not found": (
        "LMCache runs without its compiled extension (built for another torch); "
        "install the lmcache build for this torch (lmcache 0.5.2/0.5.3 for torch 2.11)"
    ),
}

# Counter families (names without ``_total``) -> optional Load fields; summed over engines / label sets.
_CACHE_COUNTERS = {
    "vllm:prefix_cache_hits": "prefix_cache_hits",
    "vllm:prefix_cache_queries": "prefix_cache_queries",
    "pdkit:lmcache_hit_tokens": "lmcache_hit_tokens",
}


def parse_load(metrics_text: str) -> Load:
    """Load from a vLLM ``/metrics`` page: running/waiting summed over engines, KV usage the max, and
    the prefix-cache counters when the page has them (absent families stay None)."""
    fams = prom.families(metrics_text)
    present = {fam.name for fam in fams}
    counters = {field: prom.total(fams, name + "_total") for name, field in _CACHE_COUNTERS.items() if name in present}
    return Load.model_validate(
        {
            "running": int(prom.total(fams, "vllm:num_requests_running")),
            "waiting": int(prom.total(fams, "vllm:num_requests_waiting")),
            "kv_usage": max([0.0, *(s.value for s in prom.samples(fams, "vllm:kv_cache_usage_perc"))]),
            **counters,
        }
    )


@dataclass
class AgentSettings:
    """Everything one agent needs; built by ``pdkit worker`` from flags or from the launch plan."""

    info: WorkerInfo
    frontend: str
    engine_argv: list[str]
    engine_env: dict[str, str] = field(default_factory=dict)
    token: str | None = None
    startup_timeout_s: float = 900.0
    heartbeat_interval_s: float = 1.0
    stop_grace_s: float = 30.0
    probe_timeout_s: float = DEFAULT_PROBE_TIMEOUT_S


class WorkerAgent:
    """Runs the engine, keeps the frontend informed, stops cleanly."""

    def __init__(self, settings: AgentSettings) -> None:
        self.s = settings
        self.engine: asyncio.subprocess.Process | None = None
        self._stop = asyncio.Event()
        self._ctx = zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        self._registered = False
        # token, the session key from the registration's ack (proves this agent owns its id), heartbeat seq
        self._session = RegistrySession(settings.info, settings.token)
        self._version_warned = False
        self._forward: asyncio.Task[None] | None = None
        self.fatal: str | None = None
        self.port_busy_line: str | None = None  # the engine's own "address already in use" line, if any
        self._load = Load()  # the last probe's result; the engine had just answered /health

    @property
    def worker_id(self) -> str:
        return self.s.info.worker_id

    def _log(self, msg: str) -> None:
        print(f"pdkit-agent[{self.worker_id}]: {msg}", file=sys.stderr, flush=True)

    async def run(self) -> int:
        on_stop_signal(self._stop.set)
        try:
            busy = busy_port(self.s.info)
            if busy:
                self._log(f"error: {busy}")
                return EXIT_PORT_BUSY
            await self._start_engine()
            ready = await self._wait_healthy()
            if self.fatal:
                return EXIT_BAD_ENGINE_BUILD
            if ready != 0:
                return ready
            await self._learn_max_model_len()
            self._connect()
            await self._register(wait_s=5.0)
            rc = await self._serve()
            return EXIT_BAD_ENGINE_BUILD if self.fatal else rc
        finally:
            await self._shutdown()

    async def _start_engine(self) -> None:
        env = {**os.environ, **self.s.engine_env}
        prom_dir = env.get("PROMETHEUS_MULTIPROC_DIR")
        if prom_dir:
            # Own, empty directory per worker: stale or shared files mix other processes' counters.
            shutil.rmtree(prom_dir, ignore_errors=True)
            os.makedirs(prom_dir, exist_ok=True)
        self._log(f"starting engine: {' '.join(self.s.engine_argv[:6])} ...")
        self.engine = await asyncio.create_subprocess_exec(
            *tie_to_parent(self.s.engine_argv),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            limit=1 << 20,
        )
        self._forward = asyncio.create_task(self._forward_output(self.engine))

    async def _forward_output(self, proc: asyncio.subprocess.Process) -> None:
        """Pass the engine's output through, watching for lines that mean a broken start."""
        assert proc.stdout is not None
        out = sys.stdout.buffer
        async for raw in output_lines(proc.stdout):
            out.write(raw)
            out.flush()
            line = raw.decode(errors="replace")
            if self.port_busy_line is None and PORT_BUSY_NEEDLE in line.lower():
                self.port_busy_line = line.strip()[-300:]
            for needle, why in FATAL_ENGINE_LINES.items():
                if needle in line:
                    self._log(f"error: {why}; stopping the engine")
                    self.fatal = why
                    self._stop.set()

    async def _wait_healthy(self) -> int:
        assert self.engine is not None
        deadline = time.monotonic() + self.s.startup_timeout_s
        t0 = time.monotonic()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while time.monotonic() < deadline:
                if self.engine.returncode is not None:
                    return self._engine_exit_code("during start-up")
                if self._stop.is_set():
                    return 0
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    async with http.get(f"{self.s.info.url}/health") as resp:
                        if resp.status == 200:
                            self._log(f"engine healthy after {time.monotonic() - t0:.1f} s")
                            return 0
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.engine.wait(), timeout=0.5)
        self._log(
            f"engine not healthy after {self.s.startup_timeout_s:.0f} s; "
            "raise startup_timeout_s or read the engine log above"
        )
        return EXIT_STARTUP_TIMEOUT

    def _connect(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 500)
        sock.setsockopt_string(zmq.IDENTITY, f"{self.worker_id}-{os.getpid()}")
        sock.connect(self.s.frontend)
        self._sock = sock

    async def _send(self, msg: Any) -> None:
        assert self._sock is not None
        await self._sock.send(encode(msg))

    async def _register(self, wait_s: float = 0.0) -> None:
        """Send the registration; with ``wait_s``, read its ack first (the first registration, before
        the ack reader runs), so that the first heartbeat already carries the session key."""
        await self._send(self._session.register())
        if wait_s > 0 and self._sock is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await self._on_reply(await asyncio.wait_for(self._sock.recv(), timeout=wait_s))
        self._registered = True
        self._log(f"registered with {self.s.frontend} as {self.s.info.role} at {self.s.info.url}")

    async def _serve(self) -> int:
        assert self.engine is not None
        tasks = [
            asyncio.create_task(self._heartbeats()),
            asyncio.create_task(self._acks()),
            asyncio.create_task(self._probe_loop()),
        ]
        engine_done = asyncio.create_task(self.engine.wait())
        stop = asyncio.create_task(self._stop.wait())
        try:
            done, _ = await asyncio.wait({engine_done, stop, *tasks}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (*tasks, stop):
                t.cancel()
        if engine_done in done:
            rc = self.engine.returncode
            if self.port_busy_line is not None:
                return self._engine_exit_code("")
            self._log(f"engine exited with code {rc}")
            return EXIT_ENGINE_DIED if rc == 0 else (rc or EXIT_ENGINE_DIED)
        engine_done.cancel()
        return 0

    def _engine_exit_code(self, when: str) -> int:
        """The agent's exit code for an engine that exited, with one line saying why."""
        assert self.engine is not None
        rc = self.engine.returncode
        if self.port_busy_line is not None:
            self._log(
                f"error: the engine could not bind a port (another process holds it): {self.port_busy_line}; "
                "stop that process or move this worker to free ports"
            )
            return EXIT_PORT_BUSY
        self._log(f"engine exited {when} with code {rc}".replace("  ", " "))
        return EXIT_ENGINE_DIED

    async def _learn_max_model_len(self) -> None:
        """Fill ``WorkerInfo.max_model_len`` from the engine's ``/v1/models`` before registering."""
        if self.s.info.max_model_len is not None:
            return
        found = await engine_max_model_len(self.s.info.url, self.s.info.model, self.s.probe_timeout_s)
        if found is not None:
            self.s.info = self._session.info = self.s.info.model_copy(update={"max_model_len": found})

    async def _probe_loop(self) -> None:
        """Probe the engine once per heartbeat interval; each probe bounded by ``probe_timeout_s``.

        Runs beside the heartbeats rather than inside them, so a hung engine delays no heartbeat: the
        frontend keeps hearing from the agent (and learns the engine is unhealthy) instead of reaping it.
        """
        async with aiohttp.ClientSession() as http:
            while True:
                load = await probe_engine(http, self.s.info.url, self.s.probe_timeout_s)
                if load.healthy != self._load.healthy:
                    self._log(
                        f"engine unhealthy: {load.unhealthy_reason}" if not load.healthy else "engine healthy again"
                    )
                self._load = load
                await asyncio.sleep(self.s.heartbeat_interval_s)

    async def _heartbeats(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while True:
                load = await self._scrape(http)
                await self._send(self._session.heartbeat(load))
                await asyncio.sleep(self.s.heartbeat_interval_s)

    async def _scrape(self, http: aiohttp.ClientSession) -> Load:
        """The load (and health) of the engine's last probe: :meth:`_probe_loop` keeps it current."""
        return self._load

    async def _acks(self) -> None:
        assert self._sock is not None
        while True:
            raw = await self._sock.recv()
            await self._on_reply(raw)

    async def _on_reply(self, raw: bytes) -> None:
        """One frame from the frontend: keep the session key, report refusals, re-register on request."""
        try:
            msg = parse_message(raw)
        except ValueError:
            theirs = peek_version(raw)
            if theirs is not None and not self._version_warned:
                self._version_warned = True
                self._log(f"error: cannot read the frontend's reply: {version_mismatch(theirs, 'this agent')}")
            return
        if not isinstance(msg, Ack):
            return
        if not msg.ok:
            self._log(f"frontend says: {msg.error}")
        if self._session.on_ack(msg):
            # The frontend restarted or reaped us: our key is void, a fresh registration gets one.
            await self._register()

    async def _shutdown(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(Exception):
                if self._registered:
                    await self._send(self._session.deregister("agent stopping"))
                    await asyncio.sleep(0.05)
            self._sock.close()
        await stop_process(self.engine, self.s.stop_grace_s)
        if self._forward is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._forward, timeout=2)


def busy_port(info: WorkerInfo) -> str | None:
    """A line naming the first of the engine's ports another process already listens on, else None.

    Checked before the engine starts: an engine that fails to bind prints a long traceback and exits,
    and restarting it cannot help.  Binds with SO_REUSEADDR like servers do, so ports in TIME_WAIT after
    a previous engine of this worker do not count; only EADDRINUSE counts (a host that is not local is
    the engine's own business).
    """
    from urllib.parse import urlparse

    url = urlparse(info.url)
    ports: list[tuple[str, str | None, int | None]] = [("HTTP", url.hostname, url.port)]
    if info.kv_events_replay_endpoint:
        replay = urlparse(info.kv_events_replay_endpoint)
        ports.append(("KV-event replay", replay.hostname, replay.port))
    if info.nixl_side_channel and ":" in info.nixl_side_channel:
        side_host, _, side_port = info.nixl_side_channel.rpartition(":")
        ports.append(("NIXL side channel", side_host, int(side_port) if side_port.isdigit() else None))
    for what, named_host, port in ports:
        if port is None:
            continue
        host = "0.0.0.0" if not named_host or named_host == "*" else named_host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host.strip("[]"), port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    continue
                return (
                    f"port {port} ({what} of the engine at {host}) is already in use by another process; "
                    f"stop it (`ss -ltnp 'sport = :{port}'` shows it) or give this worker free ports"
                )
    return None


async def probe_engine(http: aiohttp.ClientSession, base_url: str, timeout_s: float) -> Load:
    """One look at the engine: ``/health``, then ``/metrics``, each within ``timeout_s``.

    Returns the scraped load, or ``healthy=False`` with the reason when either does not answer in time,
    fails or answers an error (vLLM answers 503 on /health once its engine core is dead).  Both requests
    run in the calling task (aiohttp's own timeout, no helper tasks): a probe cancelled when the agent
    stops leaves no orphaned task behind to log a traceback.
    """
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    text = ""
    for path in ("/health", "/metrics"):
        try:
            async with http.get(f"{base_url}{path}", timeout=timeout) as resp:
                status, text = resp.status, await resp.text()
        except asyncio.TimeoutError:
            return Load(
                healthy=False,
                unhealthy_reason=f"engine did not answer {path} within {timeout_s:g} s (hung or stopped)",
            )
        except (aiohttp.ClientError, OSError) as exc:
            detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            return Load(healthy=False, unhealthy_reason=f"engine {path} failed: {detail}"[:500])
        if status != 200:
            return Load(healthy=False, unhealthy_reason=f"engine {path} answered HTTP {status}")
    try:
        return parse_load(text)
    except ValueError as exc:
        return Load(healthy=False, unhealthy_reason=f"engine /metrics is not a Prometheus page: {exc}"[:500])


async def engine_max_model_len(base_url: str, model: str, timeout_s: float) -> int | None:
    """``max_model_len`` of ``model`` in the engine's ``/v1/models`` (vLLM reports it), else None."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http:
            async with http.get(f"{base_url}/v1/models") as resp:
                data = await resp.json(content_type=None) if resp.status == 200 else None
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
        return None
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return None
    entries = [e for e in entries if isinstance(e, dict)]
    chosen = next((e for e in entries if e.get("id") == model), entries[0] if entries else None)
    value = chosen.get("max_model_len") if chosen else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


async def stop_process(proc: asyncio.subprocess.Process | None, grace_s: float) -> None:
    """SIGTERM, wait ``grace_s``, then SIGKILL; never leaves the child running."""
    if proc is None or proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), timeout=grace_s)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
