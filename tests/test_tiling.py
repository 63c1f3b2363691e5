"""Exact tiling: tiled results equal untiled ones (values and spatial maps).

Tolerance: a tile's convolutions see the same pixels as the untiled ones, but on smaller
tensors, so the library may pick another summation order (~1e-6 relative per feature); the
head's per-tile sums are then combined in float64. 1e-5 relative is 10x that rounding.
"""
import pytest
import torch

import lpips_fast
from lpips_fast import tiling
from lpips_fast.backbones import Backbone, feature_sizes
from helpers import IMPLS, randomize_lins

# (net, H, W, tile): sizes that are multiples of neither the tile nor the stride (16), and
# tiles small enough that crops start inside the image (nonzero offsets) in both directions.
CASES = [("alex", 213, 250, 64), ("vgg", 67, 330, 80), ("squeeze", 181, 243, 48)]


def images(n, h, w, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(n, 3, h, w, generator=gen) * 2 - 1 for _ in range(2)]


def close(a, b, rtol=1e-5):
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert scale > 0 and err <= rtol * scale, f"error {err:.3g} vs scale {scale:.3g}"


def tile_feature_error(net, h, w, tile):
    """Largest relative error of any tile's core features against the untiled features,
    and a check that every feature is owned by exactly one tile."""
    torch.manual_seed(0)
    backbone = Backbone(net).eval()
    x = images(1, h, w, seed=1)[0]
    geo, hs, ws = tiling.geometry(net), feature_sizes(net, h), feature_sizes(net, w)
    covered = [torch.zeros(a, b, dtype=torch.int32) for a, b in zip(hs, ws)]
    worst = 0.0
    with torch.no_grad():
        full = backbone(x)
        for ys in tiling.spans(h, tile, net):
            for xs in tiling.spans(w, tile, net):
                part = backbone(x[..., ys.crop_lo:ys.crop_hi, xs.crop_lo:xs.crop_hi])
                for k, f in enumerate(part):
                    (a, b), (c, d) = (ys.feature_core(geo[k].stride, hs[k]),
                                      xs.feature_core(geo[k].stride, ws[k]))
                    if a >= b or c >= d:
                        continue
                    y0, x0 = ys.crop_lo // geo[k].stride, xs.crop_lo // geo[k].stride
                    want = full[k][..., y0 + a:y0 + b, x0 + c:x0 + d]
                    err = (f[..., a:b, c:d] - want).abs().max() / full[k].abs().max()
                    worst = max(worst, err.item())
                    covered[k][y0 + a:y0 + b, x0 + c:x0 + d] += 1
    assert all(torch.equal(c, torch.ones_like(c)) for c in covered), "cores must partition"
    return worst


@pytest.mark.parametrize("net,h,w,tile", CASES)
def test_tile_features_equal_untiled(net, h, w, tile):
    """The geometry itself: every layer's core features in every tile equal the global ones."""
    assert tile_feature_error(net, h, w, tile) <= 1e-5


@pytest.mark.parametrize("net,h,w,tile", CASES)
def test_halo_is_needed(net, h, w, tile, monkeypatch):
    """The test above can fail: a halo one alignment step short breaks exactness."""
    real = tiling.halo
    monkeypatch.setattr(tiling, "halo", lambda n: real(n) - tiling.alignment(n))
    assert tile_feature_error(net, h, w, tile) > 1e-3


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("spatial", [False, True])
@pytest.mark.parametrize("net,h,w,tile", CASES)
def test_tiled_lpips_equals_untiled(net, h, w, tile, spatial, impl):
    torch.manual_seed(0)
    model = randomize_lins(lpips_fast.LPIPS(net=net, pnet_rand=True, verbose=False,
                                            spatial=spatial, impl=impl))
    x0, x1 = images(2, h, w, seed=2)
    with torch.no_grad():
        plain, plain_layers = model(x0, x1, retPerLayer=True)
        model.tile_size = tile
        tiled, tiled_layers = model(x0, x1, retPerLayer=True)
    assert tiled.shape == plain.shape
    close(tiled, plain)
    for a, b in zip(tiled_layers, plain_layers):
        close(a, b)


def test_memory_budget_picks_a_tile():
    model = lpips_fast.LPIPS(net="vgg", pnet_rand=True, verbose=False, memory_budget="256MiB")
    x0, x1 = images(1, 16 * 40 + 5, 16 * 41 + 7, seed=4)
    tile = model._tile(x0, x1)
    assert tile is not None and tile % 16 == 0
    crop = tile + 2 * tiling.halo("vgg")
    # The crop's estimated activations fit what the budget leaves beside the prepared whole
    # images (held through every tile); a bigger tile's would not.
    per_pixel = tiling.bytes_per_pixel("vgg", 4, 2) * 1.5
    left = 256 * 2**20 - (x0.numel() + x1.numel()) * 4
    assert crop ** 2 * per_pixel <= left < (crop + 16) ** 2 * per_pixel
    with pytest.raises(ValueError, match="too small"):
        lpips_fast.LPIPS(net="vgg", pnet_rand=True, verbose=False, memory_budget=1e6)._tile(x0, x1)
    with pytest.raises(ValueError, match="memory_budget"):
        lpips_fast.LPIPS(net="vgg", pnet_rand=True, verbose=False, memory_budget="lots")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n0,n1", [(0, 0), (0, 1), (1, 0)])
def test_empty_batch_with_tiling_gives_an_empty_result(n0, n1, impl):
    """An empty batch (also broadcast against 1) scores to an empty result as untiled, not
    a kernel assertion or a shape mismatch from the tiled path."""
    model = lpips_fast.LPIPS(net="alex", pnet_rand=True, verbose=False, impl=impl,
                             spatial=True, tile_size=32)
    x0, x1 = images(1, 70, 66, seed=5)
    value, layers = model(x0[:n0], x1[:n1], retPerLayer=True)
    assert value.shape == (0, 1, 70, 66) and all(v.shape == (0, 1, 70, 66) for v in layers)
