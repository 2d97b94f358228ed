"""Settings of one frontend, each with the ``pdkit frontend`` flag that sets it (:mod:`pdkit.flags`).

Why the flags live here: the command's options, its defaults and the launch plan's argv are all derived
from these fields, so a setting is written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pdkit.config import is_loopback
from pdkit.flags import Flag

__all__ = ["FrontendProcessOptions", "FrontendSettings", "Mode", "is_loopback"]

Mode = Literal["agg", "disagg"]


@dataclass
class FrontendSettings:
    """Everything one frontend needs.  Port 0 binds a free port (tests); :meth:`validate` explains misuse.

    ``disagg_min_prompt_tokens``: in disagg mode, prompts estimated below this many tokens skip the
    prefill hop and go straight to a decode worker (which prefills them itself); 0 disaggregates all.
    ``liveness_timeout_s``: a worker silent this long is dropped (None = 3 heartbeat intervals).
    ``max_inflight_per_worker``: requests this frontend keeps on one worker at most; when every worker
    of a role is full a request waits in the admission queue (docs/frontend.md, "Admission"), oldest
    first, for at most ``queue_timeout_s``; with ``max_queued`` requests already waiting the client gets
    503 + Retry-After.  The defaults (4096 waiting, 600 s) let a burst that vLLM itself would queue be
    queued here too.  ``decode_first_byte_timeout_s``: a streamed decode hop whose first token byte does
    not arrive in time counts as a failed hop (a hung engine) and is retried by the usual rules.
    ``api_key``: when set, every ``/v1/*`` request needs ``Authorization: Bearer <api_key>`` (vLLM's
    ``--api-key``).  ``max_model_len``: the deployment's context length, for refusing prompts that
    cannot fit before any hop (None: the smallest ``max_model_len`` the model's workers report).
    ``seed_first_token``: in disagg mode the client gets the prefill's first token as soon as the
    prefill answers and the decode continues from prompt + that token (docs/seeding.md); requests the
    seeding path cannot reproduce exactly (n > 1, echo, tools, ...) take the unseeded path.

    KV events (docs/kv-routing.md): ``kv_events_port`` is where the frontend binds the SUB socket every
    worker's KV-event publisher connects to.  None (the in-process default) binds it only when the
    policy is ``kv_aware``, then on a free port; ``pdkit frontend`` always passes a port, so the index
    (and its sizes in ``/workers`` and ``pdkit_kv_*``) exists under every policy.  ``hash_seed`` must
    equal the workers' ``PYTHONHASHSEED`` (the deployment's ``hash_seed``), ``model_dir`` is the served
    model folder (tokenizer + chat template; None: the embedded model) and ``block_size`` the workers'
    ``--block-size`` (each worker's registered block size wins).  In disagg mode with a KV-aware
    policy, ``disagg_min_prompt_tokens`` also decides *conditional disaggregation*: a decode worker
    whose cached prefix leaves fewer than that many prompt tokens to compute prefills locally.
    """

    host: Annotated[str, Flag("--host", "Bind address of HTTP and ZMQ (off loopback needs a token).")] = "127.0.0.1"
    port: Annotated[int, Flag("--port", "HTTP port of the OpenAI API.")] = 8000
    zmq_port: Annotated[int, Flag("--zmq-port", "ZMQ ROUTER port workers register with.")] = 8100
    mode: Annotated[Mode, Flag("--mode", "agg (one hop) or disagg (prefill → decode).", cli_type=str)] = "disagg"
    policy: Annotated[str, Flag("--policy", "round_robin | least_loaded | kv_aware.")] = "least_loaded"
    token: Annotated[str | None, Flag("--token", "Shared registry token (env PDKIT_TOKEN).", envvar="PDKIT_TOKEN")] = (
        None
    )
    disagg_min_prompt_tokens: Annotated[
        int, Flag("--disagg-min-prompt-tokens", "Shorter prompts skip the prefill hop (0 = never).")
    ] = 0
    prefill_timeout_s: Annotated[float, Flag("--prefill-timeout-s", "Prefill hop timeout before trying elsewhere.")] = (
        60.0
    )
    connect_timeout_s: float = 5.0
    heartbeat_interval_s: Annotated[float, Flag("--heartbeat-interval-s", "Heartbeat pace told to agents.")] = 1.0
    liveness_timeout_s: Annotated[
        float | None, Flag("--liveness-timeout-s", "Drop a silent worker after this (default 3 beats).")
    ] = None
    max_inflight_per_worker: Annotated[
        int, Flag("--max-inflight-per-worker", "Requests per worker at most; more wait in the queue.")
    ] = 256
    max_queued: Annotated[int, Flag("--max-queued", "Requests that may wait for a worker slot; more get 503.")] = 4096
    queue_timeout_s: Annotated[float, Flag("--queue-timeout-s", "Longest wait for a worker slot before 503.")] = 600.0
    decode_first_byte_timeout_s: Annotated[
        float, Flag("--decode-first-byte-timeout-s", "A streamed decode hop without a first byte by then fails.")
    ] = 120.0
    api_key: Annotated[
        str | None, Flag("--api-key", "Require Authorization: Bearer KEY on /v1/*.", envvar="PDKIT_API_KEY")
    ] = None
    max_model_len: Annotated[int | None, Flag("--max-model-len", "Context length (default: what workers report).")] = (
        None
    )
    tokenizer: Annotated[
        str | None, Flag("--tokenizer", "tokenizer.json for exact prompt lengths (default chars/4).")
    ] = None
    # ``pdkit frontend`` always binds it (8101 unless told; ``--no-kv-events``: None).
    kv_events_port: Annotated[
        int | None,
        Flag(
            "--kv-events-port",
            "Unused: the frontend reads each registered worker's own KV-event socket (docs/security.md).",
            cli_type=int,
            cli_default=8101,
        ),
    ] = None
    hash_seed: Annotated[
        str | int | None,
        Flag("--hash-seed", "The workers' PYTHONHASHSEED (the deployment's hash_seed).", cli_type=str, cli_default="0"),
    ] = 0
    model_dir: Annotated[
        str | None, Flag("--model-dir", "Served model folder: tokenizer + chat template (default: embedded model).")
    ] = None
    block_size: Annotated[int, Flag("--block-size", "The workers' KV block size.")] = 16
    # First-token seeding (docs/seeding.md): stream the prefill's token at once and send the decode
    # prompt + that token, so disaggregated TTFT is the prefill's, not prefill + transfer + decode step.
    # Unset: on for decode workers whose vLLM release has it proven on a GPU (``Stack.seeding_proven``:
    # it relies on that release's NIXL decode side, docs/seeding.md) and for the simulator; True/False
    # force it for every request.
    seed_first_token: Annotated[
        bool | None,
        Flag(
            "--seed-first-token/--no-seed-first-token",
            "Disagg: stream the prefill's first token at once and seed the decode with it (default: where "
            "the decode worker's vLLM has it proven on a GPU; docs/seeding.md).",
        ),
    ] = None
    max_prefill_attempts: int = 2
    max_decode_attempts: int = 2
    retry_after_s: int = 1
    # Registry bound (docs/security.md): registrations beyond it are refused.
    max_workers: int = 4096
    # Legacy: bind one SUB socket on kv_events_port that workers' publishers connect to.  Unauthenticated
    # (any process reaching the port can write into the index), so only in-process tools set it;
    # by default the frontend connects to each registered worker's own publisher instead.
    kv_events_shared_sub: bool = False

    @property
    def kv_events_enabled(self) -> bool:
        """Whether the frontend binds the KV-event SUB socket and keeps a KV index."""
        return self.kv_events_port is not None or self.policy == "kv_aware"

    @property
    def liveness_s(self) -> float:
        return self.liveness_timeout_s if self.liveness_timeout_s is not None else 3 * self.heartbeat_interval_s

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad setting and the fix."""
        if self.mode not in ("agg", "disagg"):
            raise ValueError(f"mode must be agg or disagg, got {self.mode!r}")
        if not is_loopback(self.host) and not self.token:
            raise ValueError(
                f"the frontend binds {self.host} (off loopback) without a shared token; "
                "pass --token or set PDKIT_TOKEN (the same value on every worker)"
            )
        if self.heartbeat_interval_s <= 0 or self.liveness_s <= 0:
            raise ValueError("heartbeat interval and liveness timeout must be positive")
        if self.max_inflight_per_worker < 1:
            raise ValueError("max_inflight_per_worker must be at least 1")
        if self.prefill_timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if self.disagg_min_prompt_tokens < 0:
            raise ValueError("disagg_min_prompt_tokens must be >= 0")
        if self.max_prefill_attempts < 1 or self.max_decode_attempts < 1:
            raise ValueError("attempt counts must be at least 1")
        if self.block_size < 1:
            raise ValueError("block_size must be at least 1 (the workers' --block-size)")
        if self.kv_events_port is not None and not 0 <= self.kv_events_port <= 65535:
            raise ValueError(f"kv_events_port {self.kv_events_port} is not a port (0 = any free port)")
        if self.max_queued < 0:
            raise ValueError("max_queued must be >= 0 (frontend.max_queued, --max-queued; 0 = no queue)")
        if self.queue_timeout_s <= 0:
            raise ValueError("queue_timeout_s must be positive (frontend.queue_timeout_s, --queue-timeout-s)")
        if self.decode_first_byte_timeout_s <= 0:
            raise ValueError(
                "decode_first_byte_timeout_s must be positive "
                "(frontend.decode_first_byte_timeout_s, --decode-first-byte-timeout-s)"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError("max_model_len must be at least 1 (--max-model-len)")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key is empty; pass a non-empty --api-key or leave it unset")
        from pdkit.routing.policies import policy_names

        if self.policy not in policy_names():
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {policy_names()}")


@dataclass
class FrontendProcessOptions:
    """``pdkit frontend``'s options that are about the process, not the :class:`FrontendSettings`."""

    token_file: Annotated[str | None, Flag("--token-file", "File holding the registry token (mode 0600).")] = None
    kv_events: Annotated[
        bool,
        Flag("--kv-events/--no-kv-events", "Keep a KV index (required by kv_aware; off: no KV-event sockets)."),
    ] = True
    stop_grace_s: Annotated[float, Flag("--stop-grace-s", "Drain time on SIGTERM.")] = 30.0
    log_level: Annotated[str, Flag("--log-level", "debug | info | warning.")] = "info"
