"""A worker's side of the registry protocol: the messages it sends and what the frontend's acks mean.

Why one home: two clients speak this protocol -- the worker agent (:mod:`pdkit.agent`: sends without
waiting, reads acks in a task of its own) and the in-process client of tests and tools
(:mod:`pdkit.frontend.testing`: one request, one ack).  Who owns a worker id, when its session key is
kept or voided and when to register again are security rules (docs/security.md: only the holder of a
registration's key may speak for its worker id), so both must follow them identically; how each moves
bytes over its ZMQ socket is its own business.
"""

from __future__ import annotations

from pdkit.protocol import Ack, Deregister, Heartbeat, Load, Register, WorkerInfo


class RegistrySession:
    """One worker's registration state: token, session key (from the registration's ack), heartbeat seq."""

    def __init__(self, info: WorkerInfo, token: str | None) -> None:
        self.info = info
        self.token = token
        self.session_key: str | None = None
        self.seq = 0

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    def register(self) -> Register:
        """The registration (a re-registration carries the key it holds, so the frontend knows it is us)."""
        return Register(token=self.token, worker=self.info, session_key=self.session_key)

    def heartbeat(self, load: Load) -> Heartbeat:
        self.seq += 1
        return Heartbeat(
            token=self.token, worker_id=self.worker_id, session_key=self.session_key, seq=self.seq, load=load
        )

    def deregister(self, reason: str) -> Deregister:
        return Deregister(token=self.token, worker_id=self.worker_id, session_key=self.session_key, reason=reason)

    def on_ack(self, ack: Ack) -> bool:
        """Take in one ack; True when the frontend asks this worker to register again.

        A successful registration's ack gives the key for this worker id; a refusal with ``reregister``
        (the frontend restarted or reaped the worker) voids the key, so the next registration gets a
        fresh one.  Any other ack changes nothing.
        """
        if ack.ok and ack.session_key and ack.worker_id == self.worker_id:
            self.session_key = ack.session_key
            return False
        if not ack.ok and ack.reregister:
            self.session_key = None
            return True
        return False
