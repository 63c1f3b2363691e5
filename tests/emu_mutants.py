#!/usr/bin/env python3
"""Proof that the emulated tests catch the bugs a GPU would expose: each mutant below is one
bug planted in a copy of csrc/cuda/head_cuda.cu; the emulated tests (tests/test_emu.py and the
"emu" cases of tests/test_kernels.py) run against it and must fail. Not part of CI (a build per
mutant, several minutes in all); run by hand:

    .venv/bin/python tests/emu_mutants.py            # every mutant, a table at the end
    .venv/bin/python tests/emu_mutants.py shuffle    # the mutants whose name contains 'shuffle'
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNEL = "cuda/head_cuda.cu"

# The emulated tests of the head's prologue, as a check command (below).
PROLOGUE_TESTS = ("import pytest, sys; sys.exit(pytest.main(['-x', '-q', '-p', 'no:cacheprovider', "
                  "'tests/test_conv_head.py', '-k', 'emu']))")

# (bug class, text in head_cuda.cu (must occur once), its replacement, extra check or None)
MUTANTS = [
    ("missing barrier: block reduction (after the shared store)",
     "  sm[threadIdx.x] = v;\n  __syncthreads();\n", "  sm[threadIdx.x] = v;\n", None),
    ("missing barrier: pixel lanes, norms read before all warps stored them",
     "    __syncthreads();\n    A q0 = 0, q1 = 0;\n    for (int w = w0; tg.active && w < w0 + tg.Wt; ++w) {\n"
     "      q0 += red[w * 32 + lane];\n      q1 += red[(W + w) * 32 + lane];\n    }\n"
     "    const A r0 = dev_sqrt(q0)",
     "    A q0 = 0, q1 = 0;\n    for (int w = w0; tg.active && w < w0 + tg.Wt; ++w) {\n"
     "      q0 += red[w * 32 + lane];\n      q1 += red[(W + w) * 32 + lane];\n    }\n"
     "    const A r0 = dev_sqrt(q0)", None),
    ("missing barrier: pixel lanes, shared memory reused while still being read",
     "    __syncthreads();  // everyone has read the norms\n", "", None),
    ("missing barrier: channel lanes, block partial read before the warps stored theirs",
     "  if (lane == 0) red[warp] = bsum;\n  __syncthreads();\n",
     "  if (lane == 0) red[warp] = bsum;\n", None),
    ("divergent barrier (only the lanes holding a pixel)",
     "        bsum += dv;\n      }\n    }\n    __syncthreads();  // red is reused by the next round\n",
     "        bsum += dv;\n      }\n    }\n    if (valid) __syncthreads();  // red is reused by the next round\n",
     None),
    ("half-warp shuffle with a full mask",
     "      const A dv = warp_allsum(dist[j]);",
     "      const A dv = lane < 16 ? warp_allsum(dist[j]) : A(0);", None),
    ("shuffle reading a lane outside the warp",
     "  for (int o = 16; o > 0; o >>= 1)", "  for (int o = 32; o > 0; o >>= 1)", None),
    ("shared memory too small (dynamic, pixel lanes)",
     "grp.Wpl * 32,\n             2 * grp.Wpl * 32 * sizeof(A), stream, ds);",
     "grp.Wpl * 32,\n             grp.Wpl * 32 * sizeof(A), stream, ds);", None),
    ("unwritten output (the map at each group's last pixel)",
     "        if (d.dmap != nullptr) d.dmap[q] = dv;",
     "        if (d.dmap != nullptr && j < px.last) d.dmap[q] = dv;", None),
    ("off-by-one in the cached channel split (overflow loop starts one round early)",
     "    for (int64_t c = tg.wg + (int64_t)R * tg.Wt; valid && c < d.C; c += tg.Wt) {\n"
     "      const A a = load_feature_first<PRO, T, A>(x0, t0, d.bias, c, c * d.sC0);\n",
     "    for (int64_t c = tg.wg + (int64_t)(R - 1) * tg.Wt; valid && c < d.C; c += tg.Wt) {\n"
     "      const A a = load_feature_first<PRO, T, A>(x0, t0, d.bias, c, c * d.sC0);\n", None),
    ("tile groups: a group reads another group's partial norms",
     "    for (int w = w0; tg.active && w < w0 + tg.Wt; ++w) {\n      q0 += red[w * 32 + lane];\n"
     "      q1 += red[(W + w) * 32 + lane];\n    }\n    const A r0 = dev_sqrt(q0)",
     "    for (int w = 0; tg.active && w < tg.Wt; ++w) {\n      q0 += red[w * 32 + lane];\n"
     "      q1 += red[(W + w) * 32 + lane];\n    }\n    const A r0 = dev_sqrt(q0)", None),
    ("32-bit offset (channel lanes' pixel base)",
     "      : b0(d.f0 + n * d.sN0 + p0 * d.sP0),\n        b1(d.f1 + n * d.sN1 + p0 * d.sP1),",
     "      : b0(d.f0 + (int32_t)(n * d.sN0 + p0 * d.sP0)),\n"
     "        b1(d.f1 + (int32_t)(n * d.sN1 + p0 * d.sP1)),", None),
    ("wrong chunk index (weight-gradient partials stored transposed)",
     "  if (threadIdx.x == 0) d.wpartial[chunk * d.C + c] = s;",
     "  if (threadIdx.x == 0) d.wpartial[c * d.wchunks + chunk] = s;", None),
    ("channel lanes write past their pixel range",
     "      if (lane == 0 && j <= px.last) {", "      if (lane == 0) {", None),
    ("block over the device limit (the warp cap forgotten: 35 warps at C = 1100)",
     "  return (int)std::min<int64_t>(kMaxWarps, need);", "  return (int)need;", None),
    ("grid dimension over its limit (weight-gradient chunks on y, at most 65535)",
     "dim3((unsigned)wgx, (unsigned)maxc, y)", "dim3((unsigned)maxc, (unsigned)wgx, y)",
     # 65536 (n, p) in chunks of 1: the unmutated grid has 65536 blocks on x, legal; the
     # check runs this case directly (through pytest it would take minutes unmutated).
     "import os, torch, sys; sys.path.insert(0, 'tests'); "
     "os.environ['LPIPS_FAST_EMU_WGRAD_CHUNK'] = '1'; from emu import emu_ops; "
     "f = torch.rand(1, 2, 256, 256); w = torch.rand(1, 2, 1, 1, requires_grad=True); "
     "v, _ = emu_ops.head(f, f.flip(3), w); torch.autograd.grad(v.sum(), [w])"),
    # The head's prologue (conv_bias_relu_head): its emulated tests in tests/test_conv_head.py.
    ("prologue: the taps of the channels past the register cache left unwritten",
     "      const A a = load_feature_first<PRO, T, A>(x0, t0, d.bias, c, c * d.sC0);\n"
     "      const A b = load_feature_first<PRO, T, A>(x1, t1, d.bias, c, c * d.sC1);\n",
     "      const A a = load_feature<PRO, T, A>(x0, d.bias, c, c * d.sC0);\n"
     "      const A b = load_feature<PRO, T, A>(x1, d.bias, c, c * d.sC1);\n", PROLOGUE_TESTS),
    ("prologue: the second image's tap written over the first's",
     "    T* t1 = PRO ? d.o1 + at1 : nullptr;", "    T* t1 = PRO ? d.o0 + at1 : nullptr;",
     PROLOGUE_TESTS),
    ("prologue: channel lanes' second pass without the bias and ReLU",
     "dist[j] += dist_term(wc, load_feature<PRO, T, A>(px.b0, d.bias, c, px.o0[j] + c),",
     "dist[j] += dist_term(wc, load_feature<false, T, A>(px.b0, d.bias, c, px.o0[j] + c),",
     PROLOGUE_TESTS),
]

TESTS = ["tests/test_emu.py", "tests/test_kernels.py", "-k", "emu"]


def run_mutant(name, old, new, check, workdir):
    csrc = workdir / "csrc"
    shutil.rmtree(csrc, ignore_errors=True)
    shutil.copytree(ROOT / "csrc", csrc)
    src = (csrc / KERNEL).read_text()
    assert src.count(old) == 1, f"mutant '{name}': its text occurs {src.count(old)} times"
    (csrc / KERNEL).write_text(src.replace(old, new))
    env = dict(os.environ, LPIPS_FAST_EMU_CSRC=str(csrc))
    if check is None:
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *TESTS]
    else:
        cmd = [sys.executable, "-c", check]
    t0 = time.time()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    text = out.stdout + out.stderr
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    why = next((line for line in lines if "lpips_fast emulation" in line or
                line.startswith(("E  ", "FAILED")) or "Fatal Python error" in line),
               lines[-1] if lines else f"exit code {out.returncode}")
    return out.returncode != 0, why[:160], time.time() - t0


def main(argv):
    chosen = [m for m in MUTANTS if not argv or any(a in m[0] for a in argv)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, old, new, check in chosen:
            caught, why, secs = run_mutant(name, old, new, check, Path(tmp))
            rows.append((name, caught, why, secs))
            print(f"{'CAUGHT  ' if caught else 'SURVIVED'} {secs:5.0f}s  {name}\n         {why}",
                  flush=True)
    print("\n| bug planted | caught | first failure |\n|---|---|---|")
    for name, caught, why, _ in rows:
        print(f"| {name} | {'yes' if caught else 'NO'} | {why.replace('|', '/')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
