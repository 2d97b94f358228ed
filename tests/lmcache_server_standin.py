"""Stand-in for ``lmcache server`` (the real one needs CUDA and the lmcache package): the same flags pdkit
passes and the same readiness contract, ``GET /healthcheck`` on ``--http-host``/``--http-port`` answering
503 until it is "initialised" (``--init-delay-s``) and 200 after; it also binds ``--port`` (TCP, like the
real ZMQ request server) so a busy port fails it the same way."""

from __future__ import annotations

import argparse
import socket
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=5555)
    parser.add_argument("--http-host", default="127.0.0.1")
    parser.add_argument("--http-port", type=int, default=8080)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--l1-size-gb", type=float, default=None)
    parser.add_argument("--eviction-policy", default=None)
    parser.add_argument("--init-delay-s", type=float, default=0.3)
    args = parser.parse_args()
    if args.l1_size_gb is not None and args.eviction_policy is None:
        # As lmcache 0.5.6 does (v1/distributed/config.py): the legacy L1 flags need both.
        raise SystemExit("Legacy L1 configuration requires --l1-size-gb and --eviction-policy")
    requests = socket.socket()
    requests.bind((args.host, args.port))
    requests.listen()
    ready_at = time.monotonic() + args.init_delay_s

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path != "/healthcheck":
                self.send_error(404)
                return
            ok = time.monotonic() >= ready_at
            body = b'{"status": "healthy"}' if ok else b'{"status": "unhealthy"}'
            self.send_response(200 if ok else 503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    print(f"stand-in lmcache server: requests on {args.port}, http on {args.http_port}", flush=True)
    ThreadingHTTPServer((args.http_host, args.http_port), Handler).serve_forever()


if __name__ == "__main__":
    sys.exit(main())
