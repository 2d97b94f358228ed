"""The simulated engine core: a step scheduler over a block-based KV cache, in asyncio.

Why this shape: it mirrors vLLM V1's scheduler loop (one step = one forward pass over a token budget;
running requests first, then waiting ones FCFS while KV blocks last; preemption of the newest running
request when a decode needs a block and none is free) so that queueing, batching and prefix-cache
effects appear where they appear on a GPU.  Each step "takes" the time the :class:`LatencyModel` says,
times ``time_scale``.

P/D (vLLM NixlConnector protocol, pull mode):

* A request with ``kv_transfer_params.do_remote_decode`` runs normally; when it finishes by length or
  stop its blocks are *not* freed but leased for ``kv_lease_s`` seconds (:mod:`pdkit.sim.leases` owns
  them from then on), and the response carries ``do_remote_prefill/remote_*`` params pointing at this
  worker's side channel.
* A request with ``do_remote_prefill`` and complete ``remote_*`` params gets blocks for its prompt
  (minus local prefix hits) and pulls the missing blocks from the remote worker through a
  :mod:`pdkit.sim.transport` (HTTP side channel or real NIXL), which frees the lease.  Any failure --
  missing params, unknown or expired lease, unreachable worker, KV of a different prompt -- fails the
  request the way ``kv_load_failure_policy=fail`` does (finish reason ``error`` -> HTTP 500 "Internal server error").
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pdkit.routing.block_hash import BlockHasher
from pdkit.routing.kv_events import KVEvent
from pdkit.sim.kv_cache import BlockPool
from pdkit.sim.leases import Lease, LeaseTable
from pdkit.sim.metrics import SimMetrics
from pdkit.sim.sampling import LogprobEntry, SamplingSpec, TokenSampler
from pdkit.sim.settings import SimSettings
from pdkit.sim.text import OutputModel
from pdkit.sim.transport import KVTransferError, KVTransport, PullSpec

logger = logging.getLogger(__name__)

REMOTE_PARAM_KEYS = ("remote_block_ids", "remote_engine_id", "remote_request_id", "remote_host", "remote_port")


@dataclass
class TokenEvent:
    """One generated token (``text`` is its detokenized delta)."""

    token_id: int
    text: str
    logprobs: list[LogprobEntry] | None = None  # vLLM's per-position dict, chosen token first


@dataclass
class FinishEvent:
    """The request ended: ``reason`` is stop | length | abort | error."""

    reason: str
    stop_reason: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    error: str | None = None
    last_token: TokenEvent | None = None  # the final token travels with the finish (one SSE chunk, as vLLM)


@dataclass
class SimRequest:
    """One request inside the engine (prompt already tokenized)."""

    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    stop: list[str] = field(default_factory=list)
    kv_transfer_params: dict[str, Any] | None = None
    cache_salt: str | None = None
    sampling: SamplingSpec | None = None  # None: greedy without logprobs (the original token stream)
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    text_sent: int = 0  # characters of ``text`` already handed out (the rest is held back for stop strings)
    block_hashes: list[bytes] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_cached_blocks: int = 0
    num_cached_tokens: int = 0
    state: str = "waiting"
    digest: bytes = b""
    answer_offset: int = 0  # position of the first output token in the model's answer (seeded prompts)
    first_token_time: float | None = None
    last_token_time: float | None = None
    scheduled_time: float | None = None
    events: asyncio.Queue[TokenEvent | FinishEvent] = field(default_factory=asyncio.Queue)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def wants_remote_prefill(self) -> bool:
        return bool(self.kv_transfer_params and self.kv_transfer_params.get("do_remote_prefill"))

    @property
    def wants_remote_decode(self) -> bool:
        return bool(self.kv_transfer_params and self.kv_transfer_params.get("do_remote_decode"))


HeartbeatFn = Callable[[str, int, str, list[str]], Awaitable[None]]


class SimEngine:
    """Scheduler + KV cache + output model of one simulated worker."""

    def __init__(
        self,
        settings: SimSettings,
        model: OutputModel,
        metrics: SimMetrics,
        *,
        kv_bytes_per_token: int,
        publish: Callable[[list[KVEvent]], None] | None = None,
        transport: KVTransport | None = None,
    ) -> None:
        self.settings = settings
        self.model = model
        self.sampler = TokenSampler(model)
        self.metrics = metrics
        self.engine_id = settings.engine_id or str(uuid.uuid4())
        self.kv_bytes_per_token = kv_bytes_per_token
        self.pool = BlockPool(settings.kv_capacity_blocks, settings.block_size, enable_events=publish is not None)
        self.hasher = BlockHasher(settings.block_size, settings.hash_algo, settings.hash_seed, use_env_seed=False)
        self._publish = publish
        self.leases = LeaseTable(settings, metrics, kv_bytes_per_token, self._free_blocks, self._after_release)
        self.transport = transport
        self.waiting: deque[SimRequest] = deque()
        self.ready: deque[SimRequest] = deque()  # KV pulled, waiting for a running slot
        self.running: list[SimRequest] = []
        self.remote_wait: dict[str, SimRequest] = {}
        self.side_channel: tuple[str, int] = (settings.host, 0)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._heartbeats: asyncio.Task[None] | None = None
        # D->P lease heartbeats: (host, port, engine id, request ids) -> awaitable; set by the server
        self.heartbeat: HeartbeatFn | None = None
        self._pull_tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count()
        self._closed = False

    # ------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="sim-engine")
        self._sweeper = asyncio.create_task(self.leases.sweep_forever(lambda: self._closed), name="sim-lease-sweeper")
        if self.heartbeat is not None:
            self._heartbeats = asyncio.create_task(self._send_heartbeats(), name="sim-lease-heartbeats")

    async def stop(self) -> None:
        self._closed = True
        self._wake.set()
        tasks = [self._task, self._sweeper, self._heartbeats, *self._pull_tasks]
        for t in tasks:
            if t is not None:
                t.cancel()
        for t in tasks:
            if t is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t

    @property
    def transport(self) -> KVTransport | None:
        """How KV moves between workers (None: agg, or not set up yet); the lease table uses the same."""
        return self._transport

    @transport.setter
    def transport(self, transport: KVTransport | None) -> None:
        self._transport = self.leases.transport = transport

    def new_request_id(self, base: str) -> str:
        """Engine-internal id (vLLM appends the prompt index and a random suffix too)."""
        return f"{base}-{next(self._ids)}-{uuid.uuid4().hex[:8]}"

    # -------------------------------------------------------------------------------- requests
    def add_request(self, req: SimRequest) -> None:
        req.digest, req.answer_offset = self.model.continuation(req.prompt_ids)
        req.block_hashes = self.hasher.block_hashes(req.prompt_ids, cache_salt=req.cache_salt)
        self.metrics.prompt_tokens.inc(len(req.prompt_ids))
        if req.wants_remote_prefill and self.settings.role != "agg":
            missing = [k for k in REMOTE_PARAM_KEYS if k not in (req.kv_transfer_params or {})]
            if missing:
                logger.warning("request %s: invalid kv_transfer_params, missing %s", req.request_id, missing)
                self.metrics.kv_transfer_failures.labels(reason="invalid_params").inc()
                self._finish(req, FinishEvent("error", error=f"invalid kv_transfer_params: missing {missing}"))
                return
        self.waiting.append(req)
        self._update_gauges()
        self._wake.set()

    def abort(self, req: SimRequest) -> None:
        """Client went away: drop the request wherever it is and release its blocks."""
        if req.state == "finished":
            return
        with contextlib.suppress(ValueError):
            self.waiting.remove(req)
        with contextlib.suppress(ValueError):
            self.ready.remove(req)
        if req in self.running:
            self.running.remove(req)
        self.remote_wait.pop(req.request_id, None)
        self._finish(req, FinishEvent("abort"))

    # ---------------------------------------------------------------------------- the step loop
    async def _loop(self) -> None:
        while not self._closed:
            self._wake.clear()
            plan = self._schedule()
            if not plan:
                self._update_gauges()
                await self._wake.wait()
                continue
            prefill_tokens = sum(n for r, n in plan if not self._is_decode(r, n))
            decodes = [r for r, n in plan if self._is_decode(r, n)]
            ctx = sum(r.num_tokens for r in decodes)
            step_s = self.settings.latency.step_ms(prefill_tokens, len(decodes), ctx) / 1e3
            self.metrics.steps.inc()
            await asyncio.sleep(step_s * self.settings.time_scale)
            self._apply(plan)
            self._flush_events()
            self._update_gauges()
            await asyncio.sleep(0)  # let HTTP handlers run between steps even at time_scale 0

    @staticmethod
    def _is_decode(req: SimRequest, n: int) -> bool:
        """A step entry is a decode when it computes the single token sampled last step."""
        return n == 1 and len(req.output_ids) > 0

    def _cdiv(self, a: int) -> int:
        return -(-a // self.settings.block_size)

    def _schedule(self) -> list[tuple[SimRequest, int]]:
        s = self.settings
        budget = s.max_num_batched_tokens
        plan: list[tuple[SimRequest, int]] = []
        preempted = False
        # 1) running requests, oldest first
        idx = 0
        while idx < len(self.running) and budget > 0:
            req = self.running[idx]
            n = min(req.num_tokens - req.num_computed, budget)
            need = self._cdiv(req.num_computed + n) - len(req.block_ids)
            while need > self.pool.num_free and self.running[-1] is not req:
                self._preempt(self.running[-1])
                preempted = True
            if need > self.pool.num_free:
                self._preempt(req)
                preempted = True
                continue
            if need > 0:
                new = self.pool.allocate(need)
                assert new is not None
                req.block_ids.extend(new)
            plan.append((req, n))
            budget -= n
            idx += 1
        if preempted:
            return plan
        # 2) requests whose KV arrived from a prefill worker
        while self.ready and budget > 0 and len(self.running) < s.max_num_seqs:
            req = self.ready.popleft()
            n = min(req.num_tokens - req.num_computed, budget)
            self.running.append(req)
            req.state = "running"
            plan.append((req, n))
            budget -= n
        # 3) waiting requests, FCFS, while blocks and slots last
        while self.waiting and budget > 0 and len(self.running) < s.max_num_seqs:
            req = self.waiting[0]
            max_hit = (req.num_tokens - 1) // s.block_size
            hit = self.pool.longest_hit(req.block_hashes, max_hit)
            computed = len(hit) * s.block_size
            remote = req.wants_remote_prefill and s.role != "agg" and self.transport is not None and not req.output_ids
            if remote:
                need = self._cdiv(len(req.prompt_ids)) - len(hit)
                n = 0
            else:
                n = min(req.num_tokens - computed, budget)
                need = self._cdiv(computed + n) - len(hit)
            if need > self.pool.num_free - self.pool.num_evictable_needed(hit):
                break  # head-of-line blocking, like vLLM's FCFS policy
            self.waiting.popleft()
            self.pool.touch(hit)
            new = self.pool.allocate(need)
            assert new is not None
            req.block_ids = hit + new
            req.num_computed = computed
            req.num_cached_blocks = len(hit)
            req.num_cached_tokens = computed
            req.scheduled_time = time.monotonic()
            self.metrics.prefix_cache_queries.inc(req.num_tokens)
            self.metrics.prefix_cache_hits.inc(computed)
            self.metrics.prompt_tokens_cached.inc(computed)
            self.metrics.queue_time.observe(req.scheduled_time - req.arrival)
            if remote:
                req.state = "waiting_remote"
                self.remote_wait[req.request_id] = req
                task = asyncio.create_task(self._pull_kv(req, len(hit)))
                self._pull_tasks.add(task)
                task.add_done_callback(self._pull_tasks.discard)
                continue
            req.state = "running"
            self.running.append(req)
            plan.append((req, n))
            budget -= n
        return plan

    def _preempt(self, req: SimRequest) -> None:
        """Free a running request's blocks and queue it again at the front (recompute later)."""
        self.running.remove(req)
        self.pool.free(req.block_ids)
        req.block_ids = []
        req.num_computed = 0
        req.num_cached_blocks = 0
        req.state = "waiting"
        self.waiting.appendleft(req)
        self.metrics.preemptions.inc()

    def _apply(self, plan: list[tuple[SimRequest, int]]) -> None:
        now = time.monotonic()
        for req, n in plan:
            if req.state != "running":
                continue  # aborted during the step
            req.num_computed += n
            self._cache_blocks(req)
            if req.num_computed < req.num_tokens:
                continue  # chunked prefill continues next step
            self._emit_token(req, now)

    def _cache_blocks(self, req: SimRequest) -> None:
        num_full = min(req.num_computed // self.settings.block_size, len(req.block_ids))
        if num_full > len(req.block_hashes):
            req.block_hashes = self.hasher.block_hashes(
                req.all_token_ids, cache_salt=req.cache_salt, start=req.block_hashes
            )
        num_full = min(num_full, len(req.block_hashes))
        self.pool.cache_full_blocks(req.block_ids, req.block_hashes, req.all_token_ids, req.num_cached_blocks, num_full)
        req.num_cached_blocks = max(req.num_cached_blocks, num_full)

    def _emit_token(self, req: SimRequest, now: float) -> None:
        entries: list[LogprobEntry] | None = None
        position = req.answer_offset + len(req.output_ids)
        if req.sampling is None:
            tok = self.model.token(req.digest, position)
        else:
            tok, entries = self.sampler.next_token(req.digest, position, req.sampling)
        req.output_ids.append(tok)
        text = self.model.token_text(tok)
        self.metrics.generation_tokens.inc()
        if req.first_token_time is None:
            req.first_token_time = now
            self.metrics.ttft.observe(now - req.arrival)
        elif req.last_token_time is not None:
            self.metrics.itl.observe(now - req.last_token_time)
        req.last_token_time = now
        stop_hit = None
        combined = req.text + text
        for s in req.stop:  # vLLM's order: the first stop string of the list that appears wins
            pos = combined.find(s, max(0, len(req.text) - len(s) + 1))
            if s and pos >= 0:
                stop_hit = s
                combined = combined[:pos]
                break
        req.text = combined
        # vLLM's detokenizer holds back the last max(len(stop)) - 1 characters of a stream until no
        # stop string can claim them: a stop that starts inside an earlier token cuts text not yet sent
        finished = stop_hit is not None or len(req.output_ids) >= req.max_tokens
        hold = max((len(s) for s in req.stop), default=1) - 1
        visible = len(req.text) if finished else max(req.text_sent, len(req.text) - hold)
        text = req.text[req.text_sent : visible]
        req.text_sent = visible
        event = TokenEvent(tok, text, entries)
        if stop_hit is not None:
            self._finish_running(req, "stop", stop_hit, event)
        elif len(req.output_ids) >= req.max_tokens:
            self._finish_running(req, "length", None, event)
        else:
            req.events.put_nowait(event)

    def _finish_running(self, req: SimRequest, reason: str, stop_reason: str | None, last: TokenEvent) -> None:
        self.running.remove(req)
        params = None
        if req.wants_remote_decode and self.settings.role != "agg" and req.block_ids:
            params = self._lease(req)
        self._finish(req, FinishEvent(reason, stop_reason=stop_reason, kv_transfer_params=params, last_token=last))

    def _lease(self, req: SimRequest) -> dict[str, Any]:
        """Hold the request's blocks for the decode worker; the NIXL producer's response params."""
        lease = self.leases.hold(req.request_id, req.block_ids, req.all_token_ids[: req.num_computed])
        req.block_ids = []  # ownership moves to the lease
        host, port = self.side_channel
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": [list(lease.block_ids)],
            "remote_engine_id": self.engine_id,
            "remote_request_id": req.request_id,
            "remote_host": host,
            "remote_port": port,
            "tp_size": self.settings.tp_size,
            "remote_num_tokens": req.num_computed,
            "remote_blocks_expiry_time": None,
        }

    def _finish(self, req: SimRequest, event: FinishEvent) -> None:
        if req.block_ids:
            self.pool.free(req.block_ids)
            req.block_ids = []
        req.state = "finished"
        self.metrics.request_success.labels(finished_reason=event.reason).inc()
        if req.first_token_time is not None or event.reason != "abort":
            self.metrics.e2e.observe(time.monotonic() - req.arrival)
        req.events.put_nowait(event)
        self._flush_events()
        self._update_gauges()
        self._wake.set()

    # ------------------------------------------------------------------------------ P/D transfer
    async def _pull_kv(self, req: SimRequest, num_local_hit_blocks: int) -> None:
        params = req.kv_transfer_params or {}
        assert self.transport is not None
        try:
            remote_groups = params["remote_block_ids"]
            remote_blocks = [int(b) for b in remote_groups[0]] if remote_groups else []
            num_prompt_blocks = self._cdiv(len(req.prompt_ids))
            local = req.block_ids[num_local_hit_blocks:num_prompt_blocks]
            # The prefill's KV covers remote_num_tokens tokens; a decode *seeded* with the prefill's first
            # token has one prompt token more, whose KV it computes itself (vLLM's "recompute the last
            # token" step).  More than one token beyond the prefill's KV would be positions vLLM leaves
            # without KV, silently: refuse those loudly.
            remote_tokens = int(params.get("remote_num_tokens") or len(req.prompt_ids))
            if not 0 <= len(req.prompt_ids) - remote_tokens <= 1:
                raise KVTransferError(
                    f"prompt has {len(req.prompt_ids)} tokens but the prefill's KV covers {remote_tokens}; "
                    "a decode may extend the prefill's prompt by one (seeded) token at most"
                )
            if len(local) > len(remote_blocks):
                # vLLM 0.26's NIXL worker asserts here (_apply_prefix_caching: num_local_blocks <= remote)
                raise KVTransferError(
                    f"remote holds {len(remote_blocks)} blocks, {len(local)} needed; a seeded decode whose "
                    "prefill length is a multiple of the block size needs remote_block_ids padded "
                    "(pdkit.frontend.seeding.seeded_kv_transfer_params)"
                )
            # like NIXL: read the remote tail that corresponds to our unhashed local blocks
            wanted = remote_blocks[len(remote_blocks) - len(local) :] if local else []
            first = len(remote_blocks) - len(wanted)
            if wanted and first != num_local_hit_blocks:
                # NIXL pairs the lists from their ends: this would load KV of other positions (silently)
                raise KVTransferError(
                    f"remote block {first} would be read into the local block of positions from "
                    f"{num_local_hit_blocks * self.settings.block_size}: misaligned read (a seeded decode "
                    "needs remote_block_ids padded when the prefill length is a multiple of the block size)"
                )
            # a padded list repeats the last block: NIXL reads it into the seed token's block, whose
            # only used slot the decode computes itself; the simulator skips that read
            wanted = wanted[: max(0, self._cdiv(remote_tokens) - first)]
            result = await self.transport.pull(PullSpec(params, wanted, first, local[: len(wanted)]))
            start = first * self.settings.block_size
            expect = req.prompt_ids[start : start + len(result.token_ids)]
            if result.token_ids != expect or len(result.token_ids) < remote_tokens - start:
                raise KVTransferError("pulled KV belongs to a different prompt (or the blocks were freed)")
            self.metrics.kv_transfer_bytes.labels(direction="received").inc(result.num_bytes)
            await asyncio.sleep(self.settings.latency.transfer_ms(result.num_bytes) / 1e3 * self.settings.time_scale)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure = KV load failure, policy "fail"
            reason = type(exc).__name__ if not isinstance(exc, KVTransferError) else "transfer"
            logger.warning("request %s: KV pull failed: %s", req.request_id, exc)
            self.metrics.kv_transfer_failures.labels(reason=reason).inc()
            if self.remote_wait.pop(req.request_id, None) is not None:
                self._finish(req, FinishEvent("error", error=f"KV transfer failed: {exc}"))
            return
        if self.remote_wait.pop(req.request_id, None) is None:
            return  # aborted meanwhile
        # only one transfer per request (vLLM flips the flag too); a preempted request recomputes
        req.kv_transfer_params = {**params, "do_remote_prefill": False}
        # all prompt KV present; the last prompt token is recomputed to get logits (as vLLM does)
        req.num_computed = len(req.prompt_ids) - 1
        self._cache_blocks(req)
        self._flush_events()
        req.state = "ready"
        self.ready.append(req)
        self._wake.set()

    def serve_pull(self, body: dict[str, Any]) -> dict[str, Any]:
        """HTTP side channel, producer side: hand out leased KV (:meth:`LeaseTable.serve_pull`)."""
        return self.leases.serve_pull(body, self.engine_id)

    async def release_rejected(self, params: dict[str, Any]) -> None:
        """Decode side of vLLM's rejection cleanup: a request the serving layer refused (an unknown model,
        bad parameters) that carried a prefill's ``kv_transfer_params`` still tells that prefill to free its
        blocks -- an empty read plus the notification (vLLM's ``notify_kv_transfer_request_rejected``)."""
        groups = params.get("remote_block_ids")
        if self.transport is None or not params.get("do_remote_prefill") or not isinstance(groups, list) or not groups:
            return
        first_group = groups[0] if isinstance(groups[0], list) else groups
        try:
            await self.transport.pull(PullSpec(params, [], len(first_group), []))
        except Exception as exc:  # the prefill's lease frees the blocks in the end
            logger.info("rejected request: could not release the prefill's KV (%s)", exc)

    def on_remote_read_done(self, req_id: str, num_blocks: int) -> None:
        """A decode finished reading a lease (NIXL notification): free the blocks."""
        self.leases.read_done(req_id, num_blocks)

    def extend_leases(self, engine_id: str, request_ids: list[str]) -> int:
        """Producer side of a heartbeat (:meth:`LeaseTable.extend`)."""
        return self.leases.extend(engine_id, self.engine_id, request_ids)

    def _free_blocks(self, block_ids: list[int]) -> list[int]:
        """The lease table's way to give blocks back: those no request holds any more are returned."""
        self.pool.free(block_ids)
        return [b for b in block_ids if self.pool.ref_count(b) == 0]

    def _after_release(self) -> None:
        self._update_gauges()
        self._wake.set()

    async def _send_heartbeats(self) -> None:
        """Consumer side: while remote-prefill requests wait here for blocks, keep their leases alive.

        Like vLLM's decode, every ``kv_lease_s / 6`` seconds, one heartbeat per prefill engine.
        """
        assert self.heartbeat is not None
        interval = max(0.005, self.settings.kv_lease_s / 6)
        while not self._closed:
            await asyncio.sleep(interval)
            targets: dict[tuple[str, int, str], list[str]] = {}
            for req in self.waiting:
                p = req.kv_transfer_params
                if req.wants_remote_prefill and p and all(k in p for k in REMOTE_PARAM_KEYS):
                    key = (str(p["remote_host"]), int(p["remote_port"]), str(p["remote_engine_id"]))
                    targets.setdefault(key, []).append(str(p["remote_request_id"]))
            for (host, port, engine_id), ids in targets.items():
                try:
                    await self.heartbeat(host, port, engine_id, ids)
                except Exception as exc:  # a lost heartbeat only shortens the lease
                    logger.debug("lease heartbeat to %s:%s failed: %s", host, port, exc)

    # --------------------------------------------------------------------------------- plumbing
    def _flush_events(self) -> None:
        events = self.pool.take_events()
        if events and self._publish is not None:
            self._publish(events)

    def _update_gauges(self) -> None:
        m = self.metrics
        m.running.set(len(self.running) + len(self.ready))
        m.waiting.set(len(self.waiting) + len(self.remote_wait))
        m.kv_usage.set(self.pool.usage)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash of free blocks (vLLM refuses while requests hold blocks)."""
        if self.running or self.remote_wait or self.leases or self.ready:
            return False
        self.pool = BlockPool(
            self.settings.kv_capacity_blocks, self.settings.block_size, enable_events=self._publish is not None
        )
        if self._publish is not None:
            from pdkit.routing.kv_events import AllBlocksCleared

            self._publish([AllBlocksCleared()])
        self._update_gauges()
        return True


__all__ = [
    "FinishEvent",
    "KVTransferError",
    "Lease",
    "SimEngine",
    "SimRequest",
    "TokenEvent",
]
