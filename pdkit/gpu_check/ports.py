"""Free loopback port blocks for rehearsals and tests that start whole deployments on a shared host.

Why here: a deployment's worker groups take ``base + worker index`` ports, so a check needs ``n``
consecutive free ports that no earlier group of the same run was given; the GPU checks, the registry
attack script and the launch tests all need the same search.
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
