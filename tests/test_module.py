"""The LPIPS module as an nn.Module: state_dict, devices/dtypes, freezing, errors, functional."""
import pickle
import warnings

import numpy as np
import pytest
import torch

import lpips_fast
from lpips_fast import model as model_mod
from helpers import official_like, randomize_lins


def rand_images(n, h=64, w=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=gen) * 2 - 1


@pytest.mark.parametrize("net", ["alex", "vgg", "squeeze"])
@pytest.mark.parametrize("use_dropout,use_lpips", [(True, True), (False, True), (True, False)])
def test_state_dict_keys_equal_official(net, use_dropout, use_lpips):
    ours = lpips_fast.LPIPS(net=net, pnet_rand=True, verbose=False, use_dropout=use_dropout,
                            lpips=use_lpips)
    theirs = official_like(ours, net=net, use_dropout=use_dropout, lpips=use_lpips)
    assert list(ours.state_dict()) == list(theirs.state_dict())


def test_official_checkpoint_loads_into_ours():
    import lpips
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
    ours = lpips_fast.LPIPS(net="alex", pnet_rand=True, verbose=False)
    ours.load_state_dict(theirs.state_dict())
    x0, x1 = rand_images(2, seed=1), rand_images(2, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(ours(x0, x1), theirs(x0, x1), rtol=1e-5, atol=0)


def test_parameters_frozen_unless_asked():
    m = lpips_fast.LPIPS(pnet_rand=True, verbose=False)
    assert not any(p.requires_grad for p in m.parameters()) and not m.training
    m = lpips_fast.LPIPS(pnet_rand=True, verbose=False, pnet_tune=True)
    assert all(p.requires_grad for p in m.net.parameters())
    assert not any(p.requires_grad for p in m.lins.parameters())
    m = lpips_fast.LPIPS(pnet_rand=True, verbose=False, eval_mode=False)
    assert m.training and all(p.requires_grad for p in m.lins.parameters())
    assert not any(p.requires_grad for p in m.net.parameters())


def test_pretrained_lins_load_without_dropout():
    a = lpips_fast.LPIPS(pnet_rand=True, verbose=False, use_dropout=True)
    b = lpips_fast.LPIPS(pnet_rand=True, verbose=False, use_dropout=False)
    for la, lb in zip(a.lins, b.lins):
        assert la.weight.abs().sum() > 0
        assert torch.equal(la.weight, lb.weight)


def test_dropout_in_train_mode_matches_official():
    """eval_mode=False: dropout acts on the squared differences as upstream, same masks."""
    torch.manual_seed(0)
    ours = randomize_lins(lpips_fast.LPIPS(pnet_rand=True, verbose=False, eval_mode=False))
    theirs = official_like(ours, net="alex").train()
    x0, x1 = rand_images(2, seed=3), rand_images(2, seed=4)
    torch.manual_seed(123)
    a = ours(x0, x1)
    torch.manual_seed(123)
    b = theirs(x0, x1)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    torch.manual_seed(124)
    assert not torch.allclose(ours(x0, x1), a), "dropout should change the value in train mode"


def test_dtypes_and_devices():
    m = lpips_fast.LPIPS(pnet_rand=True, verbose=False)
    x0, x1 = rand_images(2, seed=5), rand_images(2, seed=6)
    with torch.no_grad():
        ref = m(x0, x1)
        m64 = m.to(torch.float64)
        v64 = m64(x0.double(), x1.double())
        assert v64.dtype == torch.float64
        # float64 against float32: only float32 rounding separates them (~1e-6 relative).
        torch.testing.assert_close(v64.float(), ref, rtol=1e-5, atol=0)
        mh = m.to(torch.float32).half()
        vh = mh(x0.half(), x1.half())
        assert vh.dtype == torch.float16 and torch.isfinite(vh).all()
        # fp16 features keep ~3 decimal digits; 2e-2 relative covers the whole-network drift.
        torch.testing.assert_close(vh.float(), ref, rtol=2e-2, atol=0)


def test_functional_caches_the_module():
    x0, x1 = rand_images(2, seed=7), rand_images(2, seed=8)
    model_mod._cache.clear()
    a = lpips_fast.lpips(x0, x1, net="alex", pnet_rand=True)
    assert len(model_mod._cache) == 1
    b = lpips_fast.lpips(x0, x1, net="alex", pnet_rand=True)
    assert len(model_mod._cache) == 1 and torch.equal(a, b)
    module = next(iter(model_mod._cache.values()))
    with torch.no_grad():
        torch.testing.assert_close(a, module(x0, x1))
    lpips_fast.lpips(x0.double(), x1.double(), net="alex", pnet_rand=True)
    assert len(model_mod._cache) == 2  # a new dtype gets its own module


@pytest.mark.parametrize("x0,x1,message", [
    (torch.rand(2, 2, 64, 64), torch.rand(2, 2, 64, 64), "N x 3 x H x W"),
    (torch.rand(3, 64, 64), torch.rand(3, 64, 64), "N x 3 x H x W"),
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), torch.zeros(1, 3, 64, 64), "floating"),
    (torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 65), "differ in size"),
    (torch.rand(2, 3, 64, 64), torch.rand(3, 3, 64, 64), "do not broadcast"),
    (torch.rand(1, 3, 30, 64), torch.rand(1, 3, 30, 64), "too small"),
    ("a.png", torch.rand(1, 3, 64, 64), "torch.Tensor"),
])
def test_bad_inputs_get_clear_errors(x0, x1, message):
    m = lpips_fast.LPIPS(pnet_rand=True, verbose=False)
    with pytest.raises((ValueError, TypeError), match=message):
        m(x0, x1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="net must be one of"):
        lpips_fast.LPIPS(net="resnet", pnet_rand=True, verbose=False)
    with pytest.raises(ValueError, match="version"):
        lpips_fast.LPIPS(version="0.2", pnet_rand=True, verbose=False)
    with pytest.raises(ValueError, match="impl"):
        lpips_fast.LPIPS(impl="cuda", pnet_rand=True, verbose=False)


@pytest.mark.parametrize("option,message", [
    ({"net": ["alex"]}, "net must be one of"),
    ({"precision": ["bf16"]}, "precision must be None"),
    ({"memory_budget": [1]}, "memory_budget must be a size"),
    ({"model_path": ["lin.pth"]}, "must be a file path or an open binary file, got list"),
])
def test_unhashable_options_get_their_own_errors(option, message):
    """Options of the wrong type (a list) are named by their own checks, in the module and in
    the functional form, whose module cache would otherwise fail first on hashing them."""
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with pytest.raises((ValueError, TypeError), match=message):
        lpips_fast.LPIPS(pnet_rand=True, verbose=False, **option)
    with pytest.raises((ValueError, TypeError), match=message):
        lpips_fast.lpips(x, x, pnet_rand=True, **option)


def test_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(model_mod, "_fused_ops", lambda: (None, "not built (test)"))
    monkeypatch.setattr(model_mod, "_warned_fallback", False)
    with pytest.warns(UserWarning, match="not built"):
        m = lpips_fast.LPIPS(pnet_rand=True, verbose=False)
    assert m._head is lpips_fast.reference.head
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lpips_fast.LPIPS(pnet_rand=True, verbose=False)
    with pytest.raises(RuntimeError, match="not built"):
        lpips_fast.LPIPS(pnet_rand=True, verbose=False, impl="fused")


def test_setting_impl_later_selects_the_head():
    """`model.impl = 'reference'` after construction runs the reference head (it was a plain
    attribute: the head chosen in __init__ ran on, silently); a bad value is refused and the
    model keeps its head."""
    model = lpips_fast.LPIPS(pnet_rand=True, verbose=False)
    model.impl = "reference"
    assert model._head is lpips_fast.reference.head and model.impl == "reference"
    with pytest.raises(ValueError, match="impl must be one of"):
        model.impl = "cuda"
    assert model._head is lpips_fast.reference.head and model.impl == "reference"
    if model_mod._fused_ops()[0] is not None:
        model.impl = "fused"
        assert model._head is not lpips_fast.reference.head
    assert pickle.loads(pickle.dumps(model)).impl == model.impl


def test_no_torchvision_at_run_time():
    """The backbones are the project's own: building and running a model imports no
    torchvision (a fresh interpreter, since the oracle in other tests imports it)."""
    import subprocess
    import sys
    code = ("import sys, torch, lpips_fast\n"
            "m = lpips_fast.LPIPS(net='squeeze', pnet_rand=True, verbose=False)\n"
            "x = torch.rand(1, 3, 32, 32)\n"
            "m(x, x.flip(-1))\n"
            "print(sorted(k for k in sys.modules if k.startswith('torchvision')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("net", ["alex", "vgg", "squeeze"])
@pytest.mark.parametrize("spatial", [False, True])
@pytest.mark.parametrize("channels_last", [True, False])
def test_second_order_gradients_match_the_reference_head(net, spatial, channels_last):
    """A gradient penalty (the gradient of |dLPIPS/dx|^2) through the fused head equals the
    one through the reference head, and is not zero (it once was, with a warning). The
    fused ops' backward records the reference math when a graph is asked for, so the two agree
    to float32 rounding of the same operations (1e-5 of the largest element)."""
    results = []
    for impl in ("fused", "reference"):
        torch.manual_seed(0)
        model = lpips_fast.LPIPS(net=net, pnet_rand=True, verbose=False, impl=impl,
                                 spatial=spatial, channels_last=channels_last)
        randomize_lins(model)
        g = torch.Generator().manual_seed(1)
        x = (torch.rand(2, 3, 48, 48, generator=g) * 2 - 1).requires_grad_()
        y = torch.rand(2, 3, 48, 48, generator=g) * 2 - 1
        (gx,) = torch.autograd.grad(model(x, y).sum(), [x], create_graph=True)
        (ggx,) = torch.autograd.grad(gx.square().sum(), [x])
        results.append((gx.detach(), ggx))
    (g1, gg1), (g2, gg2) = results
    assert gg2.abs().max() > 0
    for a, b in ((g1, g2), (gg1, gg2)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * b.abs().max().item())


def test_tile_size_and_memory_budget_are_validated_wherever_set():
    model = lpips_fast.LPIPS(net="alex", pnet_rand=True, verbose=False, memory_budget="256MiB",
                             tile_size=512)
    assert model.memory_budget == 256 * 2**20 and model.tile_size == 512
    model.memory_budget = "1.5GiB"
    assert model.memory_budget == int(1.5 * 2**30)
    model.memory_budget, model.tile_size = 4096, None
    assert (model.memory_budget, model.tile_size) == (4096, None)
    model.memory_budget = np.float32(2**30)  # numpy's numbers are numbers
    assert model.memory_budget == 2**30
    model.memory_budget = 4096
    for bad in (0, -1, "0MiB", "-2GiB", "lots", float("inf"), float("nan"), True, 10**400):
        with pytest.raises(ValueError, match="memory_budget must be a size"):
            model.memory_budget = bad
        with pytest.raises(ValueError, match="memory_budget must be a size"):
            lpips_fast.LPIPS(net="alex", pnet_rand=True, verbose=False, memory_budget=bad)
    for bad in (0, -64, 1.5, "512", True):
        with pytest.raises(ValueError, match="tile_size must be a positive whole number"):
            model.tile_size = bad
        with pytest.raises(ValueError, match="tile_size must be a positive whole number"):
            lpips_fast.LPIPS(net="alex", pnet_rand=True, verbose=False, tile_size=bad)
    assert model.memory_budget == 4096 and model.tile_size is None  # a refused value changes nothing


@pytest.mark.parametrize("bad,unit", [("1PiB", "PiB"), ("16G", "G"), ("2 gigs", "gigs")])
def test_a_size_with_an_unknown_unit_names_the_unit_and_lists_the_units(bad, unit):
    """'16G' said 'must be a size of at least 1 bytes', as if the number were the problem."""
    with pytest.raises(ValueError, match=f"unknown unit '{unit}'.*KB, MB.*KiB, MiB, GiB, TiB"):
        lpips_fast.LPIPS(net="alex", pnet_rand=True, verbose=False, memory_budget=bad)


@pytest.mark.parametrize("scale,normalize,expected", [
    (255.0, False, "0-255 pixel values"), (255.0, True, "0-255 pixel values"),
    (1.0, False, r"all in \[0, 1\]"), (1.0, True, None), ("pm1", False, None),
    ("pm1", True, "negative values .* but normalize=True")])
def test_inputs_in_a_likely_wrong_range_warn_once(scale, normalize, expected):
    model = lpips_fast.LPIPS(net="alex", pnet_rand=True, verbose=False)
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.rand(2, 1, 3, 64, 64, generator=g)
    if scale == "pm1":
        x0, x1 = x0 * 2 - 1, x1 * 2 - 1
    else:
        x0, x1 = x0 * scale, x1 * scale
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model(x0, x1, normalize=normalize)
        model(x0, x1, normalize=normalize)  # once per model
    ours = [str(w.message) for w in seen if "lpips_fast: the inputs" in str(w.message)]
    if expected is None:
        assert ours == []
    else:
        assert len(ours) == 1 and __import__("re").search(expected, ours[0]), ours


def test_meta_device():
    """As with the official module: .to('meta') and shape-only forwards."""
    x = torch.empty(2, 3, 64, 64, device="meta")
    for spatial, shape in ((False, (2, 1, 1, 1)), (True, (2, 1, 64, 64))):
        model = lpips_fast.LPIPS(net="alex", pnet_rand=True, verbose=False, spatial=spatial)
        out = model.to("meta")(x, x)
        assert out.device.type == "meta" and out.shape == shape


@pytest.mark.parametrize("bad,error,message", [
    (torch.zeros(2, 3, 64, 64, dtype=torch.uint8), TypeError,
     "must be a floating-point tensor, got torch.uint8"),
    (torch.zeros(2, 4, 64, 64), ValueError, r"must be N x 3 x H x W \(RGB\)"),
])
def test_pairwise_and_embed_reject_what_forward_rejects(bad, error, message):
    model = lpips_fast.LPIPS(net="alex", pnet_rand=True, verbose=False)
    with pytest.raises(error, match="in0 " + message):
        model(bad, bad)
    with pytest.raises(error, match="x " + message):
        model.embed(bad)
    with pytest.raises(error, match="x " + message):
        lpips_fast.pairwise(bad, model=model)
    with pytest.raises(error, match=r"x\[0\] must be"):  # a list of 3 x H x W images
        lpips_fast.pairwise(list(bad), model=model)


def test_inputs_on_another_device_than_the_model_are_refused_naming_both():
    """meta stands in for a second device (no GPU here): torch's own message came from inside
    the convolutions ("Tensor on device cpu is not on the expected device meta!")."""
    model = lpips_fast.LPIPS(net="alex", pnet_rand=True, verbose=False)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with pytest.raises(ValueError, match="in0 is on cpu but in1 is on meta"):
        model(x, x.to("meta"))
    with pytest.raises(ValueError, match="the inputs are on meta but the model is on cpu: move one"):
        model(x.to("meta"), x.to("meta"))
    with pytest.raises(ValueError, match="x is on meta but the model is on cpu"):
        model.embed(x.to("meta"))
    assert model.to("meta")(x.to("meta"), x.to("meta")).device.type == "meta"


@pytest.mark.parametrize("net,fields", [("alex", ("relu1", "relu5")), ("vgg", ("relu1_2", "relu5_3")),
                                        ("squeeze", ("relu1", "relu7"))])
def test_backbone_outputs_are_named_as_upstream(net, fields):
    ours = lpips_fast.LPIPS(net=net, pnet_rand=True, verbose=False)
    theirs = official_like(ours, net=net)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a, b = ours.net(x), theirs.net(x)
    assert type(a).__name__ == type(b).__name__ and a._fields == b._fields
    assert (a._fields[0], a._fields[-1]) == fields
    for name in a._fields:  # float32 convolutions, ours channels_last: 1e-5 of the largest
        ref = getattr(b, name)
        torch.testing.assert_close(getattr(a, name), ref, rtol=0,
                                   atol=1e-5 * ref.abs().max().item())
