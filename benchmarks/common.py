"""A thin wrapper: the code lives in lpips_fast/bench/common.py (shipped in the wheel, run there
as `lpips-fast bench`); this name stays for the scripts and tests that import it from
benchmarks/. Imported, this module IS lpips_fast.bench.common (one module object, so a test's
monkeypatch reaches the code that runs)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lpips_fast.bench import common as _module  # noqa: E402

sys.modules[__name__] = _module
