"""Routing policies: which worker of a role takes a request.

The frontend filters the candidates first (alive, serving the requested model, under the per-worker
in-flight cap, not already tried for this request) and hands the rest to ``Policy.choose``.  A policy
sees the :class:`~pdkit.routing.types.RequestContext` (prompt text or token ids, estimated token count,
the parsed body) so that KV-cache-aware routing can score prefix overlap without the frontend changing:
register it with :func:`register_policy` and select it by name.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

from pdkit.routing.types import Policy, RequestContext, RoutedWorker, W, load_of

KV_AWARE = "kv_aware"


class RoundRobin:
    """Each role cycles through its candidates; cheap and fair when workers are alike."""

    name = "round_robin"

    def __init__(self) -> None:
        self._counters: dict[str, itertools.count[int]] = {}

    def choose(self, role: str, candidates: Sequence[W], ctx: RequestContext) -> W:
        counter = self._counters.setdefault(role, itertools.count())
        # Sorting by id keeps the rotation stable while workers come and go.
        ordered = sorted(candidates, key=lambda w: w.worker_id)
        return ordered[next(counter) % len(ordered)]


class LeastLoaded:
    """Fewest outstanding requests (:func:`~pdkit.routing.types.load_of`).  KV usage breaks ties (a
    fuller cache preempts sooner), then a rotating offset spreads equal workers."""

    name = "least_loaded"

    def __init__(self) -> None:
        self._rr = itertools.count()

    @staticmethod
    def score(w: RoutedWorker) -> tuple[float, float]:
        return (load_of(w), w.load.kv_usage)

    def choose(self, role: str, candidates: Sequence[W], ctx: RequestContext) -> W:
        ordered = sorted(candidates, key=lambda w: w.worker_id)
        offset = next(self._rr) % len(ordered)
        rotated = ordered[offset:] + ordered[:offset]
        return min(rotated, key=self.score)


_FACTORIES: dict[str, Callable[[], Policy]] = {"round_robin": RoundRobin, "least_loaded": LeastLoaded}


def register_policy(name: str, factory: Callable[[], Policy]) -> None:
    """Make a policy selectable by name (``--policy NAME``)."""
    _FACTORIES[name] = factory


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
