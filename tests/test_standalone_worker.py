"""A standalone ``pdkit worker --config ... --index i`` (the multi-node form) gets worker i's ports of the plan.

Why: on another host nothing but the shared config tells a worker its ports, so they must be exactly what
``pdkit launch`` would give worker ``i`` of its role -- the NIXL side channel and KV-event ports included
-- with the config's ``port_offset`` added once (it was added twice before), and the registry port taken
as written in ``--frontend`` (a real port, never shifted).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdkit.config import load_deployment
from pdkit.errors import ConfigError
from pdkit.plan import build_plan, worker_spec
from pdkit.worker_cli import standalone_deployment


def config(tmp_path: Path, **extra: object) -> Path:
    data = {"engine": "vllm", "decode": {"count": 2, "gpus": [[0], [1]]}, "prefill": {"gpus": [[2]]}, **extra}
    path = tmp_path / "dep.yaml"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("offset", [0, 1000])
@pytest.mark.parametrize(("role", "index"), [("decode", 0), ("decode", 1), ("prefill", 0)])
def test_standalone_worker_ports_equal_the_plans(tmp_path: Path, offset: int, role: str, index: int) -> None:
    cfg = config(tmp_path, port_offset=offset)
    plan = build_plan(load_deployment(str(cfg), {"run_dir": str(tmp_path / "run")}))
    planned = next(p for p in plan.processes if p.name == f"{role}-{index}")
    zmq = plan.processes[0].ports["zmq"]
    opts = {"role": role, "frontend": f"tcp://127.0.0.1:{zmq}", "config": str(cfg), "index": index,
            "run_dir": str(tmp_path / "run")}  # fmt: skip
    dep = standalone_deployment(opts)
    alone = worker_spec(dep, role, 0, tmp_path / "run")
    assert alone.ports == planned.ports
    assert alone.ports["http"] == {"decode": 8400, "prefill": 8300}[role] + offset + index
    assert alone.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == planned.env["VLLM_NIXL_SIDE_CHANNEL_PORT"]
    assert alone.cuda_visible_devices == planned.cuda_visible_devices
    assert dep.frontend.zmq_port == zmq  # as written in --frontend: not shifted again
    assert f"tcp://127.0.0.1:{zmq}" in alone.argv


def test_port_and_gpus_flags_override_and_bad_gpus_is_one_line(tmp_path: Path) -> None:
    cfg = config(tmp_path, port_offset=1000)
    opts = {"role": "decode", "frontend": "tcp://10.0.0.1:9100", "config": str(cfg), "port": 8999, "gpus": "3,4"}
    dep = standalone_deployment(opts)
    spec = worker_spec(dep, "decode", 0, tmp_path)
    assert spec.ports["http"] == 8999 and spec.cuda_visible_devices == "3,4"
    assert dep.decode.tensor_parallel_size == 2
    with pytest.raises(ConfigError, match="--gpus"):
        standalone_deployment({**opts, "gpus": "0,x"})
