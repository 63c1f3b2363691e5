"""The fused slice end conv + bias + ReLU + LPIPS head (lpips_fast._conv_head,
csrc/conv_head.h: the head kernels' prologue) and its place in the streaming forward
(backbone impl "fused-head").

Op tests run on "cpu" (the CPU twin: a block's tap written, then the unchanged head code),
"emu" (the CUDA kernels executed on the CPU by csrc/emu) and "cuda", with outputs NaN-filled
before the kernels run (an unwritten tap element or head output fails every check).

Exactness (no tolerances; why): the fused op is compared with the unfused path it replaces,
conv_bias_relu then the head op on the tap's halves, on the same device's kernels.
- The tap: the same bias-free convolution and bias_relu (csrc/bias_relu.h, one function for
  both) give the same bits.
- The head: the prologue's features are those same bits (relu(y + b) rounded to the dtype,
  then widened to the accumulator as a loaded tap is), and every sum runs over the same
  terms in the same order (the block partition depends on shapes only; the CPU twin runs the
  unchanged block code on the tap it has just written): value, map and norms bit-identical.
- Gradients: the op's backward is head_backward on the tap's halves, the sum with the tap's
  other gradient (autograd's sum of the same two terms) and conv_bias_relu_backward: the
  unfused path's kernels on the same inputs, bit-identical.
float64 gradcheck / gradgradcheck check the backward against finite differences.
"""
from __future__ import annotations

import pytest
import torch

import lpips_fast
from lpips_fast import _conv_head, _conv_ops, _ops, backbones, model as model_mod
from lpips_fast.backbones import BACKBONE_ENV
from helpers import DEVICES, conv_ns, make_conv, ops, randomize_lins, same_layout

pytestmark = [pytest.mark.skipif(not _ops.available(),
                                 reason=f"extension not built: {_ops.load_error}"),
              pytest.mark.usefixtures("conv_exact")]  # (conftest.py)
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


# (2N, Cin, H, W, Cout, kernel, stride, padding): odd sizes; 70 channels (several warps per
# pixel tile on CUDA); one pair (batch stride 0 in the kernels); 260 channels (past the
# pixel-lane register cache in float64: W * R = 16 * 16, the re-read path); an empty batch.
CASES = [
    (4, 5, 9, 11, 7, 3, (1, 1), (1, 1)),
    (4, 6, 7, 6, 70, 3, (2, 1), (1, 0)),
    (2, 3, 8, 8, 5, 1, (1, 1), (0, 0)),
    (2, 4, 4, 3, 260, 3, (1, 1), (1, 1)),
    (0, 4, 5, 5, 3, 3, (1, 1), (1, 1)),
]


def lin_weight(c, device, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, c, 1, 1, generator=g).to(device)


def fused(device, x, wt, b, stride, padding, lw, return_map):
    return _conv_head.conv_bias_relu_head(x, wt, b, stride, padding, lw, return_map,
                                          ns=conv_ns(device))


def unfused(device, x, wt, b, stride, padding, lw, return_map):
    """The path the op replaces: conv_bias_relu, then the head op on the tap's halves."""
    tap = _conv_ops.conv_bias_relu(x, wt, b, stride, padding, ns=conv_ns(device))
    n = tap.shape[0] // 2
    return tap, ops(device).head(tap[:n], tap[n:], lw, return_map=return_map)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_equals_unfused(device, dtype, layout, case):
    x, wt, b, stride, padding = make_conv(case, dtype, device, layout)
    lw = lin_weight(case[4], x.device)
    for weight, return_map in ((lw, True), (None, False)):
        out, (value, dmap) = fused(device, x, wt, b, stride, padding, weight, return_map)
        tap, (want_value, want_map) = unfused(device, x, wt, b, stride, padding, weight,
                                              return_map)
        assert out.dtype == dtype and out.shape == tap.shape and same_layout(out, tap)
        assert torch.equal(out, tap), (out - tap).abs().max()  # (NaN: an unwritten element)
        assert torch.equal(value, want_value), (value, want_value)
        assert (dmap is None) == (not return_map) and (dmap is None or torch.equal(dmap, want_map))
    # the norms the backward reads
    n = tap.shape[0] // 2
    got = conv_ops_ns(device).conv_bias_relu_head(x, wt, b, stride, padding, None, False)[3:]
    want = conv_ops_ns(device).head_forward(tap[:n], tap[n:], None, False)[2:]
    assert all(torch.equal(a, e) for a, e in zip(got, want))
    if out.numel():  # the data reach both sides of the ReLU
        assert (out > 0).any() and (out == 0).any()


def conv_ops_ns(device):
    return getattr(torch.ops, conv_ns(device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_emu_one_block_walks_every_round(monkeypatch, dtype, layout):
    """One block per sample: the emulated kernels' block-uniform loops take many rounds."""
    monkeypatch.setenv("LPIPS_FAST_EMU_MAX_BLOCKS", "1")
    case = (4, 3, 20, 19, 40, 3, (1, 1), (1, 1))
    x, wt, b, stride, padding = make_conv(case, dtype, "emu", layout)
    lw = lin_weight(40, "cpu")
    out, (value, dmap) = fused("emu", x, wt, b, stride, padding, lw, True)
    tap, (want_value, want_map) = unfused("emu", x, wt, b, stride, padding, lw, True)
    assert torch.equal(out, tap) and torch.equal(value, want_value) and torch.equal(dmap, want_map)


def random_grads(out, value, dmap, which, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=g).to(t) if name in which else None
            for name, t in (("out", out), ("value", value), ("map", dmap))]


def grads_of(outputs, inputs, grads):
    used = [(o, g) for o, g in zip(outputs, grads) if g is not None]
    return torch.autograd.grad([o for o, _ in used], inputs, [g for _, g in used],
                               allow_unused=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("which", [("out", "value", "map"), ("value",), ("out",), ("map",)],
                         ids=str)
def test_gradients_equal_unfused(device, dtype, layout, which):
    """x, conv weight, bias and lin weight gradients, with gradients reaching the tap (as
    from the next slice) and / or the head's outputs: bit-identical to the unfused path."""
    x, wt, b, stride, padding = make_conv(CASES[1], dtype, device, layout, requires_grad=True)
    lw = lin_weight(CASES[1][4], x.device).requires_grad_(True)
    inputs = (x, wt, b, lw)
    out, (value, dmap) = fused(device, x, wt, b, stride, padding, lw, True)
    grads = random_grads(out, value, dmap, which)
    got = grads_of((out, value, dmap), inputs, grads)
    tap, (v2, d2) = unfused(device, x, wt, b, stride, padding, lw, True)
    want = grads_of((tap, v2, d2), inputs, grads)
    for name, a, e in zip(("x", "weight", "bias", "lin"), got, want):
        assert (a is None) == (e is None), name
        assert a is None or (a.shape == e.shape and torch.equal(a, e)), (name, (a - e).abs().max())
    assert got[0] is not None and (got[3] is None) == (which == ("out",))


@pytest.mark.parametrize("device", ["cpu", "emu"])
def test_gradcheck_and_second_order(device):
    """float64 gradcheck through all inputs (fast mode: random projections of the Jacobian,
    which a wrong backward fails as surely), and on the CPU gradgradcheck (a create_graph
    backward runs the reference head's and eager's differentiable formulas, the same on
    every device)."""
    case = (2, 2, 4, 5, 3, 3, (1, 1), (1, 1))  # small: one forward per input element
    x, wt, b, stride, padding = make_conv(case, torch.float64, device, "nchw",
                                          requires_grad=True)
    lw = lin_weight(3, "cpu").double().requires_grad_(True)

    def fn(x, wt, b, lw):
        out, (value, dmap) = fused(device, x, wt, b, stride, padding, lw, True)
        return out, value, dmap

    out = fn(x, wt, b, lw)[0].detach()
    # no output within the finite-difference step of the ReLU's kink, and no all-zero
    # feature vector (where the norm's derivative is not defined)
    assert out.abs().add((out == 0).double()).min() > 1e-4
    assert (out.square().sum(1) > 1e-4).all()
    assert torch.autograd.gradcheck(fn, (x, wt, b, lw), fast_mode=True)
    if device == "cpu":
        assert torch.autograd.gradgradcheck(fn, (x, wt, b, lw), fast_mode=True)


@pytest.mark.parametrize("ns", ["lpips_fast", "lpips_fast_emu"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck(ns, layout):
    device = "emu" if ns.endswith("emu") else "cpu"
    x, wt, b, stride, padding = make_conv(CASES[0], torch.float32, device, layout,
                                          requires_grad=True)
    lw = lin_weight(CASES[0][4], "cpu")
    torch.library.opcheck(conv_ops_ns(device).conv_bias_relu_head,
                          (x, wt, b, stride, padding, lw, True))


def test_bad_inputs_raise_one_line():
    x, wt, b, stride, padding = make_conv(CASES[0], torch.float32, "cpu", "nchw")
    op = torch.ops.lpips_fast.conv_bias_relu_head
    with pytest.raises(RuntimeError, match="x must hold the pair's two batches .2N samples.*got 3"):
        op(x[:3], wt, b, stride, padding, None, False)
    with pytest.raises(RuntimeError, match="bias must hold 7 Float"):
        op(x, wt, b[:3], stride, padding, None, False)
    with pytest.raises(RuntimeError, match="weight has 3 elements but the features have C = 7"):
        op(x, wt, b, stride, padding, torch.ones(3), False)


# ------------------------------------------------------------------ in the streaming forward
def head_calls(fn):
    """conv_bias_relu_head calls while fn() runs without autograd."""
    calls, real = [0], _conv_head.conv_bias_relu_head

    def counting(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    _conv_head.conv_bias_relu_head = counting
    try:
        with torch.no_grad():
            fn()
    finally:
        _conv_head.conv_bias_relu_head = real
    return calls[0]


def streaming_model(net, monkeypatch, **kwargs):
    """A random-weight model that streams at test sizes (no all-layer head below 0 pixels)."""
    monkeypatch.setattr(model_mod, "ONE_LAUNCH_MAX_PIXELS", 0)
    torch.manual_seed(0)
    return randomize_lins(lpips_fast.LPIPS(net=net, pnet_rand=True, verbose=False, **kwargs))


def pair(n0=2, n1=2, size=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n0, 3, size, size, generator=g) * 2 - 1,
            torch.rand(n1, 3, size, size, generator=g) * 2 - 1)


def scores(m, in0, in1, impl):
    m.backbone_impl = impl
    with torch.no_grad():
        return m(in0, in1, retPerLayer=True)


@pytest.mark.parametrize("net,want", [("alex", 3), ("vgg", 1), ("squeeze", 0)])
@pytest.mark.parametrize("spatial", [False, True])
def test_model_takes_heads_from_epilogues(monkeypatch, net, want, spatial):
    """alex relu3-5 and vgg relu5_3 (a conv + ReLU that no pool follows) take their heads
    from the epilogue; squeeze's taps are fire modules' concatenations (none). Scores and
    per-layer scores equal the "fused" impl's bit for bit."""
    m = streaming_model(net, monkeypatch, spatial=spatial)
    in0, in1 = pair()
    assert head_calls(lambda: scores(m, in0, in1, "fused-head")) == want
    (got, got_layers), (ref, ref_layers) = (scores(m, in0, in1, impl)
                                            for impl in ("fused-head", "fused"))
    assert torch.equal(got, ref) and all(torch.equal(a, e) for a, e in zip(got_layers, ref_layers))
    monkeypatch.setenv(BACKBONE_ENV, "fused-head")  # the environment selects it too
    m.backbone_impl = None
    assert head_calls(lambda: m(in0, in1)) == want


def test_model_under_bf16(monkeypatch):
    """precision="bf16" (the op casts as autocast casts conv2d; the head reads bfloat16 taps)
    and the caller's autocast: scores equal the "fused" impl's bit for bit."""
    m = streaming_model("alex", monkeypatch, precision="bf16")
    in0, in1 = pair()
    assert head_calls(lambda: scores(m, in0, in1, "fused-head")) == 3
    (got, got_layers), (ref, ref_layers) = (scores(m, in0, in1, impl)
                                            for impl in ("fused-head", "fused"))
    assert torch.equal(got, ref) and all(torch.equal(a, e) for a, e in zip(got_layers, ref_layers))
    m.precision = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head_calls(lambda: scores(m, in0, in1, "fused-head")) == 3
        assert torch.equal(scores(m, in0, in1, "fused-head")[0], scores(m, in0, in1, "fused")[0])


def test_model_falls_back_where_it_does_not_apply(monkeypatch):
    """Today's path (no conv_bias_relu_head call, the same scores) where the fused head does
    not apply: the "fused" impl, the two inputs in separate backbone passes (other gradient
    modes) or of other batch sizes (broadcast: not the pairing n, n + N), the reference head, dropout acting, a
    hooked conv (the other layers still fuse), the all-layer head (small images)."""
    m = streaming_model("alex", monkeypatch)
    in0, in1 = pair()
    want = scores(m, in0, in1, "fused")[0]
    m.backbone_impl = "fused"
    assert head_calls(lambda: m(in0, in1)) == 0
    m.backbone_impl = "fused-head"
    # (prepared inputs differ in gradient mode only while autograd records: the all-layer
    # head then, never streaming; the guard mirrors _features' condition)
    assert not m._heads_fusable(in0.clone().requires_grad_(True), in1)
    b0, b1 = pair(1, 2)
    assert head_calls(lambda: m(b0, b1)) == 0
    assert torch.equal(scores(m, b0, b1, "fused-head")[0], scores(m, b0, b1, "fused")[0])
    m.backbone_impl = "fused-head"
    m.impl = "reference"
    assert head_calls(lambda: m(in0, in1)) == 0
    m.impl = "auto"
    hook = getattr(m.net.slice5, "10").register_forward_hook(lambda *a: None)
    got = {}
    assert head_calls(lambda: got.update(v=m(in0, in1))) == 2
    assert torch.equal(got["v"], want)
    hook.remove()
    monkeypatch.setattr(model_mod, "ONE_LAUNCH_MAX_PIXELS", 48 * 48)
    assert head_calls(lambda: m(in0, in1)) == 0
    train = streaming_model("alex", monkeypatch, eval_mode=False)
    train.backbone_impl = "fused-head"
    train.train()
    assert head_calls(lambda: train(in0, in1)) == 0


def test_backbone_alone_runs_as_fused(monkeypatch):
    """Backbone.forward with "fused-head" yields the "fused" taps (no head to take)."""
    net = backbones.Backbone("alex")
    x = pair()[0]
    with torch.no_grad():
        net.impl = "fused-head"
        got = net(x)
        net.impl = "fused"
        want = net(x)
    assert all(torch.equal(a, e) for a, e in zip(got, want))


def test_compile_fullgraph(monkeypatch):
    """torch.compile(fullgraph=True) traces the fused-head streaming forward (the op's fake
    kernel); the bound is tests/test_compile.py's (inductor reorders the scaling layer's and
    the surrounding ops' arithmetic: ~1e-6 relative)."""
    m = streaming_model("alex", monkeypatch)
    m.backbone_impl = "fused-head"
    in0, in1 = pair()
    with torch.no_grad():
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(m, fullgraph=True)(in0, in1), m(in0, in1),
                                   rtol=1e-5, atol=1e-7)
