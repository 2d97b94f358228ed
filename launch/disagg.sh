#!/usr/bin/env bash
# Disaggregated prefill/decode: frontend + prefill worker(s) (PdConnector: LMCache + NIXL producer)
# + decode worker(s) (NIXL consumer), each on its own GPU(s).
#
#   launch/disagg.sh                                    # prefill on GPU 1, decode on GPU 0
#   PREFILL_GPUS=0,1 DECODE_GPUS=2,3 launch/disagg.sh   # 2P2D
#   PREFILL_GPUS=0,1 DECODE_GPUS=2,3 launch/disagg.sh --tp 2   # 1P(TP=2) + 1D(TP=2)
#   launch/disagg.sh --engine sim                       # no GPU: simulated engines
#
# Everything else is a `pdkit launch disagg` flag; add --dry-run to print the plan only.
set -euo pipefail
args=(--prefill-gpus "${PREFILL_GPUS:-1}" --decode-gpus "${DECODE_GPUS:-0}")
[ -n "${MODEL:-}" ] && args+=(--model "$MODEL")
exec pdkit launch disagg "${args[@]}" "$@"
