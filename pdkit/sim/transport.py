"""How simulated KV moves from a prefill worker to a decode worker.

Two transports, one protocol (the NixlConnector's pull model: the decode reads, then tells the
prefill it is done so the prefill frees its leased blocks):

* ``http`` (default, no extra dependency): the decode POSTs ``/sim/kv/pull`` to the prefill's side
  channel; the reply carries the leased blocks' token ids (the simulated KV's content) and the lease is
  released in the same round trip.
* ``nixl``: real NIXL (UCX backend) over host memory.  Each worker registers one host buffer with a
  slot of ``wire_bytes_per_block`` bytes per KV block; a leased block's slot holds its token ids.  The
  decode fetches the prefill's agent metadata once (``GET /sim/nixl/handshake``, as vLLM's NIXL
  handshake does over its ZMQ side channel), READs the slots of the blocks it needs into its own slots
  with a notification naming the request, and checks the tokens it read.  The prefill frees the lease
  when the notification arrives and zeroes freed slots, so a read after expiry finds zeros and fails --
  the simulator's stand-in for "the blocks were reused" (real vLLM 0.26 does not detect that case).

Simulated byte counts (what the latency model and metrics use) are the model's real KV sizes; the
bytes on the wire in ``nixl`` mode are the (much smaller) slots.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import ClientSession

logger = logging.getLogger(__name__)


class KVTransferError(RuntimeError):
    """Pulling KV from the remote prefill worker failed (reason in the message, for logs/metrics)."""


@dataclass
class PullSpec:
    """One decode-side read: the remote tail blocks to read into the given local blocks."""

    params: dict[str, Any]
    remote_block_ids: list[int]
    first_block_index: int
    local_block_ids: list[int]


@dataclass
class PullResult:
    token_ids: list[int]
    num_bytes: int


class KVTransport(Protocol):
    """What the engine needs from a transport (both roles live in every non-agg worker)."""

    name: str

    async def pull(self, spec: PullSpec) -> PullResult: ...

    def on_lease(self, lease_id: str, block_ids: Sequence[int], token_ids: Sequence[int]) -> None: ...

    def on_free(self, block_ids: Sequence[int]) -> None: ...

    async def close(self) -> None: ...


class HttpTransport:
    """Side-channel round trip over HTTP (see the module docstring)."""

    name = "http"

    def __init__(self, session: ClientSession) -> None:
        self._session = session

    async def pull(self, spec: PullSpec) -> PullResult:
        p = spec.params
        url = f"http://{p['remote_host']}:{p['remote_port']}/sim/kv/pull"
        body = {
            "remote_request_id": p["remote_request_id"],
            "remote_engine_id": p["remote_engine_id"],
            "block_ids": spec.remote_block_ids,
            "first_block_index": spec.first_block_index,
        }
        async with self._session.post(url, json=body) as resp:
            data = await resp.json(content_type=None)
            if resp.status != 200:
                raise KVTransferError(f"side channel {url} answered {resp.status}: {data.get('error')}")
        return PullResult(list(data["token_ids"]), int(data["num_bytes"]))

    def on_lease(self, lease_id: str, block_ids: Sequence[int], token_ids: Sequence[int]) -> None:
        return None

    def on_free(self, block_ids: Sequence[int]) -> None:
        return None

    async def close(self) -> None:
        return None


async def send_heartbeat(session: ClientSession, host: str, port: int, engine_id: str, request_ids: list[str]) -> None:
    """Ask a prefill worker to extend the leases of requests still queued here (vLLM's D->P heartbeat).

    Both transports send it over the HTTP side channel; a lost heartbeat only shortens a lease.
    """
    url = f"http://{host}:{port}/sim/kv/heartbeat"
    async with session.post(url, json={"remote_engine_id": engine_id, "request_ids": request_ids}) as resp:
        await resp.read()


def nixl_available() -> bool:
    """True when the ``nixl`` package imports (it needs no GPU for host memory)."""
    try:
        import nixl._api  # noqa: F401
    except Exception:  # ImportError, or a broken native backend
        return False
    return True


class NixlTransport:
    """Real NIXL READs between host-memory slots (see the module docstring)."""

    name = "nixl"

    def __init__(
        self,
        agent_name: str,
        num_blocks: int,
        block_size: int,
        session: ClientSession,
        *,
        wire_bytes_per_block: int = 0,
        sim_bytes_per_block: int = 0,
        on_read_done: Callable[[str, int], None] | None = None,
    ) -> None:
        from nixl._api import nixl_agent, nixl_agent_config

        self.block_size = block_size
        self.slot = max(wire_bytes_per_block, 4 * (block_size + 1))
        self.sim_bytes_per_block = sim_bytes_per_block
        self._session = session
        self._on_read_done = on_read_done
        self._buf = (ctypes.c_char * (self.slot * num_blocks))()
        self.base_addr = ctypes.addressof(self._buf)
        self.agent = nixl_agent(agent_name, nixl_agent_config(backends=["UCX"]))
        self.agent_name = agent_name
        self._reg = self.agent.register_memory([(self.base_addr, self.slot * num_blocks, 0, "")], "DRAM")
        self._remotes: dict[str, tuple[str, int, int]] = {}  # engine id -> (agent name, base, slot)
        self._poller: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------------- producer side
    def handshake(self) -> dict[str, Any]:
        """What a decode needs to read from us (served at ``GET /sim/nixl/handshake``)."""
        return {
            "agent_metadata": base64.b64encode(self.agent.get_agent_metadata()).decode(),
            "base_addr": self.base_addr,
            "slot_bytes": self.slot,
        }

    def _write(self, block_id: int, tokens: Sequence[int]) -> None:
        padded = list(tokens) + [-1] * (self.block_size - len(tokens))
        data = struct.pack(f"<i{self.block_size}i", len(tokens), *padded)
        ctypes.memmove(self.base_addr + block_id * self.slot, data, len(data))

    def _read(self, block_id: int) -> list[int]:
        raw = ctypes.string_at(self.base_addr + block_id * self.slot, 4 * (self.block_size + 1))
        n, *tokens = struct.unpack(f"<i{self.block_size}i", raw)
        return list(tokens[: max(0, min(n, self.block_size))])

    def on_lease(self, lease_id: str, block_ids: Sequence[int], token_ids: Sequence[int]) -> None:
        bs = self.block_size
        for i, b in enumerate(block_ids):
            self._write(b, token_ids[i * bs : (i + 1) * bs])
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll_notifs())

    def on_free(self, block_ids: Sequence[int]) -> None:
        for b in block_ids:
            ctypes.memset(self.base_addr + b * self.slot, 0, self.slot)

    async def _poll_notifs(self) -> None:
        while True:
            for msgs in self.agent.get_new_notifs().values():
                for msg in msgs:
                    req_id, _, nblocks = msg.decode().rpartition(":")
                    if self._on_read_done is not None:
                        self._on_read_done(req_id, int(nblocks or 0))
            await asyncio.sleep(0.002)

    # --------------------------------------------------------------------------- decode side
    async def _remote(self, params: dict[str, Any]) -> tuple[str, int, int]:
        engine_id = str(params["remote_engine_id"])
        if engine_id not in self._remotes:
            url = f"http://{params['remote_host']}:{params['remote_port']}/sim/nixl/handshake"
            async with self._session.get(url) as resp:
                if resp.status != 200:
                    raise KVTransferError(f"NIXL handshake with {url} failed: {resp.status}")
                hs = await resp.json()
            name = self.agent.add_remote_agent(base64.b64decode(hs["agent_metadata"]))
            if isinstance(name, bytes):
                name = name.decode()
            if name != engine_id:
                raise KVTransferError(f"remote agent is {name!r}, expected engine {engine_id!r}")
            self._remotes[engine_id] = (name, int(hs["base_addr"]), int(hs["slot_bytes"]))
        return self._remotes[engine_id]

    async def pull(self, spec: PullSpec) -> PullResult:
        if len(spec.remote_block_ids) != len(spec.local_block_ids):
            raise KVTransferError("remote and local block counts differ")
        name, rbase, rslot = await self._remote(spec.params)
        n = len(spec.local_block_ids)
        notif = f"{spec.params['remote_request_id']}:{n}".encode()
        if n:
            size = min(self.slot, rslot)
            local = self.agent.get_xfer_descs(
                [(self.base_addr + b * self.slot, size, 0) for b in spec.local_block_ids], "DRAM"
            )
            remote = self.agent.get_xfer_descs([(rbase + b * rslot, size, 0) for b in spec.remote_block_ids], "DRAM")
            handle = self.agent.initialize_xfer("READ", local, remote, name, notif)
            try:
                state = self.agent.transfer(handle)
                while state == "PROC":
                    await asyncio.sleep(0.0005)
                    state = self.agent.check_xfer_state(handle)
                if state != "DONE":
                    raise KVTransferError(f"NIXL READ ended in state {state}")
            finally:
                with contextlib.suppress(Exception):
                    self.agent.release_xfer_handle(handle)
        else:  # nothing to read (full local hit): still tell the prefill to free its blocks
            self.agent.send_notif(name, notif)
        tokens = [t for b in spec.local_block_ids for t in self._read(b)]
        return PullResult(tokens, n * self.sim_bytes_per_block)

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        with contextlib.suppress(Exception):
            self.agent.deregister_memory(self._reg)
