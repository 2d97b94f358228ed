#!/usr/bin/env bash
# Aggregated serving: the pdkit frontend plus one vLLM worker (LMCache offloading) on one GPU.
#
#   launch/agg.sh                       # GPU 0, embedded synthetic model
#   GPU=3 MODEL=/models/llama launch/agg.sh --port 9000
#   launch/agg.sh --engine sim          # no GPU: simulated engine
#
# Everything else is a `pdkit launch agg` flag (see `pdkit launch agg --help`); add --dry-run to see
# the processes, GPUs, env and ports without starting anything.
set -euo pipefail
args=(--gpu "${GPU:-0}")
[ -n "${MODEL:-}" ] && args+=(--model "$MODEL")
exec pdkit launch agg "${args[@]}" "$@"
