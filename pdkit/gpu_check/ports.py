"""Free loopback port blocks for rehearsals and tests that start whole deployments on a shared host.

Why here: a deployment's worker groups take ``base + worker index`` ports, so a check needs ``n``
consecutive free ports that no earlier group of the same run was given; the GPU checks, the registry
attack script and the launch tests all need the same search (and the same three per-group bases).
"""

from __future__ import annotations

import random
import socket


def free_port_block(n: int, taken: set[int]) -> int:
    """A base port whose ``n`` consecutive ports are all free now and not in ``taken`` (which it extends).

    A random base in 20000..60000 keeps parallel runs on one host apart; each port is bound once to
    prove it is free (a race with another process remains possible, as with any free-port search).
    """
    rng = random.Random()
    while True:
        base = rng.randrange(20000, 60000 - n)
        block = set(range(base, base + n))
        if block & taken:
            continue
        try:
            for port in block:
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        taken |= block
        return base


#: The port bases one worker group of a deployment config takes, in the order they are searched.
GROUP_PORT_KEYS = ("http_port_base", "kv_events_port_base", "nixl_side_channel_port_base")


def group_port_bases(count: int, taken: set[int]) -> dict[str, int]:
    """Free port blocks for a worker group of ``count`` workers, as the config's ``*_port_base`` keys
    (HTTP, KV events, NIXL side channel), none in ``taken`` (which it extends)."""
    return {key: free_port_block(count, taken) for key in GROUP_PORT_KEYS}
