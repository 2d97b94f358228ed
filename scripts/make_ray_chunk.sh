#!/usr/bin/env bash
# Build the Ray chunk for a lent GPU machine (issue 20's `--backend ray` check): Ray's wheel for the GPU
# image's Python 3.12, installed with pip (which keeps the executables' modes: gcs_server, raylet) minus
# ray/jars (Java workers, unused), as one xz tarball in the git-ignored folder .rayb/ (~33 MB, one device
# call).  The image already has Ray's other core dependencies; the v026 bundle brings jsonschema.
# On the device: `bash scripts/gpu_session.sh ray` (carry [".rayb"]), then run with
# PYTHONPATH=/tmp/pdsite:/tmp/site:/tmp/raysite.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
version=$(grep -o 'ray\[default\]==[0-9.]*' "$repo/pyproject.toml" | cut -d= -f3)
work=/tmp/pdkit-ray-$version
if [ ! -f "$work/ray-site.tar.xz" ]; then
  rm -rf "$work" && mkdir -p "$work/site"
  python3 -m pip install -q --no-deps --no-compile --target "$work/site" --python-version 3.12 \
    --implementation cp --only-binary=:all: --platform manylinux2014_x86_64 "ray==$version" 2>&1 \
    | grep -v "WARNING: Location" || true
  rm -rf "$work/site/ray/jars" "$work/site/bin"
  tar -C "$work/site" -cf - . | xz -T0 -6 > "$work/ray-site.tar.xz"
fi
mkdir -p "$repo/.rayb" && cp "$work/ray-site.tar.xz" "$repo/.rayb/"
grep -qs '^/.rayb/$' "$repo/.git/info/exclude" || echo '/.rayb/' >> "$repo/.git/info/exclude"
echo "ray $version: $(du -h "$repo/.rayb/ray-site.tar.xz" | cut -f1) in .rayb/"
