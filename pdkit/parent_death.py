"""Run a command that is killed when its parent dies: ``python -m pdkit.parent_death PID -- CMD ARGS...``.

Why: the worker agent starts the engine as its child.  When the agent is killed with SIGKILL it cannot
stop the engine, which then keeps its ports and GPU memory, so every restart of the agent fails on
"Address already in use".  Linux's ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` makes the kernel kill the
engine the moment its parent goes, however the parent died.

Why a tiny exec wrapper rather than ``preexec_fn``: the agent runs threads (ZMQ's I/O thread, asyncio's
child watcher), and code between ``fork`` and ``exec`` in a threaded process can deadlock.  The wrapper
sets the flag in a fresh single-threaded process and then ``exec``s the engine, which keeps the flag
(it is cleared only for set-user-ID programs) and the wrapper's PID.

Caveats: the signal fires when the *thread* that forked the child exits, not the process; the agent
forks from its event-loop thread, which lives as long as the agent.  If the parent is already gone
before the flag is set, the wrapper sees another parent PID and exits instead of starting an orphan.
The flag covers the engine process only; engine children (vLLM's EngineCore, workers) share the
agent's process group, which the supervisor kills as a whole when an agent dies.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
EXIT_PARENT_GONE = 3  # the agent's "engine died" code: the supervisor restarts the agent as usual


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent thread exits; False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def wrap(argv: list[str], parent_pid: int | None = None) -> list[str]:
    """``argv`` run through this wrapper, tied to ``parent_pid`` (default: the calling process)."""
    pid = os.getpid() if parent_pid is None else parent_pid
    return [sys.executable, "-m", "pdkit.parent_death", str(pid), "--", *argv]


def main(args: list[str]) -> int:
    if len(args) < 3 or args[1] != "--" or not args[0].isdigit():
        print("usage: python -m pdkit.parent_death PARENT_PID -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    parent, command = int(args[0]), args[2:]
    if not set_parent_death_signal():
        print("pdkit.parent_death: PR_SET_PDEATHSIG unavailable; the engine may outlive its agent", file=sys.stderr)
    if os.getppid() != parent:
        print(f"pdkit.parent_death: parent {parent} is gone; not starting {command[0]}", file=sys.stderr)
        return EXIT_PARENT_GONE
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"pdkit.parent_death: cannot run {command[0]}: {exc.strerror}", file=sys.stderr)
        return 127
    return 0  # not reached: execvp replaces this process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
