#!/usr/bin/env bash
# Build (once) the environment the test suite needs on a CPU-only machine, then install pdkit into it.
#
# Why not `pip install vllm`: vLLM 0.26.0 pins torch 2.11 with CUDA/NCCL wheels that this machine's index
# lacks.  Its Python layer (KVTransferConfig, the kv_connector/v1 classes, kv_events) imports fine on
# torch 2.13 CPU, so: torch 2.13.0 (CPU build), vllm --no-deps, then its pure-Python dependencies
# (requirements/vllm-cpu.txt).  ~2.6 GB, ~4 minutes the first time; reused while the inputs are unchanged.
#
# Usage: bash scripts/setup_env.sh VENV_DIR
set -euo pipefail
venv=${1:?usage: setup_env.sh VENV_DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
quiet=(-q --disable-pip-version-check --no-warn-script-location)
if [ ! -f "$venv/.pdkit-base-ready" ]; then
  echo "setup_env: building $venv (torch 2.13 CPU + vLLM 0.26.0 Python layer; first time only)" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install "${quiet[@]}" --upgrade pip 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$venv/bin/python" -m pip install "${quiet[@]}" torch==2.13.0 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$venv/bin/python" -m pip install "${quiet[@]}" --no-deps vllm==0.26.0 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$venv/bin/python" -m pip install "${quiet[@]}" -r "$root/requirements/vllm-cpu.txt" 2>&1 \
    | grep -vE "^WARNING: Location|requires (torch|torchvision|triton|nvidia|flashinfer|cuda|.*which is not installed)|^ERROR: pip's dependency resolver" >&2 || true
  "$venv/bin/python" -c "import torch, vllm.config, zmq, msgspec" || { echo "setup_env: base install failed" >&2; exit 1; }
  touch "$venv/.pdkit-base-ready"
fi
"$venv/bin/python" -m pip install "${quiet[@]}" -e "$root[dev]" 2>&1 | grep -vE "^WARNING: Location|^ERROR: pip's dependency resolver|requires (torch|torchvision)|which is not installed|is incompatible" >&2 || true
"$venv/bin/python" -c "import pdkit, pdkit.connectors, pdkit.kernels" || { echo "setup_env: pdkit install failed" >&2; exit 1; }
# Issue 20 (--backend ray): Ray for tests/test_ray_backend.py's local cluster (those tests skip without it).
"$venv/bin/python" -c "import ray" 2>/dev/null || "$venv/bin/python" -m pip install "${quiet[@]}" 'ray[default]==2.60.0' 2>&1 | grep -v "^WARNING: Location" >&2 || true
