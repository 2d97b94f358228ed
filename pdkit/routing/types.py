"""What a routing policy sees: a worker (:class:`WorkerState`), a request (:class:`RequestContext`), and the
:class:`Policy` interface with its one load measure (:func:`load_of`).

Why these live in ``routing/`` and not in the frontend: policies (round robin, least loaded, KV-aware) are
routing code and the frontend is their caller.  With the types here, ``routing/`` needs nothing from above
it, and every policy reads the same typed fields instead of probing objects with ``getattr``.  The registry
(:mod:`pdkit.frontend.registry`) creates and updates the :class:`WorkerState` records; policies only read
them.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from pdkit.protocol import Load, WorkerInfo


@dataclass(eq=False)
class WorkerState:
    """One registered engine: what its agent told the registry plus this frontend's own in-flight count."""

    info: WorkerInfo
    last_seen: float
    load: Load = field(default_factory=Load)
    seq: int = 0
    inflight: int = 0
    registered_at: float = field(default_factory=time.time)
    # Proof of ownership for heartbeats / deregistration; never shown in /workers (as_json omits it).
    session_key: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    @property
    def role(self) -> str:
        return self.info.role

    @property
    def url(self) -> str:
        return self.info.url

    def as_json(self, now: float) -> dict[str, object]:
        return {
            **self.info.model_dump(),
            "load": self.load.model_dump(exclude_none=True),
            "inflight": self.inflight,
            "seq": self.seq,
            "last_seen_s_ago": round(now - self.last_seen, 3),
        }


class RoutedWorker(Protocol):
    """The fields of a worker a policy reads: :class:`WorkerState`, or a test's stand-in for one."""

    @property
    def worker_id(self) -> str: ...

    @property
    def info(self) -> WorkerInfo: ...

    @property
    def load(self) -> Load: ...

    @property
    def inflight(self) -> int: ...


W = TypeVar("W", bound=RoutedWorker)


def load_of(w: RoutedWorker) -> int:
    """Outstanding requests on ``w``: the larger of this frontend's own in-flight count and the engine's
    heartbeat (``running + waiting``).

    The heartbeat sees every client of the engine but lags by up to one interval; the own count is exact
    for this frontend and immediate.  Taking the larger avoids both double counting and a burst piling
    onto a worker whose heartbeat is stale.  Every policy that weighs load uses this one measure.
    """
    return max(w.inflight, w.load.running + w.load.waiting)


@dataclass
class RequestContext:
    """What a policy may look at, and what the frontend's hops forward.

    ``prompt_text`` is the completion prompt or the chat messages' text joined (not the chat-template
    rendering); ``prompt_token_ids`` is set when the client sent ids.  ``raw`` is the client's body as
    received (a one-hop request forwards it untouched) and ``headers`` the headers every hop sends.
    ``policy_state`` belongs to the policy routing the request (KV-aware routing keeps the prompt's block
    hashes there between its prefill and decode choice); the frontend never reads it.
    """

    path: str
    model: str | None
    body: dict[str, Any]
    prompt_text: str | None
    prompt_token_ids: list[int] | None
    prompt_tokens: int
    request_id: str
    raw: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    # True while a decode worker is chosen for a hop that loads the prompt's KV from a prefill worker:
    # the worker caches those blocks only once the transfer is done (KV-aware routing then does not
    # count them as about to be cached there).
    remote_kv: bool = False
    policy_state: object = None

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
