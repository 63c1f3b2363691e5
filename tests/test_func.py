"""torch.func (grad, vmap, vmap(grad), jacrev) through the fused head, against the reference.

Everything runs in float64. The fused and reference heads then differ only in the order of
their sums (float64 eps 2.2e-16, sums over <= 384 channels and a few hundred pixels: ~1e-14
relative), in values and in the fused backward ops' gradients (run under vmap without a
graph); under torch.func.grad the fused head's backward is the reference math itself
(torch.func asks for a differentiable backward). 1e-10 relative leaves a margin of 10^4.
"""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, jacrev, vmap
from torch.utils._pytree import tree_leaves

import lpips_fast
import lpips_fast._ops
from lpips_fast import reference as R
from helpers import DEVICES, feats, fused_available, make_weight, ops, randomize_lins, tdev

pytestmark = pytest.mark.skipif(not fused_available(), reason="lpips_fast extension not built")
# DEVICES: "cpu", "emu" (the CUDA kernels' source, run on the CPU by tests/emu.py) and "cuda"
# (the real kernels; marked `cuda`, skipped without a GPU).
RTOL = 1e-10


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * expected.abs().max())


def close_leaves(got, expected, pick=lambda t: t):
    """Every tensor of two output trees (values, maps, ...), `pick` applied to each of got."""
    got, expected = tree_leaves(got), tree_leaves(expected)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        close(pick(g), e)


# ------------------------------------------------------------------------------- model level
def models(spatial=False):
    """(fused, reference) float64 alex models with the same random weights."""
    torch.manual_seed(0)
    fused = randomize_lins(lpips_fast.LPIPS(pnet_rand=True, verbose=False, impl="fused",
                                            spatial=spatial)).double()
    ref = lpips_fast.LPIPS(pnet_rand=True, verbose=False, impl="reference", spatial=spatial)
    ref.load_state_dict(fused.state_dict())
    return fused, ref.double()


def images(n, size=48, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(n, 3, size, size + 8, generator=gen, dtype=torch.float64) * 2 - 1
            for _ in range(2)]


def test_grad_model():
    fused, ref = models()
    x0, x1 = images(3)
    g0, g1 = grad(lambda a, b: fused(a, b).sum(), argnums=(0, 1))(x0, x1)
    a, b = x0.clone().requires_grad_(), x1.clone().requires_grad_()
    e0, e1 = torch.autograd.grad(ref(a, b).sum(), [a, b])
    close(g0, e0)
    close(g1, e1)


@pytest.mark.parametrize("spatial", [False, True])
def test_vmap_model_equals_batched_call(spatial):
    fused, ref = models(spatial)
    x0, x1 = images(4, size=32)
    got = vmap(lambda a, b: fused(a[None], b[None])[0])(x0, x1)
    close(got, ref(x0, x1))
    # one image against a batch (in_dims None): the model's own broadcasting under vmap
    got = vmap(lambda b: fused(x0[:1], b[None])[0])(x1)
    close(got, ref(x0[:1], x1))


def test_vmap_grad_per_sample_model():
    fused, ref = models()
    x0, x1 = images(3, size=64)
    per_sample = vmap(grad(lambda a, b: fused(a[None], b[None]).sum()))(x0, x1)
    for i in range(3):
        a = x0[i:i + 1].clone().requires_grad_()
        (expected,) = torch.autograd.grad(ref(a, x1[i:i + 1]).sum(), [a])
        close(per_sample[i], expected[0])


def test_vectorized_jacobian_model():
    """autograd.functional.jacobian(vectorize=True) and is_grads_batched=True batch the
    backward with PyTorch's older vmap, which cannot batch the fused backward ops: there the
    backward takes the reference math."""
    fused, ref = models()
    x0, x1 = images(2, size=32)
    jac = [torch.autograd.functional.jacobian(lambda a: m(a, x1).view(-1), x0, vectorize=True)
           for m in (fused, ref)]
    close(*jac)


def test_per_sample_lin_weight_grads():
    """Per-sample gradients of the lin weights (functional_call), as in DP-SGD."""
    fused, ref = models()
    x0, x1 = images(3)
    params = {k: v for k, v in fused.named_parameters() if k.startswith("lins.")}

    def loss(p, a, b):
        return functional_call(fused, p, (a[None], b[None])).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x0, x1)
    for i in range(3):
        ref.zero_grad()
        ref.lins.requires_grad_(True)
        ref(x0[i:i + 1], x1[i:i + 1]).sum().backward()
        for k, v in ref.named_parameters():
            if k.startswith("lins."):
                close(per_sample[k][i], v.grad)


# ------------------------------------------------------------------------------- op level
def layer(n=3, c=6, h=4, w=5, seed=0, device="cpu"):
    """f0, f1 (N x C x h x w, ReLU'ed, offset from the norm's kink at 0) and weights, where
    the ops of `device` take them."""
    f0 = feats((n, c, h, w), torch.float64, seed=seed) + 0.05
    f1 = feats((n, c, h, w), torch.float64, seed=seed + 1) + 0.05
    return tuple(t.to(tdev(device)) for t in (f0, f1, make_weight(c, "cpu", torch.float64)))


def loss_single(head):
    def fn(f0, f1, w):
        value, dmap = head(f0, f1, w, return_map=True)
        return value.sum() + (dmap ** 2).sum()  # both outputs feed the gradient
    return fn


def loss_all(head_all):
    def fn(f0, f1, w):  # two layers: a second one of other size, unweighted
        values, maps = head_all([f0, f0[:, :3, :2]], [f1, f1[:, :3, :2]], [w, None],
                                return_map=True)
        scale = torch.arange(1., 3., dtype=values.dtype, device=values.device)[:, None]
        return (values * scale).sum() + (maps[0] ** 2).sum() + maps[1].sum()
    return fn


LOSSES = {"head": (lambda o: loss_single(o.head), loss_single(R.head)),
          "head_all": (lambda o: loss_all(o.head_all), loss_all(R.head_all))}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", LOSSES)
@pytest.mark.parametrize("transform", ["grad", "jacrev"])
def test_grad_op(device, op, transform):
    make, expected_fn = LOSSES[op]
    args = layer(device=device)
    fn = (grad if transform == "grad" else jacrev)(make(ops(device)), argnums=(0, 1, 2))
    leaves = [a.clone().requires_grad_() for a in args]
    expected = torch.autograd.grad(expected_fn(*leaves), leaves)
    for g, e in zip(fn(*args), expected):
        close(g, e)


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_op_equals_batched_call(device):
    """A vmapped call folds the vmap dimension into the samples; the shared-weight, one-side
    (in_dims None) and batched-weight (a loop) cases all equal the reference."""
    o = ops(device)
    f0, f1, w = layer(device=device, n=6)
    b0, b1 = f0.view(3, 2, *f0.shape[1:]), f1.view(3, 2, *f1.shape[1:])
    ws = torch.stack([w, 2 * w, w.flip(1)])
    for fn, ref in ((lambda a, b, wt: o.head(a, b, wt, return_map=True),
                     lambda a, b, wt: R.head(a, b, wt, return_map=True)),
                    (lambda a, b, wt: o.head_all([a, a[:, :2]], [b, b[:, :2]], [wt, None], True),
                     lambda a, b, wt: R.head_all([a, a[:, :2]], [b, b[:, :2]], [wt, None], True))):
        cases = [((0, 0, None), (b0, b1, w), lambda i: (b0[i], b1[i], w)),
                 ((0, None, None), (b0, f1[:2], w), lambda i: (b0[i], f1[:2], w)),  # f1 shared
                 ((0, 0, 0), (b0, b1, ws), lambda i: (b0[i], b1[i], ws[i]))]  # weights: a loop
        for in_dims, args, per_index in cases:
            got = vmap(fn, in_dims=in_dims)(*args)
            for i in range(3):
                close_leaves(got, ref(*per_index(i)), lambda t: t[i])


def test_vmap_folds_into_one_call(monkeypatch):
    """With shared weights vmap runs the kernels once on the folded batch: no loop (ours,
    here made to fail) and no functorch fallback (which loops, and cannot batch head_all)."""
    def no_loop(*args):
        raise AssertionError("looped")
    monkeypatch.setattr(lpips_fast._ops, "_vmap_loop", no_loop)
    f0, f1, w = layer(n=6)
    b0, b1 = f0.view(3, 2, *f0.shape[1:]), f1.view(3, 2, *f1.shape[1:])
    got = vmap(lambda a, b: ops("cpu").head_all([a], [b], [w], True))(b0, b1)
    for i in range(3):
        close_leaves(got, R.head_all([b0[i]], [b1[i]], [w], True), lambda t: t[i])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", LOSSES)
def test_vmap_grad_per_sample_op(device, op):
    make, expected_fn = LOSSES[op]
    f0, f1, w = layer(device=device, n=4)
    per_sample = vmap(grad(make(ops(device)), argnums=(0, 1, 2)), in_dims=(0, 0, None))(
        f0[:, None], f1[:, None], w)
    for i in range(4):
        leaves = [f0[i:i + 1].clone().requires_grad_(), f1[i:i + 1].clone().requires_grad_(),
                  w.clone().requires_grad_()]
        for g, e in zip(per_sample, torch.autograd.grad(expected_fn(*leaves), leaves)):
            close(g[i], e)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", LOSSES)
@pytest.mark.parametrize("weight_grad", [False, True])
def test_vmapped_fused_backward(device, op, weight_grad):
    """vmap over a vjp without create_graph runs the fused backward ops themselves under
    vmap (their batching rules; a weight gradient, a sum over samples, by a loop)."""
    make, expected_fn = LOSSES[op]
    f0, f1, w = layer(device=device, n=2)
    seeds = torch.tensor([1., -2., 0.5], dtype=torch.float64, device=tdev(device))

    def rows(fn):
        if weight_grad:
            _, vjp_fn = torch.func.vjp(fn, f0, f1, w)
        else:
            _, vjp_fn = torch.func.vjp(lambda a, b: fn(a, b, w), f0, f1)
        with torch.no_grad():  # no graph of the gradient wanted: the fused backward runs
            return vmap(vjp_fn)(seeds)

    close_leaves(rows(make(ops(device))), rows(expected_fn))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", LOSSES)
def test_is_grads_batched_op(device, op):
    """PyTorch's older vmap over the backward (see test_vectorized_jacobian_model)."""
    make, expected_fn = LOSSES[op]
    args = layer(device=device, n=2)
    seeds = torch.tensor([1., -2., 0.5], dtype=torch.float64, device=tdev(device))

    def rows(fn):
        leaves = [a.clone().requires_grad_() for a in args]
        return torch.autograd.grad(fn(*leaves), leaves, seeds, is_grads_batched=True)

    close_leaves(rows(make(ops(device))), rows(expected_fn))


@pytest.mark.parametrize("device", DEVICES)
def test_second_order_through_func(device):
    """grad of a grad: the inner backward records the reference math, so it nests."""
    f0, f1, w = layer(device=device)
    inner = loss_single(ops(device).head)
    outer = grad(lambda a: (grad(inner)(a, f1, w) ** 2).sum())(f0)
    expected = grad(lambda a: (grad(loss_single(R.head))(a, f1, w) ** 2).sum())(f0)
    close(outer, expected)


@pytest.mark.parametrize("transform", ["jacfwd", "hessian", "forward_ad"])
def test_forward_mode_is_a_clear_error(transform):
    """The fused head has no forward-mode derivative: an error, never silent zeros (what
    torch.library.register_autograd's wrapper gave before). hessian is forward over reverse."""
    f0, f1, w = layer()
    with pytest.raises(NotImplementedError, match="forward-mode"):
        if transform in ("jacfwd", "hessian"):
            getattr(torch.func, transform)(lambda a: ops("cpu").head(a, f1, w)[0].sum())(f0)
        else:
            import torch.autograd.forward_ad as fwAD
            with fwAD.dual_level():
                ops("cpu").head(fwAD.make_dual(f0, torch.ones_like(f0)), f1, w)


@pytest.mark.parametrize("ns", ["lpips_fast", "lpips_fast_emu"])
@pytest.mark.parametrize("name", ["head_forward", "head_backward", "head_all_forward",
                                  "head_all_backward"])
def test_batching_rules_registered(ns, name):
    """vmap uses the ops' own rules, not functorch's per-sample fallback (which cannot batch
    the all-layer ops at all), in both namespaces that _ops.register serves."""
    ops("emu")  # builds and registers the emulated namespace
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"{ns}::{name}", "FuncTorchBatched")


@pytest.mark.parametrize("spatial", [False, True])
def test_vmap_through_a_tiled_model(spatial):
    """vmap of a tiled model (tile_size, or a memory_budget on large images) equals the
    untiled batched call: the tiled path accumulated into buffers in place, which vmap
    refused ('output with shape [1] doesn't match the broadcast shape [2, 1]')."""
    fused, ref = models(spatial)
    fused.tile_size = 48
    x0, x1 = images(2, size=120)
    assert fused._tile(x0, x1) == 48  # the tiled path runs
    got = vmap(lambda a, b: fused(a[None], b[None])[0])(x0, x1)
    close(got, ref(x0, x1))
