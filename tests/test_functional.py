"""The functional `lpips_fast.lpips`: reductions, and image files scored as the CLI scores them."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lpips_fast
from helpers import cli
from lpips_fast.io import ImageError


@pytest.fixture(scope="module")
def model():
    """The module the functional builds for net='alex' (real weights, the same files)."""
    return lpips_fast.LPIPS(net="alex", verbose=False)


def pair(n=3, hw=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(n, 3, hw, hw, generator=gen) * 2 - 1 for _ in range(2)]


# --- reduction ---------------------------------------------------------------------------------

def test_reductions_equal_the_module_reduced(model):
    x0, x1 = pair()
    with torch.no_grad():
        per_pair = model(x0, x1)
        dmap = lpips_fast.LPIPS(net="alex", spatial=True, verbose=False)(x0, x1)
        layers = model(x0, x1, retPerLayer=True)[1]
    # The same deterministic float32 forward: the reductions match to float32 rounding.
    close = dict(rtol=1e-6, atol=0)
    none = lpips_fast.lpips(x0, x1)
    assert none.shape == (3, 1, 1, 1) and torch.equal(none, lpips_fast.lpips(x0, x1,
                                                                             reduction="none"))
    torch.testing.assert_close(none, per_pair, **close)
    mean, sum_ = (lpips_fast.lpips(x0, x1, reduction=r) for r in ("mean", "sum"))
    assert mean.shape == sum_.shape == ()
    torch.testing.assert_close(mean, per_pair.mean(), **close)
    torch.testing.assert_close(sum_, per_pair.sum(), **close)
    # spatial: over the map's pixels too, as torch's losses reduce every element
    torch.testing.assert_close(lpips_fast.lpips(x0, x1, spatial=True, reduction="mean"),
                               dmap.mean(), **close)
    value, per_layer = lpips_fast.lpips(x0, x1, retPerLayer=True, reduction="sum")
    torch.testing.assert_close(value, per_pair.sum(), **close)
    torch.testing.assert_close(torch.stack(per_layer), torch.stack([v.sum() for v in layers]),
                               **close)
    with pytest.raises(ValueError, match=r"reduction must be one of \('none', 'mean', 'sum'\), "
                                         r"got 'avg'"):
        lpips_fast.lpips(x0, x1, reduction="avg")


def test_mean_loss_gradients_equal_the_module_s(model):
    x0, x1 = pair(seed=1)
    a = x0.clone().requires_grad_()
    lpips_fast.lpips(a, x1, reduction="mean").backward()
    b = x0.clone().requires_grad_()
    model(b, x1).mean().backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    # the same float32 backward: equal up to float32 rounding of the reduction's order
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-9)


# --- image files -------------------------------------------------------------------------------

def image(path, seed, size):
    """A random RGB image of size (W, H), saved (PNG, or JPEG by the suffix)."""
    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(a).save(path)
    return path


def cli_pairs(*calls):
    """`lpips-fast pair ... --json --device cpu` for each call; their values."""
    values = []
    for c in calls:
        out = cli("pair", *c, "--json", "--device", "cpu")
        assert out.returncode == 0, out.stderr
        values.append(json.loads(out.stdout)["lpips"])
    return values


def test_paths_score_as_the_cli_does(tmp_path):
    a = image(tmp_path / "a.png", 0, (64, 64))
    b = image(tmp_path / "b.jpg", 1, (64, 64))
    c = image(tmp_path / "c.png", 2, (80, 56))
    same, first, smaller = cli_pairs(
        (a, b), (c, a, "--resize", "to-first"),
        (a, c, "--resize", "to-smaller", "--resample", "bilinear"))
    # the same loader, resampling and float32 forward through the command line: equal to
    # float32 rounding (the command's model is another module; a reduction's order may differ)
    approx = dict(rel=1e-6, abs=1e-7)
    assert lpips_fast.lpips(str(a), Path(b)).item() == pytest.approx(same, **approx)
    assert lpips_fast.lpips(c, a, resize="to-first").item() == pytest.approx(first, **approx)
    assert lpips_fast.lpips(a, c, resize="to-smaller", resample="bilinear",
                            reduction="sum").item() == pytest.approx(smaller, **approx)
    assert lpips_fast.lpips(a, c, resize="to-smaller").item() != pytest.approx(smaller, **approx)
    # the scoring size, seen in the map's shape (H x W)
    assert lpips_fast.lpips(c, a, resize="to-first", spatial=True).shape == (1, 1, 56, 80)
    assert lpips_fast.lpips(a, c, resize="to-first", spatial=True).shape == (1, 1, 64, 64)
    assert lpips_fast.lpips(a, c, resize="to-smaller", spatial=True).shape == (1, 1, 56, 64)


def test_path_errors_name_the_files_and_sizes(tmp_path):
    a = image(tmp_path / "a.png", 0, (64, 64))
    c = image(tmp_path / "c.png", 2, (80, 56))
    with pytest.raises(ImageError, match=rf"{a} is 64 x 64 but {c} is 80 x 56 \(W x H\).*"
                                         r"pass resize='to-first' or resize='to-smaller'"):
        lpips_fast.lpips(a, c)
    with pytest.raises(ImageError, match=rf"{tmp_path / 'missing.png'}: no such file"):
        lpips_fast.lpips(a, tmp_path / "missing.png")
    small = image(tmp_path / "small.png", 3, (20, 100))
    with pytest.raises(ImageError, match=r"resized to 20 x 56 \(W x H\): 20 x 56 pixels is too "
                                         r"small for net 'alex'"):
        lpips_fast.lpips(c, small, resize="to-smaller")
    with pytest.raises(ValueError, match=r"resize must be one of \('none', 'to-first', "
                                         r"'to-smaller'\), got 'first'"):
        lpips_fast.lpips(a, c, resize="first")
    with pytest.raises(ValueError, match=r"resample must be one of \('bicubic', 'bilinear'\)"):
        lpips_fast.lpips(a, c, resize="to-first", resample="nearest")
    with pytest.raises(TypeError, match="both be tensors or both be image paths, got Tensor "
                                        "and PosixPath"):
        lpips_fast.lpips(torch.zeros(1, 3, 64, 64), a)
    with pytest.raises(ValueError, match="mapped to \\[-1, 1\\] already"):
        lpips_fast.lpips(a, a, normalize=True)
    with pytest.raises(ValueError, match="resize and device apply to image files"):
        lpips_fast.lpips(*pair(1), resize="to-first")


@pytest.mark.parametrize("x0,x1,error,message", [
    (torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8), None, TypeError,
     "x0 must be a floating-point tensor, got torch.uint8"),
    (None, torch.rand(1, 3, 64, 64) > 0.5, TypeError, "x1 must be a floating-point tensor, "
                                                       "got torch.bool"),
    ([[0.5]], None, TypeError, "x0 must be a torch.Tensor, got list"),
    (torch.rand(1, 3, 64, 64, dtype=torch.complex64), None, TypeError,
     "x0 must be a floating-point tensor, got torch.complex64"),
    (None, torch.rand(1, 3, 64, 72), ValueError, r"x0 and x1 differ in size"),
])
def test_bad_tensors_get_the_forward_s_errors_under_the_functional_s_names(x0, x1, error,
                                                                          message):
    """8-bit images (the common mistake) were refused by Module.to ('only accepts floating
    point or complex dtypes') before the forward's own check, a list with an AttributeError;
    complex images built and cached a complex module. Nothing is cached for a refused call."""
    good = torch.rand(1, 3, 64, 64) * 2 - 1
    x0 = good if x0 is None else x0
    x1 = good if x1 is None else x1
    before = len(lpips_fast.model._cache)
    with pytest.raises(error, match=message):
        lpips_fast.lpips(x0, x1, pnet_rand=True)
    if message.startswith(("x0 must", "x1 must")):
        assert len(lpips_fast.model._cache) == before
