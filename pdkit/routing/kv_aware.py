"""KV-cache-aware worker choice: cached-prefix overlap weighted by tier, minus load.

Why these rules:

* **Only the contiguous prefix counts.**  vLLM's prefix cache (and LMCache's lookup) match from the
  first block on and stop at the first miss; a block cached further in is useless to this request.
* **Tier weights** (GPU 1.0, CPU 0.8, DISK 0.5 by default): a GPU hit skips the block's compute for
  free; a CPU/disk hit through LMCache still pays a load.  A block held in several tiers counts at its
  best one.
* **vLLM's hit cap**: at most ``prompt_tokens - 1`` tokens can hit (the last token is always
  computed), in whole blocks; predicted hits use the same rule so that they compare with
  ``vllm:prefix_cache_hits_total``.
* **Load penalty in blocks**: ``score = weighted_hit_blocks - load_weight * load`` where ``load`` is
  :func:`~pdkit.routing.types.load_of` (as :class:`~pdkit.routing.policies.LeastLoaded`).  With
  ``load_weight`` unset it is half the request's prompt blocks: one queued request ahead costs about
  as much as recomputing half of this prompt, so a worker holding most of the prefix wins over an idle
  one until its queue is two deep.  Ties go to the less loaded worker, then rotate.
* **Pending blocks** (:mod:`pdkit.routing.pending`): a prompt routed to a worker counts as cached there
  (at GPU weight, tier ``pending`` in the metrics) until its hop ends, because vLLM caches a prompt's
  blocks when it schedules it, well before the events announcing them reach the frontend.  Without it,
  a burst of requests sharing a new prefix would spread over the workers and each recompute it.

Requests whose token ids cannot be reproduced (unsupported chat features, no tokenizer) fall back to
least-loaded choice.  :class:`KvRouting` bundles index, subscriber, policy and metrics for a frontend.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry

from pdkit.prompt_tokens import PromptError, PromptTokenizer, load_prompt_tokenizer
from pdkit.protocol import WorkerInfo
from pdkit.routing.block_hash import DEFAULT_HASH_ALGO, BlockHasher
from pdkit.routing.kv_index import CPU, DISK, GPU, KvIndex
from pdkit.routing.kv_metrics import KvRoutingMetrics
from pdkit.routing.pending import PendingBlocks
from pdkit.routing.subscriber import KvEventSubscriber
from pdkit.routing.types import RequestContext, RoutedWorker, W, load_of

log = logging.getLogger("pdkit.routing.kv_aware")

DEFAULT_TIER_WEIGHTS: dict[str, float] = {"GPU": 1.0, "CPU": 0.8, "DISK": 0.5}
PENDING = "pending"


@dataclass
class PromptBlocks:
    """A request's prompt as the workers will hash it."""

    token_ids: list[int]
    hashes: list[int | bytes]
    block_size: int

    @property
    def max_hit_blocks(self) -> int:
        """vLLM never hits the last prompt token: at most ``(n - 1) // block_size`` blocks."""
        return max(0, (len(self.token_ids) - 1) // self.block_size)


@dataclass
class _RequestState:
    """What KV-aware routing remembers about one request (``RequestContext.policy_state``): the prompt's
    token ids and hashes per block size, computed once for its prefill and decode choice, and the
    hashes it marked pending per worker id (released when the hop there ends)."""

    tokenized: bool = False
    token_ids: list[int] | None = None
    blocks: dict[int, PromptBlocks | None] = field(default_factory=dict)
    pending: dict[str, list[int | bytes]] = field(default_factory=dict)


def _state(ctx: RequestContext) -> _RequestState:
    state = ctx.policy_state
    if not isinstance(state, _RequestState):
        state = ctx.policy_state = _RequestState()
    return state


@dataclass
class WorkerScore:
    """One candidate's evaluation (``hit_blocks`` already capped by vLLM's rule)."""

    worker: RoutedWorker
    hit_blocks: int
    tier_blocks: dict[str, int]
    weighted: float
    load: float
    score: float

    @property
    def worker_id(self) -> str:
        return str(self.worker.worker_id)


def _best_tier(bits: int) -> str:
    """The fastest tier in a block's tier bits (what its hit counts as)."""
    return "GPU" if bits & GPU else "CPU" if bits & CPU else "DISK"


class KvAwarePolicy:
    """A frontend routing policy (``choose(role, candidates, ctx)``) scoring KV prefix overlap.

    ``candidates`` are :class:`~pdkit.routing.types.RoutedWorker` (their ``info`` gives block size and
    prefix caching); ``ctx`` gives ``body`` (the parsed OpenAI request), ``is_chat`` and
    ``prompt_token_ids`` / ``prompt_text`` (fallbacks), and keeps the prompt's hashes in its
    ``policy_state`` between the prefill and the decode choice of one request.
    """

    name = "kv_aware"

    def __init__(
        self,
        index: KvIndex,
        tokenizer: PromptTokenizer | None,
        *,
        hash_seed: str | None,
        hash_algo: str = DEFAULT_HASH_ALGO,
        block_size: int = 16,
        tier_weights: Mapping[str, float] | None = None,
        load_weight: float | None = None,
        metrics: KvRoutingMetrics | None = None,
        pending: PendingBlocks | None = None,
    ) -> None:
        if hash_seed is None:
            log.warning("KV-aware routing without a hash seed: predictions only match workers by chance")
        self.index = index
        self.tokenizer = tokenizer
        self.hash_seed = hash_seed
        self.hash_algo = hash_algo
        self.block_size = block_size
        weights = {**DEFAULT_TIER_WEIGHTS, **(tier_weights or {})}
        self.tier_weights = weights
        # best weight per tier bit set (0..7), so scoring is one table look-up per block
        self._bits_weight = [
            max([weights[name] for bit, name in ((GPU, "GPU"), (CPU, "CPU"), (DISK, "DISK")) if bits & bit] or [0.0])
            for bits in range(8)
        ]
        self.load_weight = load_weight
        self.metrics = metrics
        self.pending = pending
        self._hashers: dict[int, BlockHasher] = {}
        self._rr = itertools.count()

    # -- prompt ----------------------------------------------------------------------------------

    def _hasher(self, block_size: int) -> BlockHasher:
        h = self._hashers.get(block_size)
        if h is None:
            h = self._hashers[block_size] = BlockHasher(block_size, self.hash_algo, self.hash_seed, use_env_seed=False)
        return h

    def token_ids(self, ctx: RequestContext) -> list[int] | None:
        """The prompt's token ids as the worker computes them, or None when they cannot be reproduced."""
        body = ctx.body or {}
        chat = ctx.is_chat
        ids = ctx.prompt_token_ids
        if ids and not chat:
            return list(ids)
        if self.tokenizer is None:
            return None
        try:
            if body:
                return self.tokenizer.request_ids(body, chat)
            text = ctx.prompt_text
            if isinstance(text, str) and not chat:
                return self.tokenizer.completion_ids(text)
        except (PromptError, TypeError) as exc:
            log.debug("no KV prediction for this request: %s", exc)
        return None

    def prompt_blocks(self, ctx: RequestContext, block_size: int | None = None) -> PromptBlocks | None:
        bs = block_size or self.block_size
        state = _state(ctx)
        if bs in state.blocks:
            return state.blocks[bs]
        if not state.tokenized:
            state.token_ids = self.token_ids(ctx)
            state.tokenized = True
        ids = state.token_ids
        blocks = None
        if ids is not None:
            body = ctx.body or {}
            salt = body.get("cache_salt") if isinstance(body.get("cache_salt"), str) else None
            hashes = self._hasher(bs).event_hashes(ids, cache_salt=salt)
            blocks = PromptBlocks(ids, hashes, bs)
        state.blocks[bs] = blocks
        return blocks

    async def prepare(self, ctx: RequestContext) -> None:
        """Tokenize and hash the prompt in a worker thread before the frontend routes the request.

        Why: a 4k-token chat costs ~10 ms of template rendering and tokenization; done inside
        ``choose`` it runs on the event loop and every other request waits.  The tokenizer's Rust
        side releases the GIL (see ``PromptTokenizer.encode``), so in a thread most of it runs beside
        the loop.  The result lands in the request's cache, where ``choose`` finds it; failures are
        left for ``choose`` to meet again (it falls back to least-loaded choice).
        """
        if self.tokenizer is None:
            return
        try:
            await asyncio.to_thread(self.prompt_blocks, ctx, self.block_size)
        except Exception:  # a bug here must not fail the request: choose() recomputes inline
            log.exception("KV-aware prompt preparation failed; routing computes it inline")

    # -- scoring ---------------------------------------------------------------------------------

    def _block_size_of(self, w: RoutedWorker) -> int:
        bs = w.info.block_size
        return bs if bs > 0 else self.block_size

    def score(self, w: RoutedWorker, ctx: RequestContext) -> WorkerScore:
        blocks = self.prompt_blocks(ctx, self._block_size_of(w))
        load = float(load_of(w))
        if blocks is None:
            return WorkerScore(w, 0, {}, 0.0, load, -load)
        wid = str(w.worker_id)
        held = self.index.worker(wid)
        cached = held.blocks if held is not None else {}
        # Past what the events announced, blocks of requests routed there (not announced yet) count too.
        pending = self.pending if self.pending is not None and w.info.prefix_caching else None
        now = pending.now() if pending is not None else 0.0
        tier_blocks = {"GPU": 0, "CPU": 0, "DISK": 0}
        weighted = 0.0
        hit = 0
        for h in blocks.hashes[: blocks.max_hit_blocks]:  # the contiguous prefix: stop at the first miss
            bits = cached.get(h, 0)
            if bits:
                weighted += self._bits_weight[bits]
                tier_blocks[_best_tier(bits)] += 1
            elif pending is not None and pending.has(wid, h, now):
                weighted += self._bits_weight[GPU]
                tier_blocks[PENDING] = tier_blocks.get(PENDING, 0) + 1
            else:
                break
            hit += 1
        lw = self.load_weight if self.load_weight is not None else max(1.0, 0.5 * len(blocks.hashes))
        return WorkerScore(w, hit, tier_blocks, weighted, load, weighted - lw * load)

    def scores(self, candidates: Sequence[RoutedWorker], ctx: RequestContext) -> list[WorkerScore]:
        return [self.score(w, ctx) for w in candidates]

    def choose(self, role: str, candidates: Sequence[W], ctx: RequestContext) -> W:
        """The best-scoring candidate; ties: lower load, lower KV usage, then a rotating offset."""
        ordered = sorted(candidates, key=lambda w: str(w.worker_id))
        offset = next(self._rr) % len(ordered)
        rotated = ordered[offset:] + ordered[:offset]
        scored = self.scores(rotated, ctx)
        i = max(range(len(scored)), key=lambda i: (scored[i].score, -scored[i].load, -rotated[i].load.kv_usage))
        self._chosen(role, scored[i], ctx)
        return rotated[i]

    def local_prefill_worker(self, candidates: Sequence[W], ctx: RequestContext, max_uncached_tokens: int) -> W | None:
        """Conditional disaggregation: the decode candidate that should prefill this request itself.

        A decode worker qualifies when the prompt tokens it would still compute (prompt minus its
        cached prefix) are at most ``max_uncached_tokens``; among those the best score wins.  None:
        send the request through a prefill worker as usual (or the prompt could not be predicted).
        """
        if not candidates:
            return None
        qualified: list[tuple[WorkerScore, W]] = []
        for s, w in zip(self.scores(candidates, ctx), candidates, strict=True):
            blocks = self.prompt_blocks(ctx, self._block_size_of(w))
            if blocks is None:
                return None
            uncached = len(blocks.token_ids) - s.hit_blocks * blocks.block_size
            if uncached <= max_uncached_tokens:
                qualified.append((s, w))
        if not qualified:
            return None
        best, worker = max(qualified, key=lambda sw: (sw[0].score, -sw[0].load))
        self._chosen("decode", best, ctx)
        return worker

    def hop_done(self, worker: RoutedWorker, ctx: RequestContext) -> None:
        """The frontend's hop to ``worker`` for this request ended (any outcome): release its pending marks."""
        state = ctx.policy_state
        if self.pending is None or not isinstance(state, _RequestState) or not state.pending:
            return
        hashes = state.pending.pop(str(worker.worker_id), None)
        if hashes:
            self.pending.done(str(worker.worker_id), hashes)

    def _chosen(self, role: str, s: WorkerScore, ctx: RequestContext) -> None:
        """Book the choice: the request's blocks become pending on the worker; predicted-hit metrics."""
        blocks = self.prompt_blocks(ctx, self._block_size_of(s.worker))
        if blocks is None:
            return
        wid = s.worker_id
        # A decode hop that pulls the prompt's KV from a prefill worker: vLLM caches those blocks only
        # when the transfer is done and announces them then; marking them earlier over-predicts.
        if self.pending is not None and blocks.hashes and s.worker.info.prefix_caching and not ctx.remote_kv:
            marks = _state(ctx).pending
            if wid in marks:  # chosen again for the same request: release the earlier mark first
                self.pending.done(wid, marks.pop(wid))
            self.pending.add(wid, blocks.hashes)
            marks[wid] = blocks.hashes
        if self.metrics is None:
            return
        m = self.metrics
        m.prompt_blocks.labels(wid, role).inc(len(blocks.hashes))
        for tier, n in s.tier_blocks.items():
            if n:
                m.predicted_hit_blocks.labels(wid, role, tier).inc(n)
        m.predicted_hit_tokens.labels(wid, role).inc(s.hit_blocks * blocks.block_size)


class _Registered(Protocol):
    """What :class:`KvRouting` reads of a worker to follow its KV events."""

    @property
    def worker_id(self) -> str: ...

    @property
    def info(self) -> WorkerInfo: ...


class KvRouting:
    """Everything KV-aware routing needs in a frontend: index, SUB socket, policy, metrics.

    Lifecycle, inside the frontend's event loop::

        kv = KvRouting(model_dir, hash_seed="0", registry=metrics.registry, port=None)
        kv.start()                               # starts receiving (and binds a shared SUB if port is set)
        frontend = Frontend(settings, policy=kv.policy)
        registry on_added -> kv.add_worker(state)          # connects a SUB to the worker's publisher
        registry on_removed -> kv.remove_worker(id) unless reaped; on_forgotten -> kv.remove_worker(id)
        ...
        await kv.close()

    ``port`` None: no shared SUB socket (deployments: each worker's own publisher is connected);
    an int binds the legacy shared socket (0 = a free port) for in-process tools.
    """

    def __init__(
        self,
        model_dir: str | Path | None,
        *,
        hash_seed: str | int | None,
        registry: CollectorRegistry,
        host: str = "127.0.0.1",
        port: int | None = 0,
        block_size: int = 16,
        hash_algo: str = DEFAULT_HASH_ALGO,
        tier_weights: Mapping[str, float] | None = None,
        load_weight: float | None = None,
        max_blocks_per_worker: int = 1_000_000,
        replay_timeout_ms: int = 2000,
        track_pending: bool = True,
        pending_grace_s: float = 1.0,
    ) -> None:
        self.metrics = KvRoutingMetrics(registry)
        self.pending = PendingBlocks(grace_s=pending_grace_s) if track_pending else None
        self.index = KvIndex(max_blocks_per_worker=max_blocks_per_worker, metrics=self.metrics)
        if self.pending is not None:
            self.index.on_gpu_blocks = self.pending.settle
        tokenizer = load_prompt_tokenizer(str(Path(model_dir).resolve())) if model_dir is not None else None
        self.policy = KvAwarePolicy(
            self.index,
            tokenizer,
            hash_seed=None if hash_seed is None else str(hash_seed),
            hash_algo=hash_algo,
            block_size=block_size,
            tier_weights=tier_weights,
            load_weight=load_weight,
            metrics=self.metrics,
            pending=self.pending,
        )
        self.subscriber = KvEventSubscriber(self.index, host, port, replay_timeout_ms=replay_timeout_ms)

    @property
    def port(self) -> int:
        return self.subscriber.port

    @property
    def endpoint(self) -> str | None:
        """The legacy shared SUB socket's address; None when workers' own publishers are connected."""
        return self.subscriber.endpoint

    def start(self) -> int:
        """Bind the shared socket (only when ``port`` was given) and start receiving; returns its port."""
        self.subscriber.start()
        return self.subscriber.port

    async def close(self) -> None:
        await self.subscriber.close()

    def add_worker(self, worker: _Registered) -> None:
        """Track one registered worker (a ``WorkerState`` or anything with ``worker_id`` and ``info``)."""
        info = worker.info
        self.subscriber.add_worker(
            str(worker.worker_id),
            info.kv_events_replay_endpoint,
            topic=info.kv_events_topic or None,
            host=urlsplit(info.url).hostname,
            endpoint=info.kv_events_endpoint or None,
        )

    def remove_worker(self, worker_id: str) -> None:
        self.subscriber.remove_worker(worker_id)
        if self.pending is not None:
            self.pending.remove_worker(worker_id)

    def worker_left(self, worker: _Registered, reaped: bool) -> None:
        """Registry hook: a deregistered worker is forgotten at once; a reaped one (missed heartbeats) is
        kept -- its index and event link stay, see :meth:`sync_workers` -- until ``forget``."""
        if not reaped:
            self.remove_worker(str(worker.worker_id))

    def sync_workers(self, workers: Iterable[_Registered], keep: Container[str] = ()) -> None:
        """Make the tracked set equal to ``workers`` (O(all workers): for tests and tools; the frontend
        uses the per-worker hooks :meth:`add_worker` / :meth:`worker_left` / :meth:`remove_worker`).

        ``keep``: ids of workers that left the registry but may come back (dropped for missed
        heartbeats, not deregistered).  Their index stays and their events keep being applied -- the
        engine is likely still running and caching -- so a worker that flaps under load is routed by
        what it really holds when it returns, instead of starting from an empty index that only a
        later event and a replay could refill.  They are not routed to while away (routing only
        scores registered workers).
        """
        current = {str(w.worker_id): w for w in workers}
        for wid in set(self.subscriber.worker_ids()) - current.keys():
            if wid not in keep:
                self.remove_worker(wid)
        for w in current.values():
            self.add_worker(w)
