"""Settings of one simulated engine (what ``pdkit sim-worker`` options map to)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pdkit.flags import Flag
from pdkit.sim.latency import LatencyModel

SimRole = Literal["prefill", "decode", "agg"]
SIM_ROLES: tuple[str, ...] = ("prefill", "decode", "agg")

# An endpoint flag: the CLI takes a string whose empty value means off (the field's None).
_EMPTY_IS_OFF: dict[str, Any] = {"cli_type": str, "cli_default": "", "parse": lambda value: value or None}


def default_model_path() -> Path:
    """The embedded synthetic model folder (tokenizer + config)."""
    try:
        from pdkit.model_files import default_model_dir

        return default_model_dir()
    except ImportError:  # pragma: no cover - model_files is part of the package
        return Path(__file__).resolve().parent.parent / "models" / "synth-llama-8b"


@dataclass
class SimSettings:
    """Everything one simulated engine needs; the flagged fields are ``pdkit sim-worker``'s options.

    Defaults match the command's except ``port`` (the CLI's 8100; 0 = a free port in-process); a CLI
    ``--model`` / ``--hash-seed`` left out keeps the field's default factory.

    ``time_scale`` multiplies every simulated duration (0 = never sleep: tests; 0.1 = ten times faster
    than the modelled GPU: fleet simulation).  ``kv_lease_s`` is wall-clock, like NIXL's
    ``kv_lease_duration``, and is *not* scaled.  ``hash_seed`` plays ``PYTHONHASHSEED``'s role for block
    hashes (taken from the environment when None, like vLLM); KV-aware routing needs the same seed on
    the frontend.  ``seed`` feeds the output generator: workers that must agree token for token (the
    prefill, decode and agg workers of one deployment) need the same seed.
    """

    role: Annotated[SimRole, Flag("--role", "prefill | decode | agg", cli_type=str)] = "agg"
    host: Annotated[str, Flag("--host", "Bind address.")] = "127.0.0.1"
    port: Annotated[int, Flag("--port", "HTTP port (0 = pick a free one).", cli_default=8100)] = 0
    served_model_name: Annotated[str, Flag("--served-model-name", "Model name clients use.")] = "synth"
    model: Annotated[
        Path,
        Flag(
            "--model",
            "Folder with tokenizer.json, tokenizer_config.json, config.json.",
            cli_type=Path | None,
            cli_default=None,
        ),
    ] = field(default_factory=default_model_path)
    block_size: Annotated[int, Flag("--block-size", "KV block size in tokens.")] = 16
    kv_capacity_blocks: Annotated[int, Flag("--kv-capacity-blocks", "KV cache size in blocks.")] = 50_000
    # The CLI spells "off" as an empty endpoint; the settings as None.
    kv_events_endpoint: Annotated[
        str | None, Flag("--kv-events-endpoint", "ZMQ PUB endpoint (tcp://*:5557 binds); empty = off.", **_EMPTY_IS_OFF)
    ] = None
    kv_events_replay_endpoint: Annotated[
        str | None, Flag("--kv-events-replay-endpoint", "ZMQ ROUTER endpoint for replay; empty = off.", **_EMPTY_IS_OFF)
    ] = None
    kv_events_topic: Annotated[str, Flag("--kv-events-topic", "Topic frame of every batch.")] = ""
    kv_events_bind: bool | None = None
    time_scale: Annotated[float, Flag("--time-scale", "Multiply simulated latencies (0 = no sleeps).")] = 1.0
    seed: Annotated[int, Flag("--seed", "Output-model seed (same on every worker).")] = 0
    kv_lease_s: Annotated[
        float, Flag("--kv-lease-duration", "Seconds a prefill holds KV for the decode (NIXL: 30).")
    ] = 30.0
    max_num_seqs: int = 1024
    max_num_batched_tokens: int = 8192
    max_model_len: Annotated[int | None, Flag("--max-model-len", "Context window (default: the model config's).")] = (
        None
    )
    engine_id: str | None = None
    advertise_host: Annotated[
        str | None, Flag("--advertise-host", "Host put in kv_transfer_params (default: --host).")
    ] = None
    hash_algo: str = "sha256"
    hash_seed: Annotated[
        str | None,
        Flag("--hash-seed", "Block-hash seed (vLLM uses PYTHONHASHSEED; default: that variable).", cli_default=None),
    ] = field(default_factory=lambda: os.environ.get("PYTHONHASHSEED"))
    tp_size: int = 1
    kv_transport: Annotated[
        Literal["http", "nixl"],
        Flag("--kv-transport", "How KV moves P->D: http (built in) or nixl (needs nixl).", cli_type=str),
    ] = "http"
    kv_wire_bytes_per_block: Annotated[
        int, Flag("--kv-wire-bytes-per-block", "nixl transport: bytes really moved per block.")
    ] = 0
    latency: LatencyModel = field(default_factory=LatencyModel)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad field."""
        if self.role not in SIM_ROLES:
            raise ValueError(f"role must be one of {SIM_ROLES}, got {self.role!r}")
        if self.block_size <= 0:
            raise ValueError("block_size must be positive")
        if self.kv_capacity_blocks < 2:
            raise ValueError("kv_capacity_blocks must be at least 2")
        if self.time_scale < 0:
            raise ValueError("time_scale must be >= 0")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        if self.kv_lease_s <= 0:
            raise ValueError("kv_lease_s must be positive")
        if self.kv_transport not in ("http", "nixl"):
            raise ValueError(f"kv_transport must be http or nixl, got {self.kv_transport!r}")
        if self.kv_transport == "nixl":
            from pdkit.sim.transport import nixl_available

            if not nixl_available():
                raise ValueError("kv_transport nixl needs the nixl package (pip install nixl==1.5.1)")
        if not (Path(self.model) / "tokenizer.json").is_file():
            raise ValueError(f"model folder {self.model} has no tokenizer.json")
