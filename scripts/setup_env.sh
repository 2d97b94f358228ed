#!/usr/bin/env bash
# Build (once) an environment the test suite needs on a CPU-only machine, then install pdkit into it.
#
# Why not `pip install vllm`: vLLM pins torch with CUDA/NCCL wheels (0.26.0: torch 2.11; 0.32.0: 2.13)
# that a CPU machine's index lacks or cannot use.  Its Python layer (KVTransferConfig, the kv_connector/v1
# classes, kv_events, the v1 Scheduler) imports fine on torch 2.13 CPU, so: torch 2.13.0 (CPU build),
# vllm --no-deps, then its pure-Python dependencies (requirements/vllm-cpu.txt for 0.26.0,
# requirements/vllm032-cpu.txt for 0.32.0, requirements/vllm033-cpu.txt for 0.33.0 -- on torch 2.13 CPU too).  ~2.6 GB, ~4 minutes the first time; reused while the inputs
# are unchanged (scripts/test.sh keys the directory on them).
#
# Usage: bash scripts/setup_env.sh VENV_DIR [VLLM_VERSION]     (VLLM_VERSION: 0.26.0 (default), 0.32.0 or 0.33.0)
set -euo pipefail
venv=${1:?usage: setup_env.sh VENV_DIR [VLLM_VERSION]}
vllm_version=${2:-0.26.0}
root=$(cd "$(dirname "$0")/.." && pwd)
case "$vllm_version" in
  0.26.0) reqs="$root/requirements/vllm-cpu.txt" ;;
  0.32.0) reqs="$root/requirements/vllm032-cpu.txt" ;;
  0.33.0) reqs="$root/requirements/vllm033-cpu.txt" ;;
  *) echo "setup_env: no CPU requirements for vLLM $vllm_version (known: 0.26.0, 0.32.0, 0.33.0); add requirements/vllmXYZ-cpu.txt" >&2; exit 2 ;;
esac
quiet=(-q --disable-pip-version-check --no-warn-script-location)
if [ ! -f "$venv/.pdkit-base-ready" ]; then
  echo "setup_env: building $venv (torch 2.13 CPU + vLLM $vllm_version Python layer; first time only)" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install "${quiet[@]}" --upgrade pip 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$venv/bin/python" -m pip install "${quiet[@]}" torch==2.13.0 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$venv/bin/python" -m pip install "${quiet[@]}" --no-deps "vllm==$vllm_version" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$venv/bin/python" -m pip install "${quiet[@]}" -r "$reqs" 2>&1 \
    | grep -vE "^WARNING: Location|requires (torch|torchvision|triton|nvidia|flashinfer|cuda|.*which is not installed)|^ERROR: pip's dependency resolver" >&2 || true
  "$venv/bin/python" -c "import torch, vllm.config, vllm.distributed.kv_transfer.kv_connector.v1.nixl, zmq, msgspec" \
    || { echo "setup_env: base install failed" >&2; exit 1; }
  "$venv/bin/python" -c "import vllm, sys; sys.exit(vllm.__version__ != '$vllm_version')" 2>/dev/null \
    || { echo "setup_env: $venv does not hold vLLM $vllm_version" >&2; exit 1; }
  touch "$venv/.pdkit-base-ready"
fi
"$venv/bin/python" -m pip install "${quiet[@]}" -e "$root[dev]" 2>&1 | grep -vE "^WARNING: Location|^ERROR: pip's dependency resolver|requires (torch|torchvision)|which is not installed|is incompatible" >&2 || true
"$venv/bin/python" -c "import pdkit, pdkit.connectors, pdkit.kernels" || { echo "setup_env: pdkit install failed" >&2; exit 1; }
# Issue 20 (--backend ray): Ray for tests/test_ray_backend.py's local cluster (those tests skip without it);
# only the 0.26.0 environment runs the whole suite, the 0.32.0 one runs -m vllm.
[ "$vllm_version" != 0.26.0 ] || "$venv/bin/python" -c "import ray" 2>/dev/null || "$venv/bin/python" -m pip install "${quiet[@]}" 'ray[default]==2.60.0' 2>&1 | grep -v "^WARNING: Location" >&2 || true
