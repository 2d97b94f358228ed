#!/usr/bin/env bash
# Re-split the bundle folders .b0 … .bN (../shared/device/make-bundle.sh: 60 MB chunks) into smaller chunks.
# Why: one device call carries the tracked tree plus its carry, 64 MiB at most; once the tree passes ~4 MB
# (it was 7.3 MB on 2026-12-03) a 60 MB chunk no longer fits and every call is refused.  unpack.sh joins
# each file's parts (site.tar.xz.part*, and for v032 torch.whl.part* / nccl.whl.part*) in name order, so
# only the chunk sizes change; .b0's other files (STACK, unpack.sh, *.whl.name, ...) stay in .b0.
# Usage: bash scripts/resplit_bundle.sh [BYTES]     (default 48000000); then `gpu_session.sh chunk 0` … N.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
size=${1:-48000000}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$repo"
mkdir -p "$work/parts" "$work/b0"
find .b0 -maxdepth 1 -type f ! -name '*.part[0-9]*' -exec cp {} "$work/b0/" \;
for family in $(ls .b[0-9]*/ | grep '\.part[0-9]*$' | sed 's/\.part[0-9]*$//' | sort -u); do
  cat $(ls -d .b[0-9]*/"$family".part* | sort -t/ -k2) > "$work/$family"
  (cd "$work" && split -b "$size" -d -a 2 "$family" "parts/$family.part" && rm "$family")
done
rm -rf .b[0-9]*
i=0
for part in "$work"/parts/*; do
  mkdir -p ".b$i" && mv "$part" ".b$i/"
  i=$((i + 1))
done
cp "$work"/b0/* .b0/
echo "bundle $(cat .b0/STACK): $i chunks of at most $size bytes (.b0 … .b$((i - 1)))"
