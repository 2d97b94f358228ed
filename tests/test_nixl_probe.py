"""``scripts/nixl_probe.py`` with real NIXL (UCX) between two processes on host memory.

On the GPU machine the same script measures VRAM transfers (same GPU / two GPUs); here it proves the
probe itself: READ and WRITE move the bytes exactly, and UCX's protocol tables are picked out of its log.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("nixl._api")
from pdkit.gpu_check import nixl_probe  # noqa: E402


def test_read_and_write_move_the_bytes_exactly(tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    rc = nixl_probe.main(["--mem", "dram", "--total-mb", "2", "--desc-kb", "64", "--iters", "2",
                          "--variants", "read,write", "--proto-info", "--out", str(out)])  # fmt: skip
    results = json.loads(out.read_text())["results"]
    assert rc == 0, results
    assert [(r["variant"], r["op"], r["correct"]) for r in results] == [
        ("read", "READ", True),
        ("write", "WRITE", True),
    ]
    for r in results:
        assert r["descriptors"] == 32 and r["gbps"] > 0 and len(r["transfer_s"]) == 2
    read_tables = [t for t in results[0]["proto"] if "remote memory read" in t]
    assert read_tables and all("host memory" in t for t in read_tables)


def test_remote_memory_protocols_keeps_only_the_remote_memory_tables() -> None:
    log = "\n".join([
        "[1.0] [h:1:0]   +------------------------------+",
        "[1.0] [h:1:0]   | d intra-node cfg#1 |",
        "[1.0] [h:1:0]   | remote memory read by ucp_get*(multi) into cuda/GPU0 from cuda/GPU0 |",
        "[1.0] [h:1:0]   +--------+---------+",
        "[1.0] [h:1:0]   | Range | Description | Config |",
        "[1.0] [h:1:0]   |  0..inf | software emulation | tcp/lo |",
        "[1.0] [h:1:0]   | active message by ucp_am_send* from host memory |",
        "[1.0] [h:1:0]   |      0 | short | tcp/lo |",
        "[2.0] [h:2:0]   | remote memory read by ucp_get*(multi) into cuda/GPU0 from cuda/GPU0 |",
        "[2.0] [h:2:0]   |  0..inf | software emulation | tcp/lo |",
        "unrelated line",
    ])  # fmt: skip
    header = "| remote memory read by ucp_get*(multi) into cuda/GPU0 from cuda/GPU0 |"
    assert nixl_probe.remote_memory_protocols(log) == [header + " / | 0..inf | software emulation | tcp/lo |"]


def test_unknown_variant_is_named() -> None:
    with pytest.raises(SystemExit):
        nixl_probe.main(["--variants", "read,teleport"])
