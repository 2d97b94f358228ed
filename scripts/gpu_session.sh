#!/usr/bin/env bash
# Steps of one GPU session on a lent 2xH200 machine (see ../shared/device/README.md for the bundle).
# Each step is one device call, run from the repo root on the device; results land in $OUT.
#   bash scripts/gpu_session.sh chunk N     # copy bundle chunk .bN to /tmp/acc (N = 0..4; 0..5 after scripts/resplit_bundle.sh)
#   bash scripts/gpu_session.sh setup       # unpack the bundle, install pdkit from .whl/ into /tmp/pdsite
#   bash scripts/gpu_session.sh ray         # unpack .rayb/ (scripts/make_ray_chunk.sh) into /tmp/raysite
#   bash scripts/gpu_session.sh run CMD...  # run CMD with the stack on PYTHONPATH, from /tmp (not the repo:
#                                           # ./pdkit there lacks pdkit.connectors, which only the install maps)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
step=${1:?step}; shift
export PYTHONUNBUFFERED=1
case "$step" in
  chunk) mkdir -p /tmp/acc && cp -r "$repo/.b$1"/* /tmp/acc/ ;;
  setup)
    bash /tmp/acc/unpack.sh
    rm -rf /tmp/pdsite
    PYTHONPATH=/tmp/site python3 -m pip install -q --no-deps --no-index --target /tmp/pdsite "$repo"/.whl/pdkit-*.whl
    cd /tmp && PYTHONPATH=/tmp/pdsite:/tmp/site python3 -c "import pdkit.connectors.pd_connector, vllm; print('pdkit + vllm', vllm.__version__)"
    nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader ;;
  ray)
    mkdir -p /tmp/raysite && tar -xJf "$repo/.rayb/ray-site.tar.xz" -C /tmp/raysite ;;
  run)
    export PYTHONPATH=/tmp/pdsite:/tmp/site
    cd /tmp && "$@" ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
