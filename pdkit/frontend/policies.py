"""Routing policies: which worker of a role takes a request.

The frontend filters the candidates first (alive, serving the requested model, under the per-worker
in-flight cap, not already tried for this request) and hands the rest to ``Policy.choose``.  A policy
sees the :class:`RequestContext` (prompt text or token ids, estimated token count, the parsed body)
so that KV-cache-aware routing (issue 7) can score prefix overlap without the frontend changing:
register it with :func:`register_policy` and select it by name.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pdkit.frontend.registry import WorkerState


@dataclass
class RequestContext:
    """What a policy may look at.  ``prompt_text`` is the completion prompt or the chat messages'
    text joined (not the chat-template rendering); ``prompt_token_ids`` is set when the client sent ids."""

    path: str
    model: str | None
    body: dict[str, Any]
    prompt_text: str | None
    prompt_token_ids: list[int] | None
    prompt_tokens: int
    request_id: str
    extra: dict[str, Any] = field(default_factory=dict)
    # True while a decode worker is chosen for a hop that loads the prompt's KV from a prefill worker:
    # the worker caches those blocks only once the transfer is done (KV-aware routing then does not
    # count them as about to be cached there).
    remote_kv: bool = False

    @property
    def is_chat(self) -> bool:
        return self.path.endswith("/chat/completions")


class Policy(Protocol):
    """``choose`` returns one of ``candidates`` (never empty when called) for ``role``.

    A policy may also define ``hop_done(worker, ctx)``: the frontend calls it when its hop to the chosen
    worker ends, whatever the outcome (KV-aware routing uses it to stop counting the request's prompt
    as "about to be cached" there), and ``async prepare(ctx)``: awaited before routing, for work that
    should not run on the event loop (KV-aware routing tokenizes the prompt in a thread there).
    """

    name: str

    def choose(self, role: str, candidates: Sequence[WorkerState], ctx: RequestContext) -> WorkerState: ...


class RoundRobin:
    """Each role cycles through its candidates; cheap and fair when workers are alike."""

    name = "round_robin"

    def __init__(self) -> None:
        self._counters: dict[str, itertools.count[int]] = {}

    def choose(self, role: str, candidates: Sequence[WorkerState], ctx: RequestContext) -> WorkerState:
        counter = self._counters.setdefault(role, itertools.count())
        # Sorting by id keeps the rotation stable while workers come and go.
        ordered = sorted(candidates, key=lambda w: w.worker_id)
        return ordered[next(counter) % len(ordered)]


class LeastLoaded:
    """Fewest outstanding requests, from the engine's heartbeat and this frontend's own count.

    The heartbeat (``running + waiting``) sees every client of the engine but lags by up to one
    interval; the own in-flight count is exact for this frontend and immediate.  Taking the larger of
    the two avoids both double counting and a burst piling onto a worker whose heartbeat is stale.  KV
    usage breaks ties (a fuller cache preempts sooner), then a rotating offset spreads equal workers.
    """

    name = "least_loaded"

    def __init__(self) -> None:
        self._rr = itertools.count()

    @staticmethod
    def score(w: WorkerState) -> tuple[float, float]:
        return (max(w.inflight, w.load.running + w.load.waiting), w.load.kv_usage)

    def choose(self, role: str, candidates: Sequence[WorkerState], ctx: RequestContext) -> WorkerState:
        ordered = sorted(candidates, key=lambda w: w.worker_id)
        offset = next(self._rr) % len(ordered)
        rotated = ordered[offset:] + ordered[:offset]
        return min(rotated, key=self.score)


_FACTORIES: dict[str, Callable[[], Policy]] = {"round_robin": RoundRobin, "least_loaded": LeastLoaded}


def register_policy(name: str, factory: Callable[[], Policy]) -> None:
    """Make a policy selectable by name (``--policy NAME``); used by KV-aware routing."""
    _FACTORIES[name] = factory


KV_AWARE = "kv_aware"


def make_policy(name: str) -> Policy:
    """A stateless-by-construction policy by name.  ``kv_aware`` is not built here: it needs the
    frontend's KV index and SUB socket, so :class:`~pdkit.frontend.server.Frontend` builds it (with
    :class:`~pdkit.routing.kv_aware.KvRouting`) when ``FrontendSettings.policy`` is ``kv_aware``."""
    if name == KV_AWARE and name not in _FACTORIES:
        raise ValueError(
            "policy kv_aware needs the frontend's KV index: use Frontend(FrontendSettings(policy='kv_aware')) "
            "or `pdkit frontend --policy kv_aware`, which build it"
        )
    try:
        return _FACTORIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {policy_names()}") from None


def policy_names() -> list[str]:
    """Every name ``--policy`` accepts (the registered factories plus ``kv_aware``)."""
    return sorted({*_FACTORIES, KV_AWARE})
