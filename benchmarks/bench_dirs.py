"""A thin wrapper: the code lives in lpips_fast/bench/dirs.py (shipped in the wheel, run there
as `lpips-fast bench dirs`). Imported, this module IS lpips_fast.bench.dirs; run, it runs its
main:

    python benchmarks/bench_dirs.py --cases alex:512x384:jpg:96 --rounds 5
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lpips_fast.bench import dirs as _module  # noqa: E402

if __name__ == "__main__":
    _module.main()
else:
    sys.modules[__name__] = _module
