"""Pre-flight port check: is every port a launch plan will bind free on this machine?

Why before starting anything: a busy port found by the process that binds it shows up late and badly
(the frontend's KV-events SUB retried forever, so ``pdkit launch`` hung; a busy worker port ended in a
traceback per attempt).  Binding each planned port for an instant, the way the real servers bind, names
the port and its config key in one line while nothing is running yet.

Only ports on hosts of this machine are checked: a bind on an address this machine does not own fails
with EADDRNOTAVAIL, and such a port (a worker on another node) is skipped, not reported.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

from pdkit.errors import ConfigError
from pdkit.plan import LaunchPlan, ProcessSpec

# ProcessSpec.ports names -> the config key that sets them (worker keys are bases: + the worker index).
# (Local workers publish KV events on ipc sockets in the run dir; only a worker off the frontend's host
# binds a "kv_events" TCP port, and the frontend binds none: docs/security.md.)
_FRONTEND_KEYS = {"http": "frontend.port", "zmq": "frontend.zmq_port"}
_WORKER_BASE_KEYS = {
    "http": "http_port_base",
    "kv_events": "kv_events_port_base",
    "nixl_side_channel": "nixl_side_channel_port_base",
}


@dataclass(frozen=True)
class PlannedPort:
    """One port a process of the plan binds, and the config key a person changes to move it."""

    host: str
    port: int
    key: str  # e.g. "decode.http_port_base + 0"
    process: str

    def describe(self) -> str:
        return f"{self.key} = {self.port}"


def planned_ports(plan: LaunchPlan, port_offset: int = 0) -> list[PlannedPort]:
    """Every port the plan's processes listen on.

    ``port_offset``: the deployment's offset, already inside the plan's ports; it is named in each key
    so the arithmetic a person reads adds up (``decode.http_port_base + 0 + port_offset 1000 = 9400``).
    """
    shift = f" + port_offset {port_offset}" if port_offset else ""
    out: list[PlannedPort] = []
    for proc in plan.processes:
        for name, port in proc.ports.items():
            out.append(PlannedPort(proc.host, port, _config_key(proc, name) + shift, proc.name))
    return out


def _config_key(proc: ProcessSpec, name: str) -> str:
    if proc.role == "frontend" and name in _FRONTEND_KEYS:
        return _FRONTEND_KEYS[name]
    if proc.role != "frontend" and name in _WORKER_BASE_KEYS:
        return f"{proc.role}.{_WORKER_BASE_KEYS[name]} + {proc.index}"
    return f"{proc.name} {name} port"


def bind_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound now (e.g. "in use"), or None if it can or the host is not local.

    SO_REUSEADDR like aiohttp's and libzmq's listeners: a port that only has connections in TIME_WAIT
    left (a deployment just stopped) binds for them too, so it is not reported as busy.
    """
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError):
        return None  # not a name this machine resolves: not ours to check
    seen = set()
    for family, kind, proto, _, addr in infos:  # "localhost" may be 127.0.0.1 and ::1: a server binds both
        if addr[:2] in seen:
            continue
        seen.add(addr[:2])
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(addr)
            except OSError as exc:
                if exc.errno == errno.EADDRNOTAVAIL:
                    return None  # an address of another machine
                if exc.errno == errno.EADDRINUSE:
                    return "in use"
                return exc.strerror or str(exc)
    return None


def busy_ports(plan: LaunchPlan, port_offset: int = 0) -> list[tuple[PlannedPort, str]]:
    """The plan's ports that cannot be bound on this machine now, with the reason, in plan order."""
    ports = planned_ports(plan, port_offset)
    return [(p, why) for p in ports if (why := bind_problem(p.host, p.port)) is not None]


def _fix(first: PlannedPort) -> str:
    return (
        f"stop what holds it (`ss -ltnp 'sport = :{first.port}'` shows it), change {first.key.split(' ')[0]}, "
        "or move the whole deployment with --port-offset N (e.g. --port-offset 1000)"
    )


def check_ports_free(plan: LaunchPlan, port_offset: int = 0) -> None:
    """Raise one ConfigError naming the first busy port (and the others that are busy too)."""
    busy = busy_ports(plan, port_offset)
    if not busy:
        return
    first, why = busy[0]
    problem = f"port {first.port} on {first.host} is {why} (needed by {first.process})"
    if len(busy) > 1:
        problem += "; also busy: " + ", ".join(p.describe() for p, _ in busy[1:])
    raise ConfigError(first.describe(), problem, _fix(first))


def busy_port_warnings(plan: LaunchPlan, port_offset: int = 0) -> list[str]:
    """What ``--dry-run`` reports: one warning per busy port (a dry run starts nothing, so no error)."""
    return [
        f"{p.describe()}: port {p.port} on {p.host} is {why} now (needed by {p.process}); launch would stop here"
        for p, why in busy_ports(plan, port_offset)
    ]
