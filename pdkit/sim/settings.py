"""Settings of one simulated engine (what ``pdkit sim-worker`` options map to)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pdkit.sim.latency import LatencyModel

SimRole = Literal["prefill", "decode", "agg"]
SIM_ROLES: tuple[str, ...] = ("prefill", "decode", "agg")


def default_model_path() -> Path:
    """The embedded synthetic model folder (tokenizer + config)."""
    try:
        from pdkit.model_files import default_model_dir

        return default_model_dir()
    except ImportError:  # pragma: no cover - model_files is part of the package
        return Path(__file__).resolve().parent.parent / "models" / "synth-llama-8b"


@dataclass
class SimSettings:
    """Everything one simulated engine needs; defaults match ``pdkit sim-worker`` defaults.

    ``time_scale`` multiplies every simulated duration (0 = never sleep: tests; 0.1 = ten times faster
    than the modelled GPU: fleet simulation).  ``kv_lease_s`` is wall-clock, like NIXL's
    ``kv_lease_duration``, and is *not* scaled.  ``hash_seed`` plays ``PYTHONHASHSEED``'s role for block
    hashes (taken from the environment when None, like vLLM); KV-aware routing needs the same seed on
    the frontend.  ``seed`` feeds the output generator: workers that must agree token for token (the
    prefill, decode and agg workers of one deployment) need the same seed.
    """

    role: SimRole = "agg"
    host: str = "127.0.0.1"
    port: int = 0
    served_model_name: str = "synth"
    model: Path = field(default_factory=default_model_path)
    block_size: int = 16
    kv_capacity_blocks: int = 50_000
    kv_events_endpoint: str | None = None
    kv_events_replay_endpoint: str | None = None
    kv_events_topic: str = ""
    kv_events_bind: bool | None = None
    time_scale: float = 1.0
    seed: int = 0
    kv_lease_s: float = 30.0
    max_num_seqs: int = 1024
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    engine_id: str | None = None
    advertise_host: str | None = None
    hash_algo: str = "sha256"
    hash_seed: str | None = field(default_factory=lambda: os.environ.get("PYTHONHASHSEED"))
    tp_size: int = 1
    kv_transport: Literal["http", "nixl"] = "http"
    kv_wire_bytes_per_block: int = 0
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
