"""The simulator's latency and capacity model (one engine step at a time).

Why a step model: vLLM's V1 scheduler runs one forward pass per step over a mixed batch -- chunks of
prompts being prefilled plus one token for every running decode -- so a request's TTFT and ITL depend
on what else shares its steps.  Modelling the step (not the request) gives load, batching and
interference effects for free, and prefix-cache hits shrink the prefill part of the step they land in.

Step time (milliseconds)::

    fixed  = max(prefill_batch_ms if prefill tokens else 0, decode_step_ms if decodes else 0)
    step   = fixed
           + prefill_per_token_ms   * prefill tokens computed (cache hits are not computed)
           + decode_per_seq_ms      * decoding sequences
           + decode_per_ctx_token_ms * total context tokens of the decoding sequences

Defaults are calibrated on one H200 with pdkit's synthetic Llama-8B (bf16, vLLM 0.26.0, --enforce-eager;
docs/gpu-results.md, ``scripts/gpu_check_pd.py --stage agg``): TTFT of a lone prompt was 24 ms at 400
tokens and 188 ms at 6000 (-> 0.029 ms/token + 12.5 ms); a decode step took 15.4 ms at batch 1 and
18.1 ms at batch 64 (-> 15.4 ms + 0.043 ms/sequence); the KV-read term is the bandwidth estimate
(128 KiB per token at ~4.8 TB/s).  NIXL moved 394 MB in 3.5 ms and 789 MB in 3.4 ms between the two
NVLinked H200s (-> ~2 ms + bytes at 400 GB/s).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LatencyModel:
    """Per-step cost coefficients (ms) of one simulated engine; see the module docstring."""

    prefill_per_token_ms: float = 0.029
    prefill_batch_ms: float = 12.5
    decode_step_ms: float = 15.4
    decode_per_seq_ms: float = 0.043
    decode_per_ctx_token_ms: float = 0.000027
    kv_transfer_fixed_ms: float = 2.0
    kv_transfer_gb_per_s: float = 400.0

    def step_ms(self, prefill_tokens: int, decode_seqs: int, decode_ctx_tokens: int) -> float:
        """Duration of one engine step that computes ``prefill_tokens`` and ``decode_seqs`` decodes."""
        if prefill_tokens <= 0 and decode_seqs <= 0:
            return 0.0
        fixed = max(
            self.prefill_batch_ms if prefill_tokens > 0 else 0.0,
            self.decode_step_ms if decode_seqs > 0 else 0.0,
        )
        return (
            fixed
            + self.prefill_per_token_ms * max(prefill_tokens, 0)
            + self.decode_per_seq_ms * max(decode_seqs, 0)
            + self.decode_per_ctx_token_ms * max(decode_ctx_tokens, 0)
        )

    def transfer_ms(self, num_bytes: int) -> float:
        """Time to move ``num_bytes`` of KV from a prefill to a decode worker."""
        if num_bytes <= 0:
            return 0.0
        return self.kv_transfer_fixed_ms + num_bytes / (self.kv_transfer_gb_per_s * 1e9) * 1e3


def kv_bytes_per_token(config: dict[str, object], dtype_bytes: int = 2) -> int:
    """KV bytes one token occupies on one worker (K and V, every layer), from a HF ``config.json``.

    Llama-3-8B: 2 * 32 layers * 8 KV heads * 128 dims * 2 bytes = 128 KiB.
    """

    def _int(key: str, default: int) -> int:
        value = config.get(key, default)
        return int(value) if isinstance(value, int | float | str) else default

    layers = _int("num_hidden_layers", 32)
    heads = _int("num_attention_heads", 32)
    kv_heads = _int("num_key_value_heads", heads)
    head_dim = _int("head_dim", _int("hidden_size", 4096) // max(heads, 1))
    return 2 * layers * kv_heads * head_dim * dtype_bytes
