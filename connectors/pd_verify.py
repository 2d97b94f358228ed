"""``verify_transfers`` (issue 9): KV block fingerprints sent by prefill, checked by decode.

Flow (design and the vLLM 0.26.0 ordering argument in docs/pd-connector.md, "verify_transfers"):

* **prefill scheduler** (:class:`ProducerFingerprints`): tracks the block ids of each
  ``do_remote_decode`` request from the scheduler output; in the step whose forward completes the
  prompt it asks the workers (``PdConnectorMetadata.fingerprint_blocks``) to fingerprint them.
* **prefill worker** (:class:`WorkerFingerprints`): after that forward (``build_connector_worker_meta``,
  stream-ordered after the kernels that wrote the blocks) computes one int64 per block for its own
  rank and returns them in ``PdWorkerMetadata.fingerprints``.
* **prefill scheduler**: in vLLM 0.26.0 ``request_finished`` runs before ``update_connector_output`` of
  the same ``update_from_output`` call, and the ``EngineCoreOutput`` holding the returned params is only
  serialised after that call returns.  So ``request_finished`` keeps a reference to the params dict it
  returns, and ``update_connector_output`` (same call, a few lines later) writes the fingerprints into
  it under :data:`FINGERPRINTS_KEY`, aligned with NIXL's ``remote_block_ids``.  If they arrived earlier
  (a request that outlived its prompt step) ``request_finished`` attaches them directly.
* **decode scheduler**: when NIXL schedules the pull, the expected values are cut to the blocks NIXL
  actually reads (the last ``len(local)`` remote blocks, as NIXL trims for a local prefix hit) and
  sent to the workers with the local block ids (``PdConnectorMetadata.verify``).
* **decode worker**: when NIXL reports the request in ``finished_recving``, recompute over the local
  ids, compare, and report mismatching blocks in ``get_block_ids_with_load_errors``; vLLM (with
  ``kv_load_failure_policy="recompute"``) recomputes from the first bad block on.

Each TP rank hashes its own heads, so the payload holds one list per rank (keyed by the rank as a
string, JSON-safe); a decode rank with no list of its own (different TP, PP) skips the check.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pdkit.kernels.fingerprint import compare

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

    from pdkit.kernels.fingerprint import KVFingerprinter

FINGERPRINTS_KEY = "pdkit_kv_fingerprints"
PAYLOAD_VERSION = 1
# Fault injection for the GPU check (decode worker only): corrupt one received block in each of the first
# N verified requests ("all": every one) before verifying, to prove the mismatch path end to end.
INJECT_FAULT_ENV = "PDKIT_VERIFY_INJECT_FAULT"
_MEMORY = 65536


def rank_key() -> str:
    """This worker's rank among the KV-holding workers (TP rank, offset by PP stage); "0" without a group."""
    try:
        from vllm.distributed.parallel_state import get_pp_group, get_tp_group

        tp = get_tp_group()
        pp_rank = get_pp_group().rank_in_group
        return str(pp_rank * tp.world_size + tp.rank_in_group)
    except (AssertionError, AttributeError, ImportError):
        return "0"  # no distributed groups: a single worker (CPU tests)


def _bounded_put(d: OrderedDict[str, Any], key: str, value: Any) -> None:
    d[key] = value
    d.move_to_end(key)
    while len(d) > _MEMORY:
        d.popitem(last=False)


class DeviceClock:
    """How long verification keeps the device busy: what it adds to a request's time to first token.

    On CUDA, events around the work (fingerprint kernels plus the 8-byte-per-block copy to the host)
    measure the stream time it takes, without the forward pass queued before it and without adding a
    synchronisation of its own (the caller's ``.tolist()`` already waits).  On CPU, the wall clock.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds_since(self, started: Any) -> float:
        """Call after the timed work's results reached the host (so its events have completed)."""
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return float(started.elapsed_time(end)) / 1e3
        return time.perf_counter() - float(started)


@dataclass
class VerifySpec:
    """Decode worker: which local blocks to check for one request, and the values expected per rank."""

    local_block_ids: list[int]
    expected: dict[str, list[int]]


# ---------------------------------------------------------------------------------------- prefill
class ProducerFingerprints:
    """Prefill scheduler side: when to fingerprint, and getting the values into kv_transfer_params."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self._tracked: dict[str, tuple[Request, list[int]]] = {}
        self._ready: OrderedDict[str, dict[str, Any]] = OrderedDict()  # rid -> {"block_ids", "ranks"}
        self._to_fill: dict[str, dict[str, Any]] = {}  # rid -> params dict returned by request_finished

    def track(self, request: Request) -> None:
        self._tracked.setdefault(request.request_id, (request, []))

    def due(self, scheduler_output: SchedulerOutput) -> dict[str, list[int]]:
        """Block ids to fingerprint this step: tracked requests whose prompt this step's forward completes."""
        if not self._tracked:  # every prefill step calls this; most have nothing to fingerprint
            return {}
        for new in scheduler_output.scheduled_new_reqs:
            if new.req_id in self._tracked:
                self._tracked[new.req_id][1][:] = list(new.block_ids[0]) if new.block_ids else []
        cached = scheduler_output.scheduled_cached_reqs
        for rid, new_ids in zip(cached.req_ids, cached.new_block_ids, strict=False):
            if rid in self._tracked and new_ids is not None:
                ids = self._tracked[rid][1]
                if rid in cached.resumed_req_ids:
                    ids[:] = list(new_ids[0])
                else:
                    ids.extend(new_ids[0])
        due: dict[str, list[int]] = {}
        for rid, n in scheduler_output.num_scheduled_tokens.items():
            tracked = self._tracked.get(rid)
            if tracked is None:
                continue
            request, ids = tracked
            if request.num_computed_tokens + n >= request.num_prompt_tokens:
                due[rid] = ids[: -(-request.num_prompt_tokens // self.block_size)]
                del self._tracked[rid]
        return due

    def on_request_finished(self, request: Request, params: dict[str, Any] | None) -> None:
        """Attach the fingerprints now if they are here, else fill ``params`` in update_connector_output."""
        rid = request.request_id
        self._tracked.pop(rid, None)
        if not params or not params.get("remote_block_ids"):
            self._ready.pop(rid, None)
            return
        ready = self._ready.pop(rid, None)
        if ready is not None:
            attach(params, ready, self.block_size)
        else:
            self._to_fill[rid] = params

    def on_worker_fingerprints(self, fingerprints: dict[str, dict[str, Any]]) -> None:
        for rid, entry in fingerprints.items():
            params = self._to_fill.pop(rid, None)
            if params is not None:
                attach(params, entry, self.block_size)
            else:
                _bounded_put(self._ready, rid, entry)

    def end_of_update(self) -> list[str]:
        """Params still unfilled after the update that should have filled them (sent unverified)."""
        missed = list(self._to_fill)
        self._to_fill.clear()
        return missed


def attach(params: dict[str, Any], entry: dict[str, Any], block_size: int) -> bool:
    """Write the fingerprints of NIXL's ``remote_block_ids`` (in that order) into ``params``."""
    remote = list(params["remote_block_ids"][0])
    by_rank: dict[str, list[int]] = {}
    for rank, values in entry["ranks"].items():
        table = dict(zip(entry["block_ids"], values, strict=True))
        if any(b not in table for b in remote):
            return False
        by_rank[str(rank)] = [table[b] for b in remote]
    params[FINGERPRINTS_KEY] = {"v": PAYLOAD_VERSION, "block_size": block_size, "ranks": by_rank}
    return True


# ---------------------------------------------------------------------------------------- decode
def expected_for_pull(payload: Any, local_block_ids: list[int], block_size: int) -> dict[str, list[int]] | None:
    """The expected values of the blocks NIXL pulls into ``local_block_ids`` (None: cannot verify).

    NIXL reads the *last* ``len(local)`` remote blocks (the others are a local prefix hit), so the
    expected lists are cut the same way.
    """
    if not isinstance(payload, dict) or payload.get("v") != PAYLOAD_VERSION:
        return None
    if payload.get("block_size") != block_size or not local_block_ids:
        return None
    n = len(local_block_ids)
    out: dict[str, list[int]] = {}
    for rank, values in (payload.get("ranks") or {}).items():
        if len(values) < n:
            return None
        out[str(rank)] = [int(v) for v in values[-n:]]
    return out or None


def _fault_budget(raw: str | None) -> int:
    if not raw:
        return 0
    if raw.strip().lower() == "all":
        return -1
    try:
        return max(int(raw), 0)
    except ValueError:
        return 0


class WorkerFingerprints:
    """Worker side: compute (prefill) and check (decode) fingerprints of this rank's KV cache.

    On decode, ``INJECT_FAULT_ENV`` (read once, here) flips one bit of one received block before the
    check: the GPU check's proof that a corrupted block is caught and recomputed.
    """

    def __init__(self, fingerprinter: KVFingerprinter, rank: str, *, inject_faults: str | None = None):
        self.fp = fingerprinter
        self.rank = rank
        self._faults_left = _fault_budget(os.environ.get(INJECT_FAULT_ENV) if inject_faults is None else inject_faults)
        self._to_check: OrderedDict[str, VerifySpec] = OrderedDict()
        self._computed: dict[str, dict[str, Any]] = {}
        self._bad: set[int] = set()
        self.checked_blocks = 0
        self.mismatch_blocks = 0
        self.injected_blocks: list[int] = []
        # Cost counters (pdkit:kv_fingerprint_seconds / pdkit:kv_verify_seconds): device time spent.
        self.clock = DeviceClock(fingerprinter.device)
        self.fingerprint_seconds = 0.0
        self.fingerprinted_requests = 0
        self.verify_seconds = 0.0
        self.verified_requests = 0
        self._drained: dict[str, int] = {}

    # prefill
    def compute(self, due: dict[str, list[int]]) -> None:
        for rid, block_ids in due.items():
            started = self.clock.start()
            values = self.fp(block_ids).tolist() if block_ids else []
            self.fingerprint_seconds += self.clock.seconds_since(started)
            self.fingerprinted_requests += 1
            self._computed[rid] = {"block_ids": list(block_ids), "ranks": {self.rank: values}}

    def take_computed(self) -> dict[str, dict[str, Any]]:
        out, self._computed = self._computed, {}
        return out

    # decode
    def expect(self, specs: dict[str, VerifySpec]) -> None:
        for rid, spec in specs.items():
            _bounded_put(self._to_check, rid, spec)

    def check(self, finished_recving: set[str]) -> list[tuple[str, list[int]]]:
        """Verify every request whose pull finished; returns (request, bad block ids) for mismatches."""
        mismatches: list[tuple[str, list[int]]] = []
        for rid in sorted(finished_recving):
            spec = self._to_check.pop(rid, None)
            if spec is None or self.rank not in spec.expected:
                continue
            ids = spec.local_block_ids
            if self._faults_left != 0:
                self._corrupt(ids[len(ids) // 2])
                self._faults_left -= 1 if self._faults_left > 0 else 0
            started = self.clock.start()
            bad = compare(spec.expected[self.rank], self.fp(ids), ids)
            self.verify_seconds += self.clock.seconds_since(started)
            self.verified_requests += 1
            self.checked_blocks += len(ids)
            if bad:
                self.mismatch_blocks += len(bad)
                self._bad.update(bad)
                mismatches.append((rid, bad))
        return mismatches

    def drain_counters(self) -> dict[str, int]:
        """What changed since the last call, as PdConnectorStats counters (plain ints; time in µs)."""
        now = {
            "kv_verify_checked_blocks": self.checked_blocks,
            "kv_verify_mismatch_blocks": self.mismatch_blocks,
            "kv_verify_requests": self.verified_requests,
            "kv_verify_us": round(self.verify_seconds * 1e6),
            "kv_fingerprint_requests": self.fingerprinted_requests,
            "kv_fingerprint_us": round(self.fingerprint_seconds * 1e6),
        }
        delta = {key: value - self._drained.get(key, 0) for key, value in now.items()}
        self._drained = now
        return {key: value for key, value in delta.items() if value}

    def forget(self, request_ids: set[str]) -> None:
        for rid in request_ids:
            self._to_check.pop(rid, None)

    def take_bad_blocks(self) -> set[int]:
        out, self._bad = self._bad, set()
        return out

    def _corrupt(self, block_id: int) -> None:
        """Flip the lowest bit of the first word of ``block_id`` in the first layer (fault injection)."""
        row = self.fp.layers[0][block_id * self.fp.blocks_per_id]
        while row.dim() > 1:
            row = row[0]
        raw = row.view(torch.uint8)
        raw[0] = raw[0] ^ 1
        self.injected_blocks.append(block_id)
