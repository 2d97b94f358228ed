"""The producer side of the simulated NIXL pull protocol: KV blocks a finished prefill holds for a decode.

Why a module of its own: the scheduler (:mod:`pdkit.sim.engine`) only decides *when* a request's blocks
become a lease -- it finished by length or stop with ``do_remote_decode``.  From then on the blocks belong
to this table until a decode has read them (over the HTTP side channel or a NIXL notification), a decode's
heartbeat has pushed their expiry out, or they expired (vLLM's ``kv_lease_duration``; a warning and a
metric, as vLLM logs it).  vLLM's NIXL connector also keeps the requests it sends, with their expiry
times, in its own state rather than in the scheduler's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pdkit.sim.metrics import SimMetrics
from pdkit.sim.settings import SimSettings
from pdkit.sim.transport import KVTransport

logger = logging.getLogger("pdkit.sim.engine")  # the engine's logger: same lines as before the split


@dataclass
class Lease:
    """Blocks a finished prefill holds for a decode worker to pull."""

    block_ids: list[int]
    token_ids: list[int]
    expiry: float


FreeBlocks = Callable[[list[int]], list[int]]  # free blocks in the pool; returns those no request holds now


class LeaseTable:
    """Leases by request id: hold, hand out (``serve_pull``), extend, expire, release."""

    def __init__(
        self,
        settings: SimSettings,
        metrics: SimMetrics,
        kv_bytes_per_token: int,
        free_blocks: FreeBlocks,
        on_release: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.kv_bytes_per_token = kv_bytes_per_token
        self._free_blocks = free_blocks
        self._on_release = on_release  # the engine updates its gauges and wakes its step loop
        self.transport: KVTransport | None = None  # set with the engine's (the server makes it after start-up)
        self.leases: dict[str, Lease] = {}

    def __len__(self) -> int:
        return len(self.leases)

    def __contains__(self, req_id: object) -> bool:
        return req_id in self.leases

    def hold(self, req_id: str, block_ids: list[int], token_ids: list[int]) -> Lease:
        """Take ownership of a finished prefill's blocks for ``kv_lease_s``."""
        lease = self.leases[req_id] = Lease(list(block_ids), token_ids, time.monotonic() + self.settings.kv_lease_s)
        if self.transport is not None:
            self.transport.on_lease(req_id, lease.block_ids, lease.token_ids)
        self.metrics.leases_active.set(len(self.leases))
        return lease

    def serve_pull(self, body: dict[str, Any], engine_id: str) -> dict[str, Any]:
        """HTTP side channel: hand out leased KV and release the lease (the read is done).

        Raises ``KeyError`` for an unknown or expired lease and ``ValueError`` for a wrong engine id.
        """
        if body.get("remote_engine_id") != engine_id:
            raise ValueError(f"engine id {body.get('remote_engine_id')!r} is not this engine ({engine_id})")
        req_id = str(body.get("remote_request_id"))
        lease = self.leases.get(req_id)
        if lease is None:
            raise KeyError(req_id)
        if lease.expiry < time.monotonic():
            self.release(req_id, expired=True)
            raise KeyError(req_id)
        wanted = [int(b) for b in body.get("block_ids", [])]
        first = int(body.get("first_block_index", len(lease.block_ids) - len(wanted)))
        if lease.block_ids[first : first + len(wanted)] != wanted:
            raise ValueError("block ids do not match the lease")
        bs = self.settings.block_size
        tokens = lease.token_ids[first * bs : (first + len(wanted)) * bs]
        num_bytes = self.release(req_id, num_blocks_read=len(wanted))
        return {"token_ids": tokens, "num_bytes": num_bytes, "num_blocks": len(wanted)}

    def read_done(self, req_id: str, num_blocks: int) -> None:
        """A decode finished reading a lease (NIXL notification): free the blocks."""
        if req_id in self.leases:
            self.release(req_id, num_blocks_read=num_blocks)

    def release(self, req_id: str, *, expired: bool = False, num_blocks_read: int = 0) -> int:
        """Free a lease's blocks; returns the simulated bytes that were read from it."""
        lease = self.leases.pop(req_id, None)
        if lease is None:
            return 0
        unheld = self._free_blocks(lease.block_ids)
        if self.transport is not None:
            self.transport.on_free(unheld)
        num_bytes = num_blocks_read * self.settings.block_size * self.kv_bytes_per_token
        if expired:
            logger.warning("releasing expired KV blocks of request %s (no decode read them in time)", req_id)
            self.metrics.leases_expired.inc()
        else:
            self.metrics.kv_transfer_bytes.labels(direction="sent").inc(num_bytes)
        self.metrics.leases_active.set(len(self.leases))
        self._on_release()
        return num_bytes

    def extend(self, engine_id: str, own_engine_id: str, request_ids: list[str]) -> int:
        """A decode's heartbeat: push expiries out by 2/3 of the lease (NIXL's extension)."""
        if engine_id != own_engine_id:
            return 0
        new_expiry = time.monotonic() + self.settings.kv_lease_s * 2 / 3
        n = 0
        for rid in request_ids:
            lease = self.leases.get(rid)
            if lease is not None and lease.expiry >= time.monotonic():
                lease.expiry = max(lease.expiry, new_expiry)
                n += 1
        self.metrics.lease_extensions.inc(n)
        return n

    async def sweep_forever(self, closed: Callable[[], bool]) -> None:
        """Release expired leases, a few times per lease duration, until ``closed()``."""
        interval = max(0.01, min(1.0, self.settings.kv_lease_s / 4))
        while not closed():
            await asyncio.sleep(interval)
            now = time.monotonic()
            for req_id in [r for r, lease in self.leases.items() if lease.expiry < now]:
                self.release(req_id, expired=True)
