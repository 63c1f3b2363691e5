"""Shared test helpers: the official package as an oracle, with the same weights as ours."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

# Real image pairs live outside the project; point LPIPS_FAST_REAL_PAIRS elsewhere to override.
REAL_PAIRS = Path(os.environ.get(
    "LPIPS_FAST_REAL_PAIRS", Path(__file__).resolve().parents[2] / "shared/data/real_pairs"))


def fused_available() -> bool:
    try:
        from lpips_fast import _ops
    except ImportError:
        return False
    return _ops.available()


# Every model test runs on both heads; the fused one is skipped (loudly, with -ra) only where the
# extension is not built, and tests/test_build.py fails in CI if that happens there.
IMPLS = ["reference", pytest.param("fused", marks=pytest.mark.skipif(
    not fused_available(), reason="lpips_fast extension not built"))]


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Weights are converted into a fresh cache, never the user's, and never downloaded."""
    os.environ["LPIPS_FAST_HOME"] = str(tmp_path_factory.mktemp("lpips_fast_home"))
    os.environ["LPIPS_FAST_OFFLINE"] = "1"
    yield


def official_like(ours, **kwargs):
    """The official lpips.LPIPS with `ours`'s exact state (backbone and lin weights).

    Built with pnet_rand=True (its pretrained path downloads), then loaded with our
    state_dict: this also proves that the two modules' state_dict keys are the same.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's 'pretrained' deprecation notices
        import lpips
        theirs = lpips.LPIPS(pnet_rand=True, verbose=False, **kwargs)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return theirs.eval()


def randomize_lins(model, seed=0):
    """Random non-negative lin weights, like every released set (used with random backbones)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in getattr(model, "lins", []):
            lin.weight.copy_(torch.rand(lin.weight.shape, generator=gen))
    return model


def real_weights_available(net: str) -> bool:
    from lpips_fast import weights
    try:
        weights.resolve_backbone(net)
    except weights.WeightsNotFound:
        return False
    return True
