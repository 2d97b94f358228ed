"""Deployment validation: every bad configuration ends in one line naming the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdkit.config import Deployment, load_deployment
from pdkit.errors import ConfigError


def test_defaults_are_a_valid_1p1d_deployment() -> None:
    dep = load_deployment()
    assert dep.mode == "disagg"
    assert dep.prefill.gpus == [[1]] and dep.decode.gpus == [[0]]
    assert dep.roles() == ("decode", "prefill")


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"prefill.gpus": [[0]]}, "prefill.gpus", "GPU 0 is used by both"),
        ({"decode.http_port_base": 8300}, "HTTP port", "port 8300 is also used"),
        ({"frontend.port": 8400}, "frontend.port", "port 8400 is also used"),
        ({"prefill.gpus": [[1, 2]]}, "prefill.gpus[0]", "tensor_parallel_size 1"),
        ({"prefill.tensor_parallel_size": 2}, "prefill.gpus[0]", "tensor_parallel_size 2"),
        ({"lmcache.cpu_gb": 0}, "lmcache.cpu_gb", "positive"),
        ({"lmcache.chunk_size": -256}, "lmcache.chunk_size", "positive"),
        ({"lmcache.disk_gb": -1}, "lmcache.disk_gb", "positive"),
        ({"lmcache.disk_path": "/tmp/x"}, "lmcache.disk_gb", "no disk size"),
        ({"model": "/no/such/model"}, "model", "does not exist"),
        ({"prefill.gpu": [[1]]}, "prefill.gpu", "unknown key"),
        ({"colour": "red"}, "colour", "unknown key"),
        ({"mode": "both"}, "mode", "allowed values"),
        ({"frontend.host": "0.0.0.0"}, "frontend.token", "without a shared token"),
        ({"prefill.count": 2}, "prefill.gpus", "count is 2 but 1 GPU groups"),
    ],
)
def test_bad_config_is_one_line_naming_field_and_fix(overrides: dict, field: str, words: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_deployment(None, overrides)
    message = str(exc.value)
    assert "\n" not in message
    assert field in message
    assert words in message
    assert ";" in message  # "<field>: <problem>; <fix>"


def test_model_folder_without_config_json_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no config.json"):
        load_deployment(None, {"model": str(tmp_path)})


def test_hub_name_is_accepted_without_path_check() -> None:
    assert load_deployment(None, {"model": "meta-llama/Llama-3.1-8B-Instruct"}).served_name == (
        "meta-llama/Llama-3.1-8B-Instruct"
    )


def test_sim_engine_needs_no_gpus() -> None:
    dep = load_deployment(None, {"engine": "sim", "prefill.count": 4, "decode.count": 8})
    assert dep.prefill.num_workers == 4 and dep.decode.num_workers == 8


def test_yaml_presets_load_and_flags_override(tmp_path: Path) -> None:
    for preset in ("agg", "disagg-1p1d", "disagg-2p2d", "disagg-tp2", "sim-4p8d"):
        assert isinstance(load_deployment(preset), Deployment)
    dep = load_deployment("disagg-1p1d", {"frontend.port": 9000})
    assert dep.frontend.port == 9000
    bad = tmp_path / "bad.yaml"
    bad.write_text("prefill: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_deployment(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_deployment(str(tmp_path / "missing.yaml"))


def test_partial_group_keeps_role_default_ports() -> None:
    dep = load_deployment(None, {"prefill.gpus": [[3]]})
    assert dep.prefill.http_port_base == 8300
    assert dep.prefill.gpus == [[3]]


def test_share_gpus_splits_the_gpu_or_checks_the_given_share() -> None:
    dep = load_deployment(None, {"prefill.gpus": [[0]], "share_gpus": True})
    assert dep.prefill.gpus == dep.decode.gpus == [[0]]
    assert dep.workers_per_gpu() == 2 and dep.effective_gpu_memory_utilization == 0.45
    four = load_deployment(None, {"prefill.gpus": [[0], [0], [0]], "share_gpus": True})
    assert four.workers_per_gpu() == 4 and four.effective_gpu_memory_utilization == 0.22
    given = load_deployment(None, {"prefill.gpus": [[0]], "share_gpus": True, "gpu_memory_utilization": 0.4})
    assert given.effective_gpu_memory_utilization == 0.4
    with pytest.raises(ConfigError, match=r"2 workers share one GPU .*at most 0\.47"):
        load_deployment(None, {"prefill.gpus": [[0]], "share_gpus": True, "gpu_memory_utilization": 0.6})
    assert load_deployment(None, {}).effective_gpu_memory_utilization is None  # vLLM's own default


def test_config_folder_and_unknown_preset_are_named_as_such(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory, not a YAML file"):
        load_deployment(str(tmp_path))
    with pytest.raises(ConfigError, match="'disagg-9p9d' is neither a file nor a preset.*disagg-2p2d"):
        load_deployment("disagg-9p9d")


def test_presets_resolve_through_the_installed_package() -> None:
    from pdkit.config import preset_names, presets_dir, resolve_config_path

    assert (presets_dir() / "disagg-2p2d.yaml").is_file()
    assert {"agg", "disagg-1p1d", "disagg-2p2d", "disagg-tp2", "sim-4p8d"} <= set(preset_names())
    assert resolve_config_path("sim-4p8d") == presets_dir() / "sim-4p8d.yaml"


@pytest.mark.parametrize(
    ("model", "words"),
    [
        ("meta-llama/Llama-3.1-8B-Instruct", "is not a local folder"),
        ("./no/such/folder", "does not exist"),
    ],
)
def test_sim_engine_refuses_a_model_it_cannot_tokenize(model: str, words: str) -> None:
    """The simulator reads tokenizer.json from a local folder (pdkit.sim.settings) and downloads nothing."""
    with pytest.raises(ConfigError, match=words) as exc:
        load_deployment(None, {"engine": "sim", "model": model})
    assert "tokenizer.json" in str(exc.value)


def test_sim_engine_takes_a_local_folder_with_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="has no tokenizer.json"):
        load_deployment(None, {"engine": "sim", "model": str(tmp_path)})
    (tmp_path / "tokenizer.json").write_text("{}")
    assert load_deployment(None, {"engine": "sim", "model": str(tmp_path)}).model == str(tmp_path)


def test_port_offset_shifts_every_port_once() -> None:
    from pdkit.config import port_fields

    plain = dict(port_fields(load_deployment(None, {})))
    dep = load_deployment(None, {"port_offset": 1000, "frontend.port": 8500})
    shifted = dict(port_fields(dep))
    assert set(shifted) == set(plain) and len(plain) == 18  # 3 frontend ports + 5 bases x 3 roles (2: LMCache MP)
    assert shifted["frontend.port"] == 9500  # a port given explicitly moves too
    assert all(shifted[k] == v + 1000 for k, v in plain.items() if k != "frontend.port")
    assert Deployment.model_validate(dep.model_dump()).frontend.port == 9500  # round trip does not shift again


def test_port_offset_may_not_push_a_port_past_65535() -> None:
    assert load_deployment(None, {"port_offset": 57000}).decode.http_port_base == 65400
    with pytest.raises(ConfigError, match=r"port_offset: frontend\.port 8000 \+ port_offset 58000 .*> 65535"):
        load_deployment(None, {"port_offset": 58000})
    # the highest port of a group is base + (workers - 1)
    with pytest.raises(ConfigError, match=r"decode\.http_port_base 8400 \+ port_offset 57000 reaches port 65536"):
        load_deployment(None, {"port_offset": 57000, "engine": "sim", "decode.count": 137})
    with pytest.raises(ConfigError, match="port_offset"):
        load_deployment(None, {"port_offset": -1})
