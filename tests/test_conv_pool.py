"""The fused conv + bias + ReLU + max-pool op (lpips_fast._conv_ops.conv_bias_relu_pool,
csrc/conv_pool.h) and its place in the fused backbone.

Op tests run on "cpu", "emu" (the CUDA kernels executed on the CPU by csrc/emu) and "cuda",
with outputs NaN-filled before the kernels run (an unwritten element fails every check).

Exactness (no tolerances; why):
- The tap `out` is conv_bias_relu's output bit for bit (the same bias-free conv and the same
  rounding of y + b), which tests/test_backbone_fused.py compares with eager conv2d + relu.
- `pooled` is max_pool2d of that tap: a max selects one of the window's values, so it is
  bit-identical to F.max_pool2d(definition), ties and NaN included.
- Gradients: the pass sums each element's window gradients in ascending window order, the
  order of ATen's kernels, in the dtype on the CPU and in float32 on CUDA (ATen's CPU and
  CUDA kernels differ there for half/bfloat16, and so do the ops, see conv_pool.h), then adds
  the tap's gradient once, as autograd does; ReLU's mask and convolution_backward are eager's.
  So every gradient equals autograd through the definition (bias-free conv2d, + b, relu,
  max_pool2d) bit for bit; the emulated CUDA kernel is compared with the CUDA rule.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lpips_fast
from lpips_fast import _conv_ops, _ops, backbones
from helpers import (DEVICES, assert_second_order_equal, conv_ns, conv_ops, fused_op_calls,
                     make_conv, randomize_lins, same_layout, tdev)

pytestmark = [pytest.mark.skipif(not _ops.available(),
                                 reason=f"extension not built: {_ops.load_error}"),
              pytest.mark.usefixtures("conv_exact")]  # (conftest.py)
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


# (N, Cin, H, W, Cout, kernel, stride, padding, pool kernel, pool stride, ceil_mode):
# alex's first layer and pool, odd sizes with rows no window covers, vgg's 2x2, squeeze's
# ceil-mode pool with windows overhanging the edge, a kernel smaller than its stride (gaps,
# and the ceil rule that drops a window starting outside), a 1x1 pooled output, an empty batch.
CASES = [
    (2, 3, 31, 29, 8, 11, (4, 4), (2, 2), 3, 2, False),
    (2, 5, 13, 12, 7, 3, (1, 1), (1, 1), 3, 2, False),
    (1, 4, 9, 10, 6, 3, (1, 1), (1, 1), 2, 2, False),
    (2, 3, 17, 20, 8, 3, (2, 2), (0, 0), 3, 2, True),
    (1, 2, 5, 5, 3, 1, (1, 1), (0, 0), 1, 3, True),
    (2, 3, 5, 5, 4, 3, (1, 1), (0, 0), 3, 2, False),
    (0, 4, 7, 7, 3, 3, (1, 1), (1, 1), 3, 2, False),
]


def pool_args(case):
    k, s, ceil = case[8:]
    return [k, k], [s, s], ceil


def definition(x, wt, b, stride, padding, pool):
    """Eager ops: bias-free conv2d, + b, relu, max_pool2d (autograd through them)."""
    out = (F.conv2d(x, wt, None, stride, padding) + b.view(-1, 1, 1)).relu()
    return out, F.max_pool2d(out, pool[0], pool[1], ceil_mode=pool[2])


def run(device, x, wt, b, stride, padding, pool):
    return _conv_ops.conv_bias_relu_pool(x, wt, b, stride, padding, *pool, ns=conv_ns(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_equals_definition(device, dtype, layout, case):
    x, wt, b, stride, padding = make_conv(case, dtype, device, layout)
    pool = pool_args(case)
    out, pooled = conv_ops(device).conv_bias_relu_pool(x, wt, b, stride, padding, *pool)
    want_out, want_pooled = definition(x, wt, b, stride, padding, pool)
    for got, want in ((out, want_out), (pooled, want_pooled)):
        assert got.dtype == dtype and got.shape == want.shape and same_layout(got, want)
        assert torch.equal(got, want), (got - want).abs().max()
    assert torch.equal(out, conv_ops(device).conv_bias_relu(x, wt, b, stride, padding))
    if out.numel():  # the data reach both sides of the ReLU (zeros: ties in the windows)
        assert (out > 0).any() and (out == 0).any()


def grad_reference(device, x, wt, b, stride, padding, pool, grad_out, grad_pooled, inputs):
    """The op's gradients by its definition: autograd through eager's ops gives the gradient
    of the convolution's output, which one aten.convolution_backward turns into x, weight
    and bias gradients (the op's call; autograd through `+ b` would sum the bias gradient
    in another order). The emulated CUDA kernel sums a window's half/bfloat16 gradients in
    float32 as ATen's CUDA kernels do: the pool's backward then runs in float32."""
    y = F.conv2d(x.detach(), wt.detach(), None, stride, padding).requires_grad_(True)
    out = (y + b.detach().view(-1, 1, 1)).relu()
    low = device == "emu" and x.dtype in (torch.float16, torch.bfloat16)
    src = out.detach().float().requires_grad_(True) if low else out
    pooled = F.max_pool2d(src, pool[0], pool[1], ceil_mode=pool[2])
    total = None
    if grad_pooled is not None:
        (total,) = torch.autograd.grad(pooled, src, grad_pooled.to(src.dtype), retain_graph=True)
        total = total.to(x.dtype)
    if grad_out is not None:
        total = grad_out if total is None else total + grad_out
    (gy,) = torch.autograd.grad(out, y, total)
    mask = [any(t is i for i in inputs) for t in (x, wt, b)]
    grads = torch.ops.aten.convolution_backward(gy, x.detach(), wt.detach(),
                                                [wt.shape[0]] if mask[2] else None, stride,
                                                padding, [1, 1], False, [0, 0], 1, mask)
    return [g for g, m in zip(grads, mask) if m]


def random_grads(out, pooled, which, seed=5):
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=g).to(out) if "out" in which else None
    grad_pooled = torch.randn(pooled.shape, generator=g).to(pooled) if "pooled" in which else None
    return grad_out, grad_pooled


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradients_equal_definition(device, dtype, layout, case):
    """x, weight and bias gradients (all three asked for) with gradients reaching both
    outputs; bit-identical to autograd through the definition."""
    x, wt, b, stride, padding = make_conv(case, dtype, device, layout, requires_grad=True)
    pool = pool_args(case)
    out, pooled = run(device, x, wt, b, stride, padding, pool)
    grad_out, grad_pooled = random_grads(out, pooled, ("out", "pooled"))
    got = torch.autograd.grad((out, pooled), (x, wt, b), (grad_out, grad_pooled))
    want = grad_reference(device, x, wt, b, stride, padding, pool, grad_out, grad_pooled,
                          (x, wt, b))
    for a, e in zip(got, want):
        assert a.shape == e.shape and torch.equal(a, e), (a - e).abs().max()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", [("pooled",), ("out",)], ids=str)
def test_gradient_through_one_output(device, which):
    """A gradient that reaches only pooled (no tap gradient: grad_out None) or only the tap;
    only the input gradient asked for."""
    x, wt, b, stride, padding = make_conv(CASES[1], torch.float32, device, "channels_last")
    x.requires_grad_(True)
    pool = pool_args(CASES[1])
    out, pooled = run(device, x, wt, b, stride, padding, pool)
    grad_out, grad_pooled = random_grads(out, pooled, which)
    used = out if grad_out is not None else pooled
    (got,) = torch.autograd.grad(used, x, grad_out if grad_out is not None else grad_pooled)
    (want,) = grad_reference(device, x, wt, b, stride, padding, pool, grad_out, grad_pooled, (x,))
    assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ties_pick_the_first_element_and_nan_the_last(device, dtype):
    """Weights 0: each conv output channel is its bias. Channel 0 (bias < 0): zeros after
    the ReLU, all masked. Channel 1: equal positive values, every window a tie, its gradient
    goes to the window's FIRST element. Channel 2 (bias NaN): the max is the window's LAST
    element (PyTorch's `v > max || isnan(v)`), and the NaN passes ReLU's mask. The input is
    one impulse per pixel (a 1x1 conv over H*W one-hot channels), so the weight gradient
    holds the gradient at the convolution's output pixel by pixel, exactly."""
    h, w = 8, 9  # 3x3 stride 2 ceil: 4 x 4 windows, the last row's clipped at the edge
    x = torch.eye(h * w, dtype=dtype, device=tdev(device)).view(1, h * w, h, w)
    wt = torch.zeros(3, h * w, 1, 1, dtype=dtype, device=x.device, requires_grad=True)
    b = torch.tensor([-0.5, 0.75, float("nan")], dtype=dtype, device=x.device)
    pool = ([3, 3], [2, 2], True)
    out, pooled = run(device, x, wt, b, [1, 1], [0, 0], pool)
    want_pooled = torch.tensor([0.0, 0.75]).view(2, 1, 1).expand(2, 4, 4)
    assert torch.equal(pooled[0, :2], want_pooled.to(pooled))
    assert pooled[0, 2].isnan().all()
    gp = torch.rand(pooled.shape, generator=torch.Generator().manual_seed(1)).to(pooled) + 1
    (gw,) = torch.autograd.grad(pooled, wt, gp)
    g = gw.view(3, h, w)
    want = torch.zeros(3, h, w, dtype=dtype)
    for ph in range(4):
        for pw in range(4):
            want[1, 2 * ph, 2 * pw] = gp[0, 1, ph, pw]
            want[2, min(2 * ph + 2, h - 1), min(2 * pw + 2, w - 1)] = gp[0, 2, ph, pw]
    assert torch.equal(g.cpu(), want), g
    (ref,) = grad_reference(device, x, wt, b, [1, 1], [0, 0], pool, None, gp, (wt,))
    assert torch.equal(gw, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_emu_grid_stride_steps(monkeypatch, dtype):
    """One block of the emulated kernels covers the work in several grid-stride steps."""
    monkeypatch.setenv("LPIPS_FAST_EMU_EW_BLOCKS", "1")
    case = (2, 5, 40, 40, 7, 3, (1, 1), (1, 1), 3, 2, False)
    x, wt, b, stride, padding = make_conv(case, dtype, "emu", "nchw", requires_grad=True)
    pool = pool_args(case)
    out, pooled = run("emu", x, wt, b, stride, padding, pool)
    assert pooled.numel() > 2 * 256 and out.numel() > 3 * 256  # 256 threads, one block
    want_out, want_pooled = definition(x, wt, b, stride, padding, pool)
    assert torch.equal(out, want_out) and torch.equal(pooled, want_pooled)
    grads = random_grads(out, pooled, ("out", "pooled"))
    got = torch.autograd.grad((out, pooled), x, grads)
    want = grad_reference("emu", x, wt, b, stride, padding, pool, *grads, (x,))
    assert torch.equal(got[0], want[0])


def window_gaps(out, pool):
    """Per pooled window with a positive max: the max less the runner-up."""
    k, s, _ = pool
    cols = F.unfold(F.pad(out.detach(), (0, 1, 0, 1), value=-1.0) if pool[2] else out.detach(),
                    k, stride=s).transpose(1, 2)
    top = cols.topk(2, dim=-1).values
    return (top[..., 0] - top[..., 1])[top[..., 0] > 0]


@pytest.mark.parametrize("device", ["cpu", "emu"])
def test_gradcheck_and_second_order(device):
    """float64 gradcheck and gradgradcheck, pool with ceil-mode overhang; second-order
    gradients equal eager's (create_graph runs eager's differentiable formulas)."""
    case = (1, 2, 11, 10, 3, 3, (2, 2), (0, 0), 3, 2, True)  # small: one forward per element
    x, wt, b, stride, padding = make_conv(case, torch.float64, device, "nchw", requires_grad=True)
    pool = pool_args(case)

    def fn(x, wt, b):
        return run(device, x, wt, b, stride, padding, pool)

    out, _ = fn(x, wt, b)
    # no output within the finite-difference step of the ReLU's kink or of a window's
    # runner-up (else the check is moot)
    assert out.detach().abs().add((out == 0).double()).min() > 1e-4
    assert window_gaps(out, pool).min() > 1e-4
    assert torch.autograd.gradcheck(fn, (x, wt, b))
    assert torch.autograd.gradgradcheck(fn, (x, wt, b))
    # eager with its biased conv: no window near a tie, so the same argmax, and gradients
    # equal up to the order of float64 sums (a few hundred terms: 1e-12 relative is ample)
    eager_out = F.relu(F.conv2d(x, wt, b, stride, padding))
    eager = (eager_out, F.max_pool2d(eager_out, pool[0], pool[1], ceil_mode=pool[2]))
    grads = [torch.randn(t.shape, dtype=t.dtype) for t in eager]
    for a, e in zip(torch.autograd.grad(fn(x, wt, b), (x, wt, b), grads),
                    torch.autograd.grad(eager, (x, wt, b), grads)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)

    def loss(outs):
        return outs[0].square().sum() + outs[1].pow(3).sum()

    assert_second_order_equal(lambda *a: loss(fn(*a)),
                              lambda *a: loss(definition(*a, stride, padding, pool)), x, wt, b)


@pytest.mark.parametrize("ns", ["lpips_fast", "lpips_fast_emu"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck(ns, layout):
    device = "emu" if ns.endswith("emu") else "cpu"
    x, wt, b, stride, padding = make_conv(CASES[1], torch.float32, device, layout,
                                          requires_grad=True)
    op, pool = conv_ops(device), pool_args(CASES[1])
    torch.library.opcheck(op.conv_bias_relu_pool, (x, wt, b, stride, padding, *pool))
    out, pooled = (t.detach() for t in op.conv_bias_relu_pool(x, wt, b, stride, padding, *pool))
    for grad_out in (torch.randn_like(out), None):
        torch.library.opcheck(op.conv_bias_relu_pool_backward,
                              (grad_out, torch.randn_like(pooled), out, x.detach(), wt.detach(),
                               stride, padding, *pool, [True, True, True]))


def test_bad_inputs_raise_one_line():
    x, wt, b, stride, padding = make_conv(CASES[1], torch.float32, "cpu", "nchw")
    op = torch.ops.lpips_fast
    with pytest.raises(RuntimeError, match="pool kernel and stride must be two positive"):
        op.conv_bias_relu_pool(x, wt, b, stride, padding, [0, 3], [2, 2], False)
    with pytest.raises(RuntimeError, match="13 x 12 convolution output is too small for a 14 x 3"):
        op.conv_bias_relu_pool(x, wt, b, stride, padding, [14, 3], [2, 2], False)
    with pytest.raises(RuntimeError, match="bias must hold 7 Float"):
        op.conv_bias_relu_pool(x, wt, b[:3], stride, padding, [3, 3], [2, 2], False)
    out, pooled = op.conv_bias_relu_pool(x, wt, b, stride, padding, [3, 3], [2, 2], False)
    with pytest.raises(RuntimeError, match=r"grad_pooled \(\[2, 7, 5, 5\].*must be \[2, 7, 6, 5\]"):
        op.conv_bias_relu_pool_backward(None, pooled[:, :, :5], out, x, wt, stride, padding,
                                        [3, 3], [2, 2], False, [True, False, False])


# ------------------------------------------------------------------ in the fused backbone
def fused_model(net, seed=0):
    torch.manual_seed(seed)
    m = randomize_lins(lpips_fast.LPIPS(net=net, pnet_rand=True, verbose=False))
    m.backbone_impl = "fused"
    return m


@pytest.mark.parametrize("net,want", [("alex", (3, 2)), ("vgg", (9, 4)), ("squeeze", (24, 1))])
def test_backbone_fuses_each_pool_after_a_conv(net, want):
    """A conv + ReLU that ends a slice whose next slice starts with a max-pool runs with it
    (alex: 2 pools, vgg: 4, squeeze: 1; squeeze's others follow fire modules); the taps are
    the ReLU outputs (the whole model against eager: tests/test_backbone_fused.py)."""
    model = fused_model(net)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert tuple(fused_op_calls(lambda: model(x, x.flip(0))).values()) == want
    net_ = model.net
    with torch.no_grad():
        fused = net_(x)
        net_.impl = "eager"
        eager = net_(x)
    for f, e in zip(fused, eager):
        assert f.shape == e.shape and (f - e).abs().max() <= 1e-5 * e.abs().max()
        assert (f >= 0).all()  # a ReLU output, not a pooled one


def test_unsupported_pools_fall_back():
    """A pool the op does not compute (padding, dilation, indices, hooks) or that has no
    output for the conv's size runs today's path: conv_bias_relu, then the pool module."""
    conv, relu = nn.Conv2d(3, 5, 3, padding=1), nn.ReLU()
    x = torch.randn(2, 3, 9, 8)
    pools = [nn.MaxPool2d(3, 2, padding=1), nn.MaxPool2d(3, 2, dilation=2),
             nn.MaxPool2d(3, 2, return_indices=True), nn.MaxPool2d(3, 2), nn.AvgPool2d(2)]
    pools[3].register_forward_hook(lambda *a: None)
    for pool in pools:
        got = {}
        calls = fused_op_calls(lambda: got.update(r=backbones._conv_relu_pool(conv, relu, pool, x)))
        assert calls == {"conv_bias_relu": 1, "conv_bias_relu_pool": 0}, pool
        tap = relu(conv(x))
        assert torch.allclose(got["r"][0], tap, atol=1e-6)
        want = pool(tap)
        for a, e in zip(*(t if isinstance(t, tuple) else (t,) for t in (got["r"][1], want))):
            assert torch.equal(a, e)
    supported = nn.MaxPool2d(3, 2)
    assert fused_op_calls(lambda: backbones._conv_relu_pool(conv, relu, supported, x)) == {
        "conv_bias_relu": 0, "conv_bias_relu_pool": 1}
    no_bias = nn.Conv2d(3, 5, 3, padding=1, bias=False)  # a pair the fused ops do not take
    got = {}
    assert fused_op_calls(lambda: got.update(r=backbones._conv_relu_pool(
        no_bias, relu, supported, x))) == {"conv_bias_relu": 0, "conv_bias_relu_pool": 0}
    assert torch.equal(got["r"][1], supported(relu(no_bias(x))))
    with pytest.raises(RuntimeError, match="Output size is too small"):  # eager's own error
        backbones._conv_relu_pool(conv, relu, nn.MaxPool2d(3, 2), x[:, :, :2])
