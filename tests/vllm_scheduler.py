"""vLLM 0.26.0's real ``Scheduler`` on CPU, for tests that need vLLM's own cache decisions.

Import only after ``pytest.importorskip("vllm")``.  Real: Scheduler, KVCacheManager, the embedded model's
ModelConfig, SchedulerConfig, CacheConfig (prefix caching on), the KV-event publisher vLLM builds from
``kv_events_config``, and the connector of ``kv_transfer_config``.  The KV cache is one full-attention
layer of a tiny shape with no tensors: the scheduler only counts blocks (the model runner, which would
need them, is what the tests stand in for).
"""

from __future__ import annotations

import pytest
import torch
from vllm.config import (
    CacheConfig,
    DeviceConfig,
    KVEventsConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.utils.hashing import sha256
from vllm.v1.core import kv_cache_utils as kcu
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.structured_output import StructuredOutputManager

from pdkit.model_files import default_model_dir


def seed_block_hashing(monkeypatch: pytest.MonkeyPatch, seed: str) -> None:
    """vLLM's chain root from PYTHONHASHSEED, as on a pdkit worker; no stray LMCACHE_* from the shell."""
    monkeypatch.setenv("PYTHONHASHSEED", seed)
    for key in ("LMCACHE_CHUNK_SIZE", "LMCACHE_SAVE_UNFULL_CHUNK", "LMCACHE_LOCAL_CPU", "LMCACHE_LOCAL_DISK"):
        monkeypatch.delenv(key, raising=False)
    kcu.init_none_hash(sha256)


def real_scheduler(
    *,
    block_size: int,
    num_blocks: int,
    max_model_len: int,
    kv_events_config: KVEventsConfig,
    kv_transfer_config: KVTransferConfig | None = None,
) -> tuple[Scheduler, VllmConfig, KVCacheConfig]:
    """A scheduler over ``num_blocks`` blocks; also the configs (a worker-side connector needs them)."""
    config = VllmConfig(
        model_config=ModelConfig(model=str(default_model_dir()), max_model_len=max_model_len, dtype="float16",
                                 skip_tokenizer_init=True),
        scheduler_config=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=max_model_len,
                                         max_model_len=max_model_len, is_encoder_decoder=False),
        cache_config=CacheConfig(block_size=block_size, enable_prefix_caching=True),
        kv_transfer_config=kv_transfer_config,
        kv_events_config=kv_events_config,
        device_config=DeviceConfig(device="cpu"),
    )  # fmt: skip
    config.cache_config.num_gpu_blocks = num_blocks
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=2, head_size=8, dtype=torch.bfloat16)
    kv_config = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(["model.layers.0.self_attn.attn"], spec)],
    )
    scheduler = Scheduler(vllm_config=config, kv_cache_config=kv_config,
                          structured_output_manager=StructuredOutputManager(config), block_size=block_size,
                          log_stats=True)  # fmt: skip
    return scheduler, config, kv_config
