"""ZMQ registry messages between worker agents and the frontend (protocol version 2).

Why its own module: the agent and the frontend are separate processes, possibly on separate hosts and
of separate pdkit versions during a rolling upgrade, so the wire format must be explicit, versioned and
safe to parse from an untrusted peer.  Every message is one ZMQ frame of JSON (never pickle: a pickle
from the network is remote code execution), validated by pydantic and discriminated by ``type``.

Transport: the frontend binds a ROUTER socket, each agent connects a DEALER.  Agents send
``register`` / ``heartbeat`` / ``deregister``; the frontend answers every one with an ``ack``.  A
heartbeat for a worker the frontend does not know gets ``ok=false`` with an error that mentions
"register", which tells the agent to register again (the frontend restarted).  No other error may
contain that word: an agent would re-register in a loop.

Version 2 (docs/security.md): a registration's ack carries a random per-worker ``session_key``; the
worker's heartbeats and its deregistration must present it, so a process that knows only a worker's id
(or even the deployment token) cannot steer, starve or remove another agent's worker.  A second
registration of a live id is refused unless it presents that key.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

PROTOCOL_VERSION = 2

Role = Literal["prefill", "decode", "agg"]
Engine = Literal["vllm", "sim"]


class _Model(BaseModel):
    # Unknown fields are ignored rather than rejected so a newer agent with an extra optional field
    # can still talk to an older frontend of the same protocol version.
    model_config = ConfigDict(extra="ignore", frozen=True)


class WorkerInfo(_Model):
    """What the frontend needs to route to one engine, sent once at registration."""

    worker_id: str = Field(min_length=1, max_length=256)
    role: Role
    url: str = Field(pattern=r"^https?://[^/\s]+$", description="engine base URL, http://host:port, no path")
    model: str = Field(min_length=1, description="served model name")
    engine: Engine = "vllm"
    nixl_side_channel: str | None = None
    kv_events_endpoint: str | None = None
    kv_events_replay_endpoint: str | None = None
    kv_events_topic: str | None = None
    block_size: int = Field(default=16, ge=1)
    # False when the engine runs with --no-enable-prefix-caching: it caches nothing a later request could
    # hit, so KV-aware routing must not expect the blocks it sends there to be reused (optional field).
    prefix_caching: bool = True
    # The engine's context length (vLLM's /v1/models ``max_model_len``), so the frontend can refuse a
    # prompt + max_tokens that cannot fit before it spends a prefill on it.  None = not reported.
    max_model_len: int | None = Field(default=None, ge=1)
    # The engine's vLLM release (package metadata on the worker's host), so the frontend can follow that
    # release's rules where it re-implements them (the seeded stream's stop-string check).  None = unknown:
    # the newest known release's rules.
    engine_version: str | None = Field(default=None, max_length=64)
    # The worker's NIXL transfer direction (from its --kv-transfer-config), so the frontend knows it on
    # vLLM 0.26, whose prefill answers do not say: push pairs the two hops by request id, which a seeded
    # chat request cannot satisfy (pdkit.frontend.seeding).  None = no NIXL connector or unknown.
    nixl_mode: Literal["pull", "push"] | None = None
    pid: int | None = None

    @field_validator("url", mode="before")
    @classmethod
    def _strip_slash(cls, v: object) -> object:
        # "http://h:p/" and "http://h:p" name the same engine; the frontend appends paths itself.
        return v.rstrip("/") if isinstance(v, str) else v


class Load(_Model):
    """Engine load scraped by the agent from the engine's ``/metrics`` (vLLM metric names)."""

    running: int = Field(default=0, ge=0)
    waiting: int = Field(default=0, ge=0)
    kv_usage: float = Field(default=0.0, ge=0.0)
    # Cumulative cache counters (tokens) from the same scrape, for predicted-vs-actual prefix hits
    # (pdkit_kv_actual_*): vllm:prefix_cache_hits / vllm:prefix_cache_queries and PdConnector's
    # pdkit:lmcache_hit_tokens.  Optional: None = not reported (older agents; still protocol version 1,
    # older frontends ignore unknown fields).
    prefix_cache_hits: float | None = Field(default=None, ge=0.0)
    prefix_cache_queries: float | None = Field(default=None, ge=0.0)
    lmcache_hit_tokens: float | None = Field(default=None, ge=0.0)
    # False when the agent's last probe of the engine (/health, /metrics) timed out or failed although
    # the process is alive (e.g. SIGSTOPped or wedged): the frontend sends it no new requests.
    healthy: bool = True
    unhealthy_reason: str | None = Field(default=None, max_length=512)


SessionKey = Annotated[str, Field(min_length=1, max_length=128)]


class Register(_Model):
    type: Literal["register"] = "register"
    version: int = PROTOCOL_VERSION
    token: str | None = None
    worker: WorkerInfo
    # The key of an earlier registration of this id (an agent re-registering after a frontend hiccup):
    # lets it take its live record back; without it a live id is refused.
    session_key: SessionKey | None = None


class _AboutWorker(_Model):
    """The header of an agent's message about a worker it registered: whose, and the key proving it.

    ``type`` is narrowed to a literal by each subclass; declaring it here keeps it the first key on the wire.
    """

    type: str
    version: int = PROTOCOL_VERSION
    token: str | None = None
    worker_id: str = Field(min_length=1, max_length=256)
    session_key: SessionKey | None = None


class Heartbeat(_AboutWorker):
    type: Literal["heartbeat"] = "heartbeat"
    seq: int = Field(default=0, ge=0)
    load: Load = Field(default_factory=Load)


class Deregister(_AboutWorker):
    type: Literal["deregister"] = "deregister"
    reason: str = Field(default="", max_length=512)


class Ack(_Model):
    """The frontend's reply to every agent message; ``heartbeat_interval_s`` tells the agent the pace."""

    type: Literal["ack"] = "ack"
    version: int = PROTOCOL_VERSION
    ok: bool = True
    error: str | None = None
    heartbeat_interval_s: float | None = None
    # Set on the ack of a successful registration only: the worker's key for its later messages.
    worker_id: str | None = None
    session_key: str | None = None
    # True only when the frontend does not know the worker (it restarted, or reaped it): register again.
    # Agents act on this flag, not on the error text, so no error wording can make them loop.
    reregister: bool = False


Message = Annotated[Register | Heartbeat | Deregister | Ack, Field(discriminator="type")]
_ADAPTER: TypeAdapter[Register | Heartbeat | Deregister | Ack] = TypeAdapter(Message)

# Upper bound on one frame: a registration is a few hundred bytes; refusing large frames before JSON
# parsing keeps a misbehaving peer from making the frontend allocate and parse megabytes.
MAX_MESSAGE_BYTES = 64 * 1024


class ProtocolError(ValueError):
    """A frame that is not a valid message of this version; the text says what is wrong, for the ack."""


def version_mismatch(theirs: object, side: str = "frontend") -> str:
    """The one line both sides print when the other speaks another protocol version."""
    return (
        f"protocol version {theirs} not supported ({side} speaks {PROTOCOL_VERSION}); "
        "run the same pdkit version on agents and frontend"
    )


def peek_version(raw: bytes) -> object:
    """The ``version`` field of a frame that failed to parse (None when it has none): an agent uses it to
    say "the frontend speaks version 1" instead of silently ignoring an ack it cannot read."""
    import json

    try:
        obj = json.loads(raw[:MAX_MESSAGE_BYTES])
    except ValueError:
        return None
    return obj.get("version") if isinstance(obj, dict) else None


def parse_message(raw: bytes) -> Register | Heartbeat | Deregister | Ack:
    """Decode one frame; raises :class:`ProtocolError` (a ``ValueError``) on anything invalid.

    The version is checked explicitly so an agent of another protocol version gets a message that
    names the mismatch instead of a pydantic field error.
    """
    if len(raw) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(raw)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        msg = _ADAPTER.validate_json(raw)
    except ValidationError as exc:
        theirs = peek_version(raw)
        if isinstance(theirs, int) and theirs != PROTOCOL_VERSION:
            # Another version's frame may not fit this version's schema: name the mismatch, not a field.
            raise ProtocolError(version_mismatch(theirs)) from None
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": str(exc)}
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise ProtocolError(f"invalid message: {where}: {first.get('msg')}".replace(": :", ":")) from None
    if msg.version != PROTOCOL_VERSION:
        raise ProtocolError(version_mismatch(msg.version))
    return msg


def encode(msg: Register | Heartbeat | Deregister | Ack) -> bytes:
    """One JSON frame; ``None`` fields are kept so the wire shape matches docs/architecture.md."""
    return msg.model_dump_json().encode()


__all__ = [
    "PROTOCOL_VERSION",
    "Ack",
    "Deregister",
    "Engine",
    "Heartbeat",
    "Load",
    "Message",
    "ProtocolError",
    "Register",
    "Role",
    "SessionKey",
    "WorkerInfo",
    "encode",
    "parse_message",
    "peek_version",
    "version_mismatch",
]
