#!/usr/bin/env bash
# Re-split the bundle folders .b0 … .bN (../shared/device/make-bundle.sh: 60 MB chunks) into smaller chunks.
# Why: one device call carries the tracked tree plus its carry, 64 MiB at most; once the tree passes ~4 MB
# (it was 7.3 MB on 2026-12-03) a 60 MB chunk no longer fits and every call is refused.  unpack.sh joins
# site.tar.xz.part* in name order, so only the chunk sizes change.
# Usage: bash scripts/resplit_bundle.sh [BYTES]     (default 48000000); then `gpu_session.sh chunk 0` … N.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
size=${1:-48000000}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$repo"
cat .b[0-9]/site.tar.xz.part* > "$work/site.tar.xz"
cp .b0/STACK .b0/make_synth_model.py .b0/unpack.sh "$work/"
(cd "$work" && split -b "$size" -d -a 2 site.tar.xz site.tar.xz.part && rm site.tar.xz)
rm -rf .b[0-9]
i=0
for part in "$work"/site.tar.xz.part*; do
  mkdir -p ".b$i" && mv "$part" ".b$i/"
  i=$((i + 1))
done
[ "$i" -le 10 ] || { echo "resplit_bundle: $i chunks; .b[0-9] names only ten: pass a larger size" >&2; exit 2; }
cp "$work/STACK" "$work/make_synth_model.py" "$work/unpack.sh" .b0/
echo "bundle $(cat .b0/STACK): $i chunks of at most $size bytes (.b0 … .b$((i - 1)))"
