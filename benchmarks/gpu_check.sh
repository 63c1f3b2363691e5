#!/usr/bin/env bash
# One-call check of the CUDA path on a GPU machine with no network (issue 10).
#
#   bash benchmarks/gpu_check.sh    # everything: 5 to 6 minutes on an H100 (315 s and 307 s)
#                                   # before issue 19's steps; expect ~8 minutes now
#   ONLY="pytest-cuda bench-backbone bench" bash benchmarks/gpu_check.sh   # just those steps
#
# Expects torch, pytest and ninja for $PYTHON (default python3); no virtual environment.
# Optional, carried by the caller (benchmarks/gpu_carry.sh prepares them in .gpu/):
#   .gpu/whl/*.whl      the official lpips 0.1.4 wheel (pure Python), installed into /tmp/site
#   .gpu/home/          an LPIPS_FAST_HOME holding backbones/alex.pt (real weights)
#   .gpu/real_pairs/    the real image pairs (LPIPS_FAST_REAL_PAIRS)
# Phases (each step has its own time limit, its status goes to the summary table):
#   1. build the extension in place (TORCH_CUDA_ARCH_LIST=9.0)
#   2. correctness, in parallel (no timings here): CUDA tests, compute-sanitizer memcheck,
#      racecheck and synccheck of every head-kernel path (small case), memcheck of the fused
#      backbone's kernels (their CUDA op tests), memory.py (peak memory
#      is per process, so the concurrency leaves it exact; its times are not), precision.py
#   3. timings, one at a time on a quiet GPU: bench_head.py (fp32 NCHW, channels_last, bf16),
#      profile_kernels.py (vgg 2048 forward per kernel, fp32/bf16, the first conv padded to 8
#      channels; then again with cudnn.benchmark, which needs its own process; unmeasured on a
#      GPU: estimated 20-30 s each),
#      bench_backbone.py (fused conv + bias + ReLU [+ pool] against eager, per conv layer;
#      the first conv on 3 vs 8 zero-padded channels; fp32 and bf16),
#      bench.py (official eager and torch.compile vs lpips_fast, interleaved), gpu_tune.py,
#      lpips-fast bench dirs (folders end to end vs the plain official loop; GPU JPEG decode
#      against Pillow's on the real pairs)
# Results: every table and log goes to $RESDIR (default /tmp/gpu_results), packed after each
# step into $OUT/results.tgz when $OUT is set (else benchmarks/results/gpu-check.tgz), so a
# run cut short still returns what it measured; the summary is printed last.
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
export PYTHONUNBUFFERED=1
export LPIPS_FAST_EMU=0  # the CPU emulation of the kernels is for machines without a GPU
export FORCE_CUDA=1  # build the CUDA kernels or fail: never fall back to CPU-only (setup.py)
T_START=$SECONDS

if ls .gpu/whl/*.whl >/dev/null 2>&1; then
  $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d .gpu/home ] && export LPIPS_FAST_HOME="$PWD/.gpu/home"
[ -d .gpu/real_pairs ] && export LPIPS_FAST_REAL_PAIRS="$PWD/.gpu/real_pairs"
[ -f .gpu/commit ] && export LPIPS_FAST_COMMIT="$(cat .gpu/commit)"

DEVICE=$($PYTHON -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no-gpu')" 2>/dev/null || echo unknown)
SLUG=$(echo "$DEVICE" | tr 'A-Z' 'a-z' | tr -c 'a-z0-9._-' '-' | sed 's/-*$//')
RESDIR=${RESDIR:-/tmp/gpu_results}
PACK=${OUT:+$OUT/results.tgz}
PACK=${PACK:-$PWD/benchmarks/results/gpu-check.tgz}
mkdir -p "$RESDIR/logs"
STATUS="$RESDIR/status.txt"
: > "$STATUS"

# Steps run in parallel pack too: each writes its own temporary file, then renames it.
pack() { tar czf "$PACK.$BASHPID" -C "$RESDIR" . 2>/dev/null && mv -f "$PACK.$BASHPID" "$PACK"; }

# ONLY="build pytest-cuda bench ..." runs just the named steps (a glob each, e.g. "bench-head-*"),
# so a session short of device time can run what it needs first; build always runs.
step() {  # step NAME TIMEOUT_S CMD...   (output in $RESDIR/logs/NAME.log)
  local name=$1 limit=$2
  shift 2
  if [ -n "${ONLY:-}" ] && [ "$name" != build ]; then
    local pat pats wanted=
    read -ra pats <<< "$ONLY"  # no pathname expansion of the globs
    for pat in "${pats[@]}"; do [[ $name == $pat ]] && wanted=1; done
    if [ -z "$wanted" ]; then echo "| $name | skipped (ONLY) | 0 s |" >> "$STATUS"; return 0; fi
  fi
  local t0=$SECONDS log="$RESDIR/logs/$name.log" rc
  echo "=== $name: $*"
  timeout -k 10 "$limit" "$@" > "$log" 2>&1
  rc=$?
  local st=ok
  [ $rc -ne 0 ] && st="FAILED (rc=$rc)"
  [ $rc -eq 124 ] && st="TIMED OUT after ${limit}s"
  echo "| $name | $st | $((SECONDS - t0)) s |" >> "$STATUS"
  echo "--- $name: $st in $((SECONDS - t0)) s; last lines:"
  tail -n 8 "$log"
  pack
  return $rc
}

{
  echo "device: $DEVICE"
  $PYTHON -c 'import torch, sys; print("torch", torch.__version__, "cuda", torch.version.cuda, "python", sys.version.split()[0])'
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
  nvcc --version | tail -n 2
  $PYTHON -c "import lpips; print('official lpips', lpips.__file__)" 2>&1 | tail -n 1
  echo "commit: ${LPIPS_FAST_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  echo "LPIPS_FAST_HOME=${LPIPS_FAST_HOME:-unset} LPIPS_FAST_REAL_PAIRS=${LPIPS_FAST_REAL_PAIRS:-unset}"
} 2>&1 | tee "$RESDIR/env.txt"

# ---- 1. build
step build 240 $PYTHON setup.py build_ext --inplace
BUILD_RC=$?
if [ $BUILD_RC -eq 0 ]; then
  step smoke 60 $PYTHON -c "
import torch
from lpips_fast import _ops
assert _ops.available(), _ops.load_error
assert _ops.has_kernels(torch.device('cuda')), _ops.kernels_summary()  # not the reference head
f = torch.rand(2, 8, 3, 3, device='cuda')
print(_ops.head(f, f.flip(0))[0])"
fi

# ---- 2. correctness, in parallel
if [ $BUILD_RC -eq 0 ]; then
  SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  XDIST=""
  $PYTHON -c "import xdist" 2>/dev/null && XDIST="-n 4"
  step pytest-cuda 240 $PYTHON -m pytest -m cuda tests/test_kernels.py tests/test_cuda_model.py \
    tests/test_func.py tests/test_metric.py tests/test_backbone_fused.py tests/test_conv_pool.py \
    tests/test_conv_head.py -q -p no:cacheprovider $XDIST &
  for tool in memcheck racecheck synccheck; do
    step "sanitizer-$tool" 240 "$SAN" --tool $tool --error-exitcode 1 \
      $PYTHON benchmarks/bench_head.py --memcheck-case --device cuda &
  done
  # The fused backbone's kernels (bias + ReLU epilogue, mask, conv + pool epilogue and its
  # backward): memcheck over their CUDA op tests in float32 and bfloat16 (no shared memory,
  # so racecheck and synccheck have nothing to check).
  step sanitizer-conv 240 "$SAN" --tool memcheck --error-exitcode 1 $PYTHON -m pytest -m cuda \
    tests/test_backbone_fused.py tests/test_conv_pool.py tests/test_conv_head.py -q \
    -p no:cacheprovider -k "(forward or backward_op or gradients or ties) and (float32 or bfloat16)" &
  # The head kernels with the prologue (conv_bias_relu_head: the tap written by the head's
  # forward kernels, which share memory across warps): racecheck over their forward tests.
  step sanitizer-conv-head-race 240 "$SAN" --tool racecheck --error-exitcode 1 $PYTHON -m pytest \
    -m cuda tests/test_conv_head.py -q -p no:cacheprovider -k "forward and float32" &
  # The official code needs ~10 GiB at vgg 2048; at most 1/4 of that is the target.
  step memory-2048 200 $PYTHON benchmarks/memory.py --device cuda --sizes 2048 --budget 2GiB \
    --skip --out "$RESDIR/$SLUG-memory.md" &
  wait
  # vgg 8192 (out of memory in the official code on 139 GiB) within a 16 GiB budget, alone
  # on the GPU so that nothing else's allocations can make it fail.
  step memory-8192 200 $PYTHON benchmarks/memory.py --device cuda --sizes 8192 --budget 16GiB \
    --skip official@8192 plain@8192 streaming@8192 --out "$RESDIR/$SLUG-memory-8192.md" &
  if [ -f "${LPIPS_FAST_HOME:-/nonexistent}/backbones/alex.pt" ]; then
    step precision 180 $PYTHON benchmarks/precision.py --device cuda --nets alex --out "$RESDIR" &
  else
    echo "| precision | not run: no real alex weights in LPIPS_FAST_HOME | 0 s |" >> "$STATUS"
  fi
  wait

  # ---- 3. timings, one at a time
  step bench-head-fp32 120 $PYTHON benchmarks/bench_head.py --device cuda --quick \
    --out "$RESDIR/$SLUG-head-fp32.md"
  step bench-head-fp32-cl 90 $PYTHON benchmarks/bench_head.py --device cuda --sizes 512 \
    --channels-last --quick --out "$RESDIR/$SLUG-head-fp32-cl.md"
  step bench-head-bf16 90 $PYTHON benchmarks/bench_head.py --device cuda --sizes 512 \
    --dtype bfloat16 --quick --out "$RESDIR/$SLUG-head-bf16.md"
  # The large cases of the bandwidth target: vgg 2048 (1 GiB per L1 feature map), each layout.
  step bench-head-2048 120 $PYTHON benchmarks/bench_head.py --device cuda --nets vgg \
    --sizes 2048 --quick --out "$RESDIR/$SLUG-head-2048.md"
  step bench-head-2048-cl 120 $PYTHON benchmarks/bench_head.py --device cuda --nets vgg \
    --sizes 2048 --channels-last --quick --out "$RESDIR/$SLUG-head-2048-cl.md"
  step bench-head-2048-cl-bf16 120 $PYTHON benchmarks/bench_head.py --device cuda --nets vgg \
    --sizes 2048 --channels-last --dtype bfloat16 --quick --out "$RESDIR/$SLUG-head-2048-cl-bf16.md"
  # Item 3 of issue 19: which kernels vgg 2048's forward spends its time in.
  step profile 60 $PYTHON benchmarks/profile_kernels.py --out "$RESDIR/$SLUG-profile.md"
  step profile-cudnn-benchmark 60 $PYTHON benchmarks/profile_kernels.py --cudnn-benchmark \
    --out "$RESDIR/$SLUG-profile-cudnn-benchmark.md"
  # The fused backbone layer (bias-free conv + one bias/ReLU kernel; where a max-pool follows,
  # also conv + bias/ReLU/pool in one kernel) against eager, per conv layer of alex and vgg:
  # picks LPIPS_FAST_BACKBONE's default (GPU_NOTES "Fused backbone").
  step bench-backbone 120 $PYTHON benchmarks/bench_backbone.py --device cuda --reps 10 \
    --out "$RESDIR/$SLUG-backbone.md"
  # bf16: where issue 19 measured the convolutions at ~37% of peak (the first conv's 3 channels?)
  step bench-backbone-bf16 90 $PYTHON benchmarks/bench_backbone.py --device cuda --reps 10 \
    --dtype bf16 --out "$RESDIR/$SLUG-backbone-bf16.md"
  # A tap no pool follows (alex 1024 relu3-5, vgg 2048 relu5_3): the head's prologue (reads y,
  # writes the tap: 2 x its bytes) against epilogue + head (3 x): picks whether the "fused-head"
  # backbone impl pays (GPU_NOTES "Fused backbone"). Estimated 15-25 s.
  step bench-backbone-head 60 $PYTHON benchmarks/bench_backbone.py --device cuda --head \
    --out "$RESDIR/$SLUG-backbone-head.md"
  # Item 2 of issue 19 on the device: kernels launched per alex N=32 64x64 training step, eager
  # vs fused (CPU: 72 ops eager, 49 fused with pools), and the per-call cost of a tiny fused
  # layer against eager's (its autograd now in C++: csrc/conv_autograd.cpp). ~20 s together.
  step count-kernels 60 bash -c "$PYTHON benchmarks/count_ops.py --device cuda --n 32 \
    > '$RESDIR/$SLUG-count-kernels.md'"
  step bench-backbone-overhead 60 $PYTHON benchmarks/bench_backbone.py --device cuda --overhead \
    --out "$RESDIR/$SLUG-backbone-overhead.md"
  # Issue 24: folders scored end to end (files to CSV, whole processes) against the plain
  # official loop on this GPU (target >= 5x for 512x384 JPEG; pairs/s for 1920x1080), and
  # torchvision's GPU JPEG decode (--decoder auto) against Pillow's on the real pairs.
  # Alone: ONLY="dirs-*" bash benchmarks/gpu_check.sh (about 4 minutes with the build).
  if [ -d "${LPIPS_FAST_REAL_PAIRS:-/nonexistent}/tid2013" ]; then
    step dirs-decode-check 90 $PYTHON -m lpips_fast bench dirs --device cuda --decode-check \
      "$LPIPS_FAST_REAL_PAIRS/tid2013/ref" "$LPIPS_FAST_REAL_PAIRS/tid2013/dist" \
      --out "$RESDIR/$SLUG-dirs-decode-check.md"
  else
    echo "| dirs-decode-check | not run: no real pairs (LPIPS_FAST_REAL_PAIRS) | 0 s |" >> "$STATUS"
  fi
  step dirs-bench 240 $PYTHON -m lpips_fast bench dirs --device cuda --rounds 2 \
    --cases alex:512x384:jpg:600 alex:1920x1080:jpg:120 --variant pillow="--decoder pillow" \
    --out "$RESDIR/$SLUG-dirs.md"
  if $PYTHON -c "import lpips" 2>/dev/null; then
    step bench 300 $PYTHON benchmarks/bench.py --warmup 3 --repeats 10 --out "$RESDIR"
    step tune 180 $PYTHON benchmarks/gpu_tune.py --out "$RESDIR/$SLUG-tune.md"
  else
    echo "| bench, tune | not run: official lpips not installed | 0 s |" >> "$STATUS"
  fi
fi

{
  echo "# gpu_check on $DEVICE"
  echo
  cat "$RESDIR/env.txt"
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ), total $((SECONDS - T_START)) s"
  echo
  for f in "$RESDIR"/*.md; do
    [ -f "$f" ] && [ "$(basename "$f")" != summary.md ] && { cat "$f"; echo; }
  done
  echo "| step | status | time |"
  echo "|---|---|---|"
  cat "$STATUS"
} > "$RESDIR/summary.md"
pack
[ -n "${OUT:-}" ] && cp "$RESDIR/summary.md" "$OUT/summary.md"

echo
echo "================ summary ================"
cat "$RESDIR/summary.md"
