"""Binding a ZMQ socket to a TCP host and port, shared by the frontend's registry and its KV-event SUB.

Why one function: IPv6 hosts need brackets in the endpoint and the ``IPV6`` option, port 0 means "pick
a free one", and a socket whose bind failed must be closed at once -- an open socket would make the
context's ``term()`` wait forever.  Written once, each of these is right everywhere.
"""

from __future__ import annotations

import zmq


def bind_tcp(sock: zmq.Socket, host: str, port: int) -> int:
    """Bind ``sock`` to ``tcp://host:port`` (a free port when ``port`` is 0); returns the bound port.
    On failure the socket is closed and the error raised."""
    endpoint_host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    if ":" in host:
        sock.setsockopt(zmq.IPV6, 1)
    try:
        if port == 0:
            return int(sock.bind_to_random_port(f"tcp://{endpoint_host}"))
        sock.bind(f"tcp://{endpoint_host}:{port}")
        return port
    except zmq.ZMQError:
        sock.close(linger=0)
        raise
