"""The CUDA kernels, emulated on the CPU (csrc/emu): built once per source change, loaded as
torch.ops.lpips_fast_emu, wrapped like the real ops (lpips_fast._ops.Ops).

    from emu import emu_ops   # None (with emu_error) where it cannot be built
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# LPIPS_FAST_EMU_CSRC: another copy of csrc/ (tests/emu_mutants.py builds altered kernels)
CSRC = Path(os.environ.get("LPIPS_FAST_EMU_CSRC", ROOT / "csrc"))
SOURCES = [CSRC / "emu/emu.cpp"]
DEPENDS = sorted(CSRC.rglob("*.[ch]*"))  # the .cu and every header it includes


def _build():
    from torch.utils import cpp_extension
    from lpips_fast import _ops
    import torch
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in DEPENDS)).hexdigest()[:12]
    # per torch release too: `make test-oldest`'s venv must not load the newest torch's build
    build = ROOT / "build" / f"emu-{digest}-torch{torch.__version__.split('+')[0]}"
    build.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="lpips_fast_emu", sources=[str(s) for s in SOURCES], build_directory=str(build),
        extra_include_paths=[str(CSRC)],
        # -O1: the suite is dominated by fiber switches, not arithmetic; -O1 compiles 2x faster.
        extra_cflags=["-O1", "-DLPIPS_FAST_EMU"], is_python_module=False,
        verbose=os.environ.get("LPIPS_FAST_EMU_VERBOSE") == "1")
    _ops.register("lpips_fast_emu")
    return _ops.Ops("lpips_fast_emu")


emu_ops = None
emu_error = None
if os.environ.get("LPIPS_FAST_EMU") == "0":  # e.g. benchmarks/gpu_check.sh: the real GPU is there
    emu_error = "disabled by LPIPS_FAST_EMU=0"
else:
    try:
        emu_ops = _build()
    except Exception as e:  # reported by the tests that need it (they fail, not skip, in CI)
        emu_error = f"{type(e).__name__}: {e}"
