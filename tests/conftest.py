"""Fixtures and settings for every test (shared helper functions live in helpers.py)."""
from __future__ import annotations

import os

import pytest


def pytest_configure(config):
    """Parallel workers (pytest-xdist, `-n N`) share the cores: each gets cores / N torch
    threads (and so do the processes it starts), not every core each, which would
    oversubscribe the machine N times."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch
        threads = max(1, (os.cpu_count() or 1) // int(workers))
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Weights are converted into a fresh cache, never the user's, and never downloaded (one
    per process: parallel workers never write one cache at once)."""
    os.environ["LPIPS_FAST_HOME"] = str(tmp_path_factory.mktemp("lpips_fast_home"))
    os.environ["LPIPS_FAST_OFFLINE"] = "1"
    yield


@pytest.fixture
def conv_exact(monkeypatch):
    """For the bit-exact tests of the fused backbone ops: outputs NaN-filled before the
    kernels run (an unwritten element fails), the backbone switch unset, and cuDNN's weight
    gradient run-to-run exact."""
    import torch
    from lpips_fast.backbones import BACKBONE_ENV
    monkeypatch.setenv("LPIPS_FAST_DEBUG_NAN_FILL", "1")
    monkeypatch.delenv(BACKBONE_ENV, raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
