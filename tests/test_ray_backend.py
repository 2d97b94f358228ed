"""``pdkit launch … --backend ray`` (issue 20) on a real local Ray cluster with simulated nodes.

The cluster is Ray's own ``ray.cluster_utils.Cluster``: three raylets on this machine, each declaring
two logical GPUs, so placement groups, SPREAD, actor restarts and teardown are Ray's real behaviour;
the engines are pdkit's simulator (vLLM needs a GPU).  ``pdkit launch`` runs as the user runs it, as a
subprocess joining that cluster.  Tests that need Ray skip (with the reason) where it is not installed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_launch import free_ports, get_json, post_json, wait_for, workers_of

from pdkit.backends.placement import check_capacity, placement_groups
from pdkit.config import load_deployment
from pdkit.errors import ConfigError
from pdkit.gpu_check.ports import group_port_bases

try:
    import ray
    from ray.cluster_utils import Cluster
except ImportError:  # pragma: no cover - the optional dependency (pip install -e '.[ray]')
    ray = None  # type: ignore[assignment]

needs_ray = pytest.mark.skipif(ray is None, reason="ray is not installed (pip install -e '.[ray]')")
NAMESPACE = "pdkit-test"


# ------------------------------------------------------------------------------- no cluster needed


def test_dry_run_shows_placement_without_a_cluster(run_cli: Any) -> None:
    code, out, err = run_cli(
        "launch", "disagg", "--engine", "sim", "--backend", "ray", "--prefill-workers", "2",
        "--decode-workers", "3", "--dry-run",
    )  # fmt: skip
    assert code == 0, err
    assert "[placement group pdkit-decode] strategy=SPREAD bundles=[{CPU: 1, GPU: 1}, {CPU: 1, GPU: 1}, {CPU: 1" in out
    assert "processes: prefill-0, prefill-1" in out
    assert "frontend on this machine" in out


def test_dry_run_json_share_gpus_and_frontend_on_cluster(run_cli: Any) -> None:
    code, out, err = run_cli(
        "launch", "disagg", "--backend", "ray", "--share-gpus", "--frontend-on-cluster", "--dry-run", "--json",
    )  # fmt: skip
    assert code == 0, err
    groups = {g["name"]: g for g in json.loads(out)["ray"]["placement_groups"]}
    assert groups["pdkit-frontend"]["bundles"] == [{"CPU": 1.0}]
    # prefill and decode share GPU 0: half a GPU each, as the local backend's memory split
    assert groups["pdkit-prefill"]["bundles"] == [{"CPU": 1.0, "GPU": 0.5}]
    assert groups["pdkit-decode"]["bundles"] == [{"CPU": 1.0, "GPU": 0.5}]


def test_tensor_parallel_bundle_and_share_gpus_refusal(run_cli: Any) -> None:
    dep = load_deployment(None, {"backend": "ray", "decode.tensor_parallel_size": 2, "decode.gpus": [[2, 3]]})
    decode = next(g for g in placement_groups(dep) if g.role == "decode")
    assert decode.bundles == [{"CPU": 1.0, "GPU": 2.0}]  # one bundle = one node: TP GPUs packed
    code, _, err = run_cli(
        "launch", "agg", "--backend", "ray", "--share-gpus", "--tp", "2", "--gpu", "0,1", "--dry-run"
    )
    assert code == 2
    assert err.count("\n") == 1 and "Ray shares only single GPUs" in err


def test_capacity_check_names_the_numbers() -> None:
    dep = load_deployment(None, {"backend": "ray", "engine": "sim", "prefill.count": 4, "decode.count": 4})
    nodes = [{"CPU": 8.0, "GPU": 2.0}] * 3
    with pytest.raises(ConfigError, match=r"asks for 8 GPU \(4 decode x 1, 4 prefill x 1\) but the Ray cluster has 6"):
        check_capacity(placement_groups(dep), nodes)
    big = load_deployment(None, {"backend": "ray", "decode.tensor_parallel_size": 4, "decode.gpus": [[2, 3, 4, 5]]})
    with pytest.raises(ConfigError, match="no node of the Ray cluster has that much"):
        check_capacity(placement_groups(big), nodes)


def test_unreachable_cluster_is_one_line(run_cli: Any) -> None:
    (port,) = free_ports(1)
    code, _, err = run_cli("launch", "agg", "--engine", "sim", "--backend", "ray", "--ray-address", f"127.0.0.1:{port}")
    assert code == 2
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    assert (f"no Ray cluster answers at 127.0.0.1:{port}" in err) or ("Ray is not installed" in err)


# ------------------------------------------------------------------------------ on a Ray cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """Three simulated nodes with two logical GPUs each, and this test process connected to them."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "num_gpus": 2})
    for _ in range(2):
        c.add_node(num_cpus=3, num_gpus=2)
    c.wait_for_nodes()
    ray.init(address=c.address, namespace=NAMESPACE, logging_level="WARNING", log_to_driver=False)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def sim_ray_config(tmp_path: Path, address: str, prefill: int, decode: int) -> Path:
    fe, zmq_port, ev = free_ports(3)
    taken = {fe, zmq_port, ev}
    cfg: dict[str, Any] = {
        "engine": "sim",
        "backend": "ray",
        "ray": {"address": address, "namespace": NAMESPACE, "placement_timeout_s": 60},
        "frontend": {"port": fe, "zmq_port": zmq_port, "kv_events_port": ev},
        "supervision": {"max_restarts": 3},
    }
    for role, count in (("prefill", prefill), ("decode", decode)):
        cfg[role] = {
            "count": count,
            **group_port_bases(count, taken),
            "startup_timeout_s": 90,
        }
    path = tmp_path / "ray.yaml"
    path.write_text(json.dumps(cfg))
    return path


def launch(tmp_path: Path, cfg: Path, *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / "launch.out"
    argv = [sys.executable, "-m", "pdkit.cli", "launch", "disagg", "--config", str(cfg)]
    argv += ["--run-dir", str(tmp_path / "run"), *extra]
    proc = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def live_actors() -> list[dict[str, Any]]:
    from ray.util.state import list_actors

    return [a for a in list_actors(filters=[("state", "!=", "DEAD")]) if a.get("ray_namespace") == NAMESPACE]


def live_groups() -> list[dict[str, Any]]:
    from ray.util import placement_group_table

    return [g for g in placement_group_table().values() if g["state"] != "REMOVED" and g["name"].startswith("pdkit-")]


@needs_ray
@pytest.mark.timeout(240)
def test_2p2d_spread_restart_and_teardown(cluster: Any, tmp_path: Path) -> None:
    cfg = sim_ray_config(tmp_path, cluster.address, prefill=2, decode=2)
    dep = load_deployment(str(cfg))
    frontend = f"http://127.0.0.1:{dep.frontend.port}"
    proc, log = launch(tmp_path, cfg)
    try:
        names = {"prefill-0", "prefill-1", "decode-0", "decode-1"}

        def all_registered() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                return names <= set(workers_of(frontend))
            except OSError:
                return False

        wait_for(all_registered, timeout=150, what="4 workers registered through Ray")
        # Placement: each role's two workers on two different nodes (SPREAD), each holding one GPU.
        infos = {n: ray.get(ray.get_actor(f"pdkit-{n}").info.remote(), timeout=10) for n in names}
        for role in ("prefill", "decode"):
            assert infos[f"{role}-0"]["node_id"] != infos[f"{role}-1"]["node_id"]
        assert all(len(i["gpu_ids"]) == 1 for i in infos.values())
        body = {"model": dep.served_name, "messages": [{"role": "user", "content": "hello " * 40}], "max_tokens": 8}
        for _ in range(4):
            out = post_json(f"{frontend}/v1/chat/completions", body)
            assert out["choices"][0]["message"]["content"]

        # Kill a worker's actor: Ray restarts it on its bundle; the new agent registers again.
        old_pid = workers_of(frontend)["decode-0"]["pid"]
        ray.kill(ray.get_actor("pdkit-decode-0"), no_restart=False)

        def re_registered() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            w = workers_of(frontend).get("decode-0")
            return bool(w and w["pid"] != old_pid)

        wait_for(re_registered, timeout=90, what="decode-0 restarted by Ray and registered again")
        assert old_pid is not None and not Path(f"/proc/{old_pid}").exists()  # the old agent died with its actor
        for _ in range(4):
            assert post_json(f"{frontend}/v1/chat/completions", body)["choices"]
        wait_for(lambda: "decode-0 restarted by Ray" in log.read_text(), timeout=20, what="the restart reported")

        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert "removed 5 actor(s)" not in text  # the frontend is local: 4 actors
    assert "stopped all processes; removed 4 actor(s) and 2 placement group(s)" in text
    wait_for(lambda: not live_actors(), timeout=30, what="no actor left")
    assert not live_groups()
    with pytest.raises(OSError):
        get_json(f"{frontend}/health")


@needs_ray
@pytest.mark.timeout(120)
def test_more_gpus_than_the_cluster_has_is_refused(cluster: Any, tmp_path: Path) -> None:
    cfg = sim_ray_config(tmp_path, cluster.address, prefill=4, decode=4)
    proc, log = launch(tmp_path, cfg)
    assert proc.wait(timeout=90) == 2
    errors = [line for line in log.read_text().splitlines() if line.startswith("pdkit: error:")]
    assert len(errors) == 1, log.read_text()
    assert "asks for 8 GPU" in errors[0] and "has 6 on 3 node(s)" in errors[0]
    assert "Traceback" not in log.read_text()
    assert not live_groups()


@needs_ray
@pytest.mark.timeout(120)
def test_frontend_on_cluster_smoke_test(cluster: Any, tmp_path: Path) -> None:
    """The frontend in an actor of its own placement group; --smoke-test serves a chat and tears down."""
    cfg = sim_ray_config(tmp_path, cluster.address, prefill=1, decode=1)
    proc, log = launch(tmp_path, cfg, "--frontend-on-cluster", "--smoke-test")
    assert proc.wait(timeout=100) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "pdkit smoke test: the model answered" in text
    assert "frontend ready on 127.0.0.1" in text
    assert "stopped all processes; removed 3 actor(s) and 3 placement group(s)" in text
    wait_for(lambda: not live_actors(), timeout=30, what="no actor left")
    assert not live_groups()
