"""``verify_restores`` (issue 16): what LMCache loads back is checked against what was saved.

Why: in LMCache's multi-process mode, after the server restarts, restores can be wrong with nothing
logged and HTTP 200 (LMCache#4492: 38/38 requests corrupted).  A wrong restore is a wrong answer, so
PdConnector checks every LMCache load, whichever mode LMCache runs in.

Mechanism (the same kernels and worker plumbing as ``verify_transfers``, connectors/pd_verify.py):

* **save** (scheduler, :class:`RestoreLedger`): every request PdConnector sees is tracked; in the step
  whose forward completes its prompt the workers fingerprint the prompt's blocks (the existing
  ``fingerprint_blocks`` metadata; one int64 per block and TP rank) and send them back in the worker
  metadata.  The ledger keeps them by vLLM's *block hash* of each full block (``request.block_hashes``:
  a hash of the whole prefix up to that block, so equal hashes mean equal content for one model), in
  a bounded LRU.  These are the blocks LMCache stores (whole chunks of the prompt, a subset of them).
* **load** (scheduler): when LMCache is the loader, the loaded range is the full blocks from the local
  prefix hit to ``local + external`` tokens; their expected values come from the ledger by hash, and a
  :class:`~pdkit.connectors.pd_verify.VerifySpec` goes to the workers (``PdConnectorMetadata.
  restore_verify``).  A block the ledger does not know (saved before this engine started, or dropped
  from the LRU) cannot be checked: it is counted as ``lmcache_restore_unverified_blocks``.
* **check** (worker): a synchronous load is complete once the step's forward ran, so the check runs in
  that step's ``get_finished``/``get_transfer_results``; an asynchronous load when LMCache reports the
  request in ``finished_recving``.  Mismatching blocks are reported by
  ``get_block_ids_with_load_errors``: vLLM (``kv_load_failure_policy="recompute"``, which pdkit sets with
  ``verify_restores``) drops that step's output for the request and recomputes from the first bad
  block.  Counted: ``lmcache_restore_checked_blocks``, ``lmcache_restore_mismatch_blocks``.

The ledger lives in the engine, not in the LMCache server, so a server restart (the #4492 trigger)
cannot lose or corrupt it; an *engine* restart empties it (loads are then unverified, and counted,
until the prefixes are saved again).  On GPU the fingerprints run on the device (kernels/fingerprint.py);
the cost is one fingerprint pass over the prompt's blocks per request and one over the restored ones.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from pdkit.connectors.pd_verify import ProducerFingerprints, VerifySpec

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

LEDGER_BLOCKS = 1 << 20  # fingerprints kept (16 bytes and a hash each): about a million blocks


class RestoreLedger:
    """Scheduler side: fingerprints of saved blocks by block hash, and the checks of LMCache's loads."""

    def __init__(self, block_size: int, capacity: int = LEDGER_BLOCKS):
        self.block_size = block_size
        self.capacity = capacity
        self._saves = ProducerFingerprints(block_size)  # when a prompt's blocks are final (its due())
        self._requests: dict[str, Request] = {}
        self._awaiting: dict[str, list[Any]] = {}  # rid -> block hashes whose fingerprints are due
        self._by_hash: OrderedDict[Any, dict[str, int]] = OrderedDict()
        self._local_hit: dict[str, int] = {}  # rid -> the local prefix hit LMCache's lookup was given
        self._specs: dict[str, VerifySpec] = {}  # this step's checks, for the workers
        self.unverified_blocks = 0

    # ------------------------------------------------------------------ save
    def track(self, request: Request) -> None:
        """Every scheduled request: its prompt blocks are fingerprinted once its prompt is computed."""
        if request.request_id not in self._requests:
            self._requests[request.request_id] = request
            self._saves.track(request)

    def due(self, scheduler_output: SchedulerOutput) -> dict[str, list[int]]:
        """Block ids to fingerprint this step (full prompt blocks of prompts this step completes)."""
        if not self._requests:
            return {}
        due = self._saves.due(scheduler_output)
        out: dict[str, list[int]] = {}
        for rid, block_ids in due.items():
            request = self._requests.pop(rid, None)
            if request is None:
                continue
            full = min(request.num_prompt_tokens // self.block_size, len(request.block_hashes), len(block_ids))
            if full:
                out[rid] = list(block_ids[:full])
                self._awaiting[rid] = list(request.block_hashes[:full])
        return out

    def on_worker_fingerprints(self, fingerprints: dict[str, dict[str, Any]]) -> None:
        """The workers' values (``{rid: {"block_ids", "ranks": {rank: [...]}}}``) into the ledger."""
        for rid, entry in fingerprints.items():
            hashes = self._awaiting.pop(rid, None)
            if hashes is None:
                continue
            for i, block_hash in enumerate(hashes):
                values = {str(rank): int(vals[i]) for rank, vals in entry["ranks"].items() if i < len(vals)}
                self._by_hash[block_hash] = values
                self._by_hash.move_to_end(block_hash)
        while len(self._by_hash) > self.capacity:
            self._by_hash.popitem(last=False)

    def forget(self, request: Request) -> None:
        """A finished request: nothing of it is tracked any more (its ledger entries stay)."""
        self._requests.pop(request.request_id, None)
        self._local_hit.pop(request.request_id, None)
        self._saves.on_request_finished(request, None)

    # ------------------------------------------------------------------ load
    def on_lookup(self, request_id: str, num_computed_tokens: int) -> None:
        self._local_hit[request_id] = num_computed_tokens

    def on_load(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> VerifySpec | None:
        """LMCache loads ``num_external_tokens`` after the local hit: the check of its full blocks."""
        local = self._local_hit.pop(request.request_id, 0)
        first = -(-local // self.block_size)
        end = (local + num_external_tokens) // self.block_size
        ids = list(blocks.get_block_ids()[0])
        hashes = request.block_hashes
        checked: list[int] = []
        expected: dict[str, list[int]] | None = None
        for i in range(first, min(end, len(ids), len(hashes))):
            values = self._by_hash.get(hashes[i])
            if values is None:
                self.unverified_blocks += 1
                continue
            if expected is None:
                expected = {rank: [] for rank in values}
            if set(values) != set(expected):  # another TP layout saved it: cannot compare rank by rank
                self.unverified_blocks += 1
                continue
            checked.append(ids[i])
            for rank, value in values.items():
                expected[rank].append(value)
        if not checked or expected is None:
            return None
        spec = VerifySpec(local_block_ids=checked, expected=expected)
        self._specs[request.request_id] = spec
        return spec

    def take_specs(self) -> dict[str, VerifySpec]:
        out, self._specs = self._specs, {}
        return out

    def take_unverified(self) -> int:
        out, self.unverified_blocks = self.unverified_blocks, 0
        return out

    def known_blocks(self) -> int:
        return len(self._by_hash)
