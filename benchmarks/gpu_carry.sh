#!/usr/bin/env bash
# Prepares .gpu/ (git-ignored) for benchmarks/gpu_check.sh on a device machine with no network:
#   .gpu/whl/         the official lpips 0.1.4 wheel (pure Python; its imports are on the machine)
#   .gpu/home/        an LPIPS_FAST_HOME with the real alex backbone (about 10 MB)
#   .gpu/real_pairs/  the real image pairs, from $LPIPS_FAST_REAL_PAIRS or ../shared/data/real_pairs
# Run it here right before the device call (it records the commit), then carry ".gpu":
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf .gpu && mkdir -p .gpu/whl .gpu/home
$PY -m pip download -q --no-deps --only-binary=:all: -d .gpu/whl lpips==0.1.4
LPIPS_FAST_OFFLINE=1 LPIPS_FAST_HOME="$PWD/.gpu/home" $PY -m lpips_fast weights --net alex
PAIRS=${LPIPS_FAST_REAL_PAIRS:-../shared/data/real_pairs}
if [ -d "$PAIRS" ]; then cp -r "$PAIRS" .gpu/real_pairs; else echo "no real pairs at $PAIRS"; fi
# The device machine's copy of the tree may carry an older .git: record what is being tested.
echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo +uncommitted)" > .gpu/commit
du -sh .gpu
