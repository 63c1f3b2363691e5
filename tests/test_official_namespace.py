"""The official package's whole top level (`import lpips` 0.1.4) under `import lpips_fast as
lpips`: every name exists and gives the official results.

The helpers repeat the official arithmetic in the same order, so results are compared for
equality (np.array_equal / torch.equal), not to a tolerance; where the official code cannot
run today (its `dssim` imports scikit-image's removed `compare_ssim`) it runs against a shim of
that function. Modules are compared with the same weights loaded into both.
"""
import inspect
import warnings

import numpy as np
import pytest
import torch

import lpips
import lpips_fast

skimage = pytest.importorskip("skimage", reason="scikit-image (a test dependency) is needed")

# Not yet in lpips_fast: the 2AFC trainer (module `trainer`) and data-set scoring (issue 23).
NOT_YET = set()


def official_names():
    """The names the official package defines itself (not numpy, torch, ... it imports)."""
    names = set()
    for name, obj in vars(lpips).items():
        home = getattr(obj, "__module__", None) or getattr(obj, "__name__", "")
        if not name.startswith("_") and home.split(".")[0] == "lpips" and name != "lpips":
            names.add(name)
    return names


def test_every_official_name_exists():
    names = official_names()
    assert {"normalize_tensor", "voc_ap", "DSSIM", "pretrained_networks", "pn"} <= names
    missing = sorted(n for n in names - NOT_YET if not hasattr(lpips_fast, n))
    assert not missing, missing
    modules = {"pretrained_networks", "pn", "trainer"}
    for name in names - NOT_YET - modules:
        ours, theirs = getattr(lpips_fast, name), getattr(lpips, name)
        assert callable(ours) and inspect.isclass(ours) == inspect.isclass(theirs), name
    assert lpips_fast.pn is lpips_fast.pretrained_networks
    assert all(inspect.ismodule(getattr(lpips_fast, m)) for m in modules)


def rng(seed=None):
    return np.random.default_rng(seed)


def test_array_helpers_equal_the_official():
    r = rng()
    a, b = r.integers(0, 256, (2, 23, 31, 3)).astype(np.uint8)
    f, g = r.random((2, 17, 13, 3)) * 100
    for x, y, kw in ((a, b, {}), (f, g, {"range": 100.})):
        assert lpips_fast.l2(x, y, **kw) == lpips.l2(x, y, **kw)
    assert lpips_fast.psnr(a, b) == lpips.psnr(a, b)
    assert lpips_fast.psnr(f, g, peak=100.) == lpips.psnr(f, g, peak=100.)
    assert np.array_equal(lpips_fast.rgb2lab(a), lpips.rgb2lab(a))
    t = torch.randn(2, 3, 11, 7)
    assert np.array_equal(lpips_fast.tensor2np(t), lpips.tensor2np(t))
    assert torch.equal(lpips_fast.np2tensor(f), lpips.np2tensor(f))
    v = torch.randn(4, 6, 1, 1)
    assert np.array_equal(lpips_fast.tensor2vec(v), lpips.tensor2vec(v))
    feat = torch.randn(3, 8, 5, 4)
    feat[0, :, 0, 0] = 0  # a zero vector: divided by eps, stays 0
    assert torch.equal(lpips_fast.normalize_tensor(feat), lpips.normalize_tensor(feat))
    assert torch.equal(lpips_fast.spatial_average(feat), lpips.spatial_average(feat))
    assert torch.equal(lpips_fast.spatial_average(feat, keepdim=False),
                       lpips.spatial_average(feat, keepdim=False))
    assert torch.equal(lpips_fast.upsample(feat, (13, 9)), lpips.upsample(feat, (13, 9)))


def test_lab_tensors_equal_the_official():
    x = torch.rand(1, 3, 19, 21) * 2 - 1
    for kw in ({}, {"to_norm": False}, {"mc_only": True}):
        ours, theirs = lpips_fast.tensor2tensorlab(x, **kw), lpips.tensor2tensorlab(x, **kw)
        assert ours.dtype == torch.float32 and torch.equal(ours, theirs), kw
    lab = lpips.tensor2tensorlab(x)
    filters = list(warnings.filters)
    ours = lpips_fast.tensorlab2tensor(lab)
    assert warnings.filters == filters  # the official one turns all warnings off for good
    ours_bnd = lpips_fast.tensorlab2tensor(lab, return_inbnd=True)
    theirs, theirs_bnd = lpips.tensorlab2tensor(lab), lpips.tensorlab2tensor(lab, True)
    assert torch.equal(ours, theirs)
    assert all(torch.equal(o, t) for o, t in zip(ours_bnd, theirs_bnd))
    warnings.filters[:] = filters  # undo the official call's side effect for later tests


def test_dssim_as_the_official_computed_it(monkeypatch):
    """The official dssim imports `compare_ssim`, gone from scikit-image; with a shim of its
    old signature (multichannel=True: channels last, averaged) the official code runs."""
    from skimage import measure, metrics
    monkeypatch.setattr(measure, "compare_ssim", lambda p0, p1, data_range, multichannel:
                        metrics.structural_similarity(p0, p1, data_range=data_range,
                                                      channel_axis=-1 if multichannel else None),
                        raising=False)
    r = rng()
    a = r.integers(0, 256, (40, 37, 3)).astype(np.float64)
    b = np.clip(a + r.normal(0, 20, a.shape), 0, 255)
    assert lpips_fast.dssim(a, b) == lpips.dssim(a, b) > 0
    assert lpips_fast.dssim(a / 2.55, b / 2.55, range=100.) == lpips.dssim(a / 2.55, b / 2.55,
                                                                            range=100.)
    assert lpips_fast.dssim(a, a) == 0


def test_voc_ap_equals_the_official():
    r = rng()
    for _ in range(20):
        n = int(r.integers(1, 30))
        rec = np.sort(r.random(n))
        prec = r.random(n)
        for use_07 in (False, True):
            assert lpips_fast.voc_ap(rec, prec, use_07) == lpips.voc_ap(rec, prec, use_07)


def test_print_network_prints_the_same(capsys):
    net = lpips_fast.NetLinLayer(16, use_dropout=True)
    lpips.print_network(net)
    theirs = capsys.readouterr().out
    lpips_fast.print_network(net)
    assert capsys.readouterr().out == theirs and "Total number of parameters: 16" in theirs


def same_weights(ours, theirs):
    """Load the official module's (random) weights into ours: the keys must be the same."""
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    return ours


def test_small_modules_equal_the_official():
    torch.manual_seed(int(rng().integers(1 << 30)))
    x = torch.randn(2, 3, 9, 8)
    assert torch.equal(lpips_fast.ScalingLayer()(x), lpips.ScalingLayer()(x))
    f = torch.randn(2, 24, 5, 6)
    for args in ((24,), (24, 2), (24, 1, True)):  # positional, as the official signature
        theirs = lpips.NetLinLayer(*args).eval()
        ours = same_weights(lpips_fast.NetLinLayer(*args).eval(), theirs)
        assert torch.equal(ours(f), theirs(f)), args
    d0, d1 = torch.rand(4, 1, 1, 1), torch.rand(4, 1, 1, 1)
    judge = torch.rand(4, 1, 1, 1) * 2 - 1
    for sigmoid in (True, False):
        theirs = lpips.Dist2LogitLayer(chn_mid=8, use_sigmoid=sigmoid)
        ours = same_weights(lpips_fast.Dist2LogitLayer(chn_mid=8, use_sigmoid=sigmoid), theirs)
        assert torch.equal(ours(d0, d1), theirs(d0, d1))
    theirs = lpips.BCERankingLoss(chn_mid=8)
    ours = same_weights(lpips_fast.BCERankingLoss(chn_mid=8), theirs)
    loss_o, loss_t = ours(d0, d1, judge), theirs(d0, d1, judge)
    assert torch.equal(loss_o, loss_t) and torch.equal(ours.logit, theirs.logit)
    loss_o.backward()
    loss_t.backward()
    for po, pt in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(po.grad, pt.grad)


@pytest.mark.parametrize("cls", ["L2", "DSSIM"])
@pytest.mark.parametrize("colorspace", ["RGB", "Lab"])
def test_baselines_equal_the_official(cls, colorspace, monkeypatch):
    from skimage import measure, metrics
    monkeypatch.setattr(measure, "compare_ssim", lambda p0, p1, data_range, multichannel:
                        metrics.structural_similarity(p0, p1, data_range=data_range,
                                                      channel_axis=-1), raising=False)
    x0 = torch.rand(1, 3, 24, 20) * 2 - 1
    x1 = (x0 + 0.2 * torch.randn_like(x0)).clamp(-1, 1)
    theirs = getattr(lpips, cls)(use_gpu=False, colorspace=colorspace)(x0, x1)
    ours = getattr(lpips_fast, cls)(colorspace=colorspace)(x0, x1)  # use_gpu: inputs' device
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape == (1,)
    assert torch.equal(ours, theirs) and ours.item() > 0
    with pytest.raises(ValueError, match="one image pair at a time .* got 2 and 2"):
        getattr(lpips_fast, cls)(colorspace=colorspace)(x0.repeat(2, 1, 1, 1),
                                                        x1.repeat(2, 1, 1, 1))


@pytest.mark.parametrize("name", ["alexnet", "vgg16", "squeezenet"])
def test_pretrained_networks_equal_the_official(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation of pretrained=
        theirs = getattr(lpips.pretrained_networks, name)(pretrained=False)
    ours = same_weights(getattr(lpips_fast.pn, name)(pretrained=False), theirs)
    assert ours.N_slices == theirs.N_slices
    assert not any(p.requires_grad for p in ours.parameters())  # requires_grad=False default
    assert all(p.requires_grad for p in getattr(lpips_fast.pn, name)(True, False).parameters())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        o, t = ours(x), theirs(x)
    assert o._fields == t._fields and type(o).__name__ == type(t).__name__
    for a, b in zip(o, t):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_pretrained_networks_load_lpips_fasts_weights():
    """pretrained=True finds the weights as LPIPS does (here: the cache), offline."""
    from lpips_fast.weights import WeightsNotFound
    try:
        ours = lpips_fast.pn.alexnet()
    except WeightsNotFound:
        pytest.skip("no AlexNet weights on this machine (make setup imports them)")
    model = lpips_fast.LPIPS(net="alex", verbose=False)
    for (k, a), b in zip(ours.state_dict().items(), model.net.state_dict().values()):
        assert torch.equal(a, b), k


def test_resnet_equals_the_official():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = lpips.pretrained_networks.resnet(pretrained=False, num=18).eval()
    ours = same_weights(lpips_fast.pn.resnet(pretrained=False, num=18).eval(), theirs)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(ours(x), theirs(x)):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="num must be one of"):
        lpips_fast.pn.resnet(pretrained=False, num=20)
