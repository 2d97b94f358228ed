"""The latency model's arithmetic and the KV size it derives from the embedded model's config."""

from __future__ import annotations

import json

import pytest

from pdkit.sim.latency import LatencyModel, kv_bytes_per_token
from pdkit.sim.settings import SimSettings, default_model_path


def test_step_time_components() -> None:
    m = LatencyModel(prefill_per_token_ms=0.06, prefill_batch_ms=8.0, decode_step_ms=7.0, decode_per_seq_ms=0.02)
    assert m.step_ms(0, 0, 0) == 0.0
    assert m.step_ms(1000, 0, 0) == pytest.approx(8.0 + 60.0)
    assert m.step_ms(0, 10, 10_000) == pytest.approx(7.0 + 0.2 + 0.27)
    # a mixed step pays the larger fixed cost once
    assert m.step_ms(100, 10, 0) == pytest.approx(8.0 + 6.0 + 0.2)
    assert m.step_ms(2000, 0, 0) > m.step_ms(1000, 0, 0)
    assert m.step_ms(0, 64, 0) > m.step_ms(0, 1, 0)


def test_transfer_time() -> None:
    m = LatencyModel(kv_transfer_fixed_ms=2.0, kv_transfer_gb_per_s=10.0)
    assert m.transfer_ms(0) == 0.0
    assert m.transfer_ms(10**9) == pytest.approx(102.0)


def test_kv_bytes_of_the_synthetic_llama_8b() -> None:
    cfg = json.loads((default_model_path() / "config.json").read_text())
    assert kv_bytes_per_token(cfg) == 2 * 32 * 8 * 128 * 2  # 128 KiB per token in bf16


@pytest.mark.parametrize(
    "kw",
    [{"role": "both"}, {"block_size": 0}, {"kv_capacity_blocks": 1}, {"time_scale": -1}, {"kv_transport": "tcp"}],
)
def test_settings_validation(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SimSettings(**kw).validate()  # type: ignore[arg-type]
