"""The fused backbone layer (conv + bias + ReLU ops, lpips_fast._conv_ops) and the backbone
switch (LPIPS_FAST_BACKBONE / model.backbone_impl).

Op tests run on "cpu", "emu" (the CUDA kernels executed on the CPU by csrc/emu) and "cuda",
with outputs NaN-filled before the kernels run (an unwritten element fails every check).

Exactness, and the tolerances where there is none (why):
- Against its definition (bias-free conv2d, then `+ bias`, then relu; threshold_backward
  then convolution_backward) the ops are bit-identical in every dtype: the same ATen calls,
  and an epilogue that rounds y + b once from the op-math type, as torch's add does.
- Against eager conv2d(x, w, b).relu(): often bit-identical, not always. oneDNN (and
  cuDNN) may pick another algorithm for the biased convolution than for the bias-free one
  (measured: float32 1x1, float64 3x3 and 11x11 cases below differ in the last bit), so the
  K = Cin*k*k products and the bias are summed in another order. Both sums are within
  (K + 1) u_acc S of the exact one (S = conv(|x|, |w|) + |b|, u_acc = 2^-24, 2^-53 for
  float64), hence |op - eager| <= 2 (K + 1) u_acc S. In float16/bfloat16 on the CPU eager
  also rounds conv + bias once where the op rounds the conv, then y + b: add
  u|y| + 2u|y + b| <= 3u (|y| + |b|), u = 2^-8 (bf16), 2^-11 (fp16). ReLU adds nothing
  (1-Lipschitz). On CUDA eager adds the bias in a separate pass, as the op does.
- Gradients against eager's: the same bound's reasoning in the convolution's backward; the
  tests compare bit-exactly with the definition and within 1e-5 of the scale with eager
  (float32 sums over <= a few thousand terms: ~sqrt(K) u typical, K u worst).
- Whole model, fused against eager backbone in float32: 1e-5 relative (the reordering above
  per layer, through 5 to 13 layers and the head; tests/test_compile.py's bound).
- Whole model under bf16 autocast: the flash-attention rule of tests/test_kernels.py: the
  fused model's error against float32 is at most 2x eager's own (plus 1e-6 of the scale).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import lpips_fast
from lpips_fast import _conv_ops, _ops, _torch_hooks
from lpips_fast.backbones import BACKBONE_ENV
from helpers import (DEVICES, assert_second_order_equal, conv_ns, conv_ops, fused_op_calls,
                     make_conv as make, randomize_lins, same_layout)

pytestmark = pytest.mark.skipif(not _ops.available(), reason=f"extension not built: {_ops.load_error}")
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


@pytest.fixture(autouse=True)
def nan_fill(monkeypatch):
    monkeypatch.setenv("LPIPS_FAST_DEBUG_NAN_FILL", "1")
    monkeypatch.delenv(BACKBONE_ENV, raising=False)


# (N, Cin, H, W, Cout, kernel, stride, padding): odd sizes, alex's first layer (11x11 stride
# 4), 1x1 (squeeze), one output channel, a spatially 1x1 output, an empty batch.
CASES = [
    (2, 5, 9, 11, 7, 3, (2, 1), (1, 0)),
    (1, 3, 31, 29, 16, 11, (4, 4), (2, 2)),
    (3, 16, 6, 5, 8, 1, (1, 1), (0, 0)),
    (2, 4, 7, 7, 1, 3, (1, 1), (1, 1)),
    (2, 6, 3, 3, 9, 3, (1, 1), (0, 0)),
    (0, 4, 5, 5, 3, 3, (1, 1), (1, 1)),
]


def definition(x, wt, b, stride, padding):
    y = F.conv2d(x, wt, None, stride, padding)
    return y, (y + b.view(-1, 1, 1)).relu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_equals_definition_and_eager(device, dtype, layout, case):
    x, wt, b, stride, padding = make(case, dtype, device, layout)
    out = conv_ops(device).conv_bias_relu(x, wt, b, stride, padding)
    y, want = definition(x, wt, b, stride, padding)
    assert out.dtype == dtype and out.shape == want.shape and same_layout(out, want)
    assert torch.equal(out, want), (out - want).abs().max()
    assert (out > 0).any() or out.numel() == 0  # the test data reach both sides of the ReLU
    eager = F.conv2d(x, wt, b, stride, padding).relu()
    assert ((out.double() - eager.double()).abs() <= eager_bound(x, wt, b, y, stride, padding)).all()


def eager_bound(x, wt, b, y, stride, padding):
    """Per element, the largest |op - eager| that rounding allows (see the module notes)."""
    k = wt[0].numel() + 1
    u_acc = 2.0 ** -53 if x.dtype == torch.float64 else 2.0 ** -24
    b64 = b.detach().double().abs().view(-1, 1, 1).cpu()
    s = F.conv2d(x.detach().double().abs().cpu(), wt.detach().double().abs().cpu(), None,
                 stride, padding) + b64
    bound = 2 * k * u_acc * s
    if x.dtype in UNIT_ROUNDOFF:
        bound = bound + 3 * UNIT_ROUNDOFF[x.dtype] * (y.detach().double().abs().cpu() + b64)
    return bound.to(y.device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_emu_grid_stride_steps(monkeypatch, dtype):
    """One block of the emulated kernels covers the tensor in several grid-stride steps, and
    an unaligned gradient (a view at an odd offset) takes the scalar loads."""
    monkeypatch.setenv("LPIPS_FAST_EMU_EW_BLOCKS", "1")
    ops = conv_ops("emu")
    x, wt, b, stride, padding = make((2, 5, 30, 30, 7, 3, (1, 1), (1, 1)), dtype, "emu", "nchw")
    out = ops.conv_bias_relu(x, wt, b, stride, padding)
    assert out.numel() > 3 * 256 * 16 // out.element_size()  # 256 threads, 16 bytes each
    assert torch.equal(out, definition(x, wt, b, stride, padding)[1])
    buf = torch.randn(out.numel() + 1, dtype=dtype)
    grad = buf[1:].view(out.shape)
    gx, _, _ = ops.conv_bias_relu_backward(grad, out, x, wt, stride, padding, [True, False, False])
    want = torch.ops.aten.convolution_backward(
        torch.ops.aten.threshold_backward(grad, out, 0), x, wt, None, stride, padding, [1, 1],
        False, [0, 0], 1, [True, False, False])[0]
    assert torch.equal(gx, want)


MASKS = [(True, False, False), (False, True, False), (False, False, True), (True, True, True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("mask", MASKS, ids=str)
def test_backward_op_equals_definition(device, dtype, layout, mask):
    x, wt, b, stride, padding = make(CASES[0], dtype, device, layout)
    ops = conv_ops(device)
    out = ops.conv_bias_relu(x, wt, b, stride, padding)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out)
    got = ops.conv_bias_relu_backward(grad, out, x, wt, stride, padding, list(mask))
    g = torch.ops.aten.threshold_backward(grad, out, 0)
    want = torch.ops.aten.convolution_backward(g, x, wt, [wt.shape[0]] if mask[2] else None,
                                               stride, padding, [1, 1], False, [0, 0], 1,
                                               list(mask))
    for a, e, m in zip(got, want, mask):
        if not m:
            assert a.numel() == 0
        else:
            assert same_layout(a, e) and torch.equal(a, e), (a - e).abs().max()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wants", [(True, False, False), (True, True, True), (False, True, True)],
                         ids=str)
def test_autograd_equals_eager(device, wants):
    """Every gradient asked for is returned (none dropped): x and weight bit-identical to
    autograd through the definition, all within 1e-5 of the scale of eager's."""
    x, wt, b, stride, padding = make(CASES[1], torch.float32, device, "channels_last")
    for t, want in zip((x, wt, b), wants):
        t.requires_grad_(want)
    ns = conv_ns(device)
    out = _conv_ops.conv_bias_relu(x, wt, b, stride, padding, ns=ns)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out)
    inputs = [t for t in (x, wt, b) if t.requires_grad]
    got = torch.autograd.grad(out, inputs, grad)
    defined = torch.autograd.grad(definition(x, wt, b, stride, padding)[1], inputs, grad)
    eager = torch.autograd.grad(F.conv2d(x, wt, b, stride, padding).relu(), inputs, grad)
    for a, d, e, t in zip(got, defined, eager, inputs):
        assert a is not None and a.shape == t.shape
        if t is not b:
            assert torch.equal(a, d), (a - d).abs().max()
        assert (a - e).abs().max() <= 1e-5 * e.abs().max()


@pytest.mark.parametrize("device", ["cpu", "emu"])
def test_gradcheck_and_second_order(device):
    x, wt, b, stride, padding = make(CASES[0], torch.float64, device, "nchw", requires_grad=True)
    ns = conv_ns(device)

    def fn(x, wt, b):
        return _conv_ops.conv_bias_relu(x, wt, b, stride, padding, ns=ns)

    # no output within the finite-difference step of the ReLU's kink (else the check is moot)
    assert fn(x, wt, b).detach().abs().add((fn(x, wt, b) == 0).double()).min() > 1e-4
    assert torch.autograd.gradcheck(fn, (x, wt, b))
    assert torch.autograd.gradgradcheck(fn, (x, wt, b))
    assert_second_order_equal(lambda *a: fn(*a).square().sum(),
                              lambda *a: F.conv2d(*a, stride, padding).relu().square().sum(),
                              x, wt, b)


# -------------------------------------------- the ops' autograd (C++, csrc/conv_autograd.cpp)
AUTOGRAD_OPS = ["conv_bias_relu", "conv_bias_relu_pool"]


def fused_outputs(op, ns, x, wt, b, stride, padding):
    """The op's outputs as a tuple; conv_bias_relu_pool with a 2x2 stride-2 pool."""
    if op == "conv_bias_relu":
        return (getattr(torch.ops, ns).conv_bias_relu(x, wt, b, stride, padding),)
    return getattr(torch.ops, ns).conv_bias_relu_pool(x, wt, b, stride, padding, [2, 2], [2, 2],
                                                      False)


def python_frames(fn):
    """The source files of the Python functions that fn() calls (sys.setprofile)."""
    files = []

    def profile(frame, event, arg):
        if event == "call":
            files.append(frame.f_code.co_filename)
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return files


@pytest.mark.parametrize("device", ["cpu", "emu"])
@pytest.mark.parametrize("op", AUTOGRAD_OPS)
def test_autograd_runs_in_cpp(device, op):
    """The graph node is the C++ autograd function, and neither the op's forward nor its
    backward calls into torch's Python custom-op autograd, autograd.Function, or
    lpips_fast's Python code (a Python-registered autograd would call all three)."""
    x, wt, b, stride, padding = make(CASES[0], torch.float32, device, "nchw", requires_grad=True)
    ns = conv_ns(device)
    outs = []
    files = python_frames(lambda: outs.extend(fused_outputs(op, ns, x, wt, b, stride, padding)))
    assert "ConvBiasRelu" in outs[0].grad_fn.name()
    assert not isinstance(outs[0].grad_fn, torch.autograd.function.BackwardCFunction)
    grads = [torch.randn_like(o) for o in outs]
    files += python_frames(lambda: torch.autograd.grad(outs, (x, wt, b), grads))
    python_autograd = (os.path.dirname(lpips_fast.__file__) + os.sep,
                       os.path.join(os.path.dirname(torch.__file__), "_library") + os.sep,
                       torch.autograd.function.__file__)
    assert files and not [f for f in files if f.startswith(python_autograd)]


class BackwardMasks(TorchDispatchMode):
    """The output_mask of every backward op call: the fused ops' own backward ops (a
    backward without a graph) and aten::convolution_backward (one that records a graph)."""

    def __init__(self):
        super().__init__()
        self.masks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name.endswith(("conv_bias_relu_backward", "conv_bias_relu_pool_backward",
                          "aten::convolution_backward")):
            self.masks.append(list(args[-1]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", ["cpu", "emu"])
@pytest.mark.parametrize("op", AUTOGRAD_OPS)
@pytest.mark.parametrize("create_graph", [False, True])
def test_backward_computes_only_needed_gradients(device, op, create_graph):
    """The backward asks convolution_backward for the gradients this backward call needs,
    no more: none for a frozen weight and bias, and none for ones that require grad but are
    not among torch.autograd.grad's inputs (a frozen backbone's training step: input only)."""
    x, wt, b, stride, padding = make(CASES[0], torch.float32, device, "nchw")
    ns = conv_ns(device)
    for requires, wanted in [((True, False, False), (x,)), ((True, True, True), (x,)),
                             ((True, True, True), (wt,)), ((False, True, True), (b,)),
                             ((True, True, True), (x, wt, b))]:
        for t, r in zip((x, wt, b), requires):
            t.requires_grad_(r)
        outs = fused_outputs(op, ns, x, wt, b, stride, padding)
        grads = [torch.randn_like(o) for o in outs]
        with BackwardMasks() as seen:
            got = torch.autograd.grad(outs, wanted, grads, create_graph=create_graph)
        assert seen.masks == [[any(t is w for w in wanted) for t in (x, wt, b)]], (requires,
                                                                                   seen.masks)
        assert all(g is not None and g.shape == w.shape for g, w in zip(got, wanted))


@pytest.mark.parametrize("ns", ["lpips_fast", "lpips_fast_emu"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck(ns, layout):
    x, wt, b, stride, padding = make(CASES[0], torch.float32, "cpu", layout, requires_grad=True)
    op = conv_ops("emu" if ns.endswith("emu") else "cpu")  # (builds the emulation if need be)
    torch.library.opcheck(op.conv_bias_relu, (x, wt, b, stride, padding))
    out = op.conv_bias_relu(x, wt, b, stride, padding).detach()
    for mask in ([True, False, False], [True, True, True]):
        torch.library.opcheck(op.conv_bias_relu_backward,
                              (torch.randn_like(out), out, x.detach(), wt.detach(), stride,
                               padding, mask))


def test_bad_inputs_raise_one_line():
    x, wt, b, stride, padding = make(CASES[0], torch.float32, "cpu", "nchw")
    op = torch.ops.lpips_fast.conv_bias_relu
    with pytest.raises(RuntimeError, match="bias must hold 7 Float"):
        op(x, wt, b[:3], stride, padding)
    with pytest.raises(RuntimeError, match="x is Double but weight is Float"):
        op(x.double(), wt, b, stride, padding)
    with pytest.raises(RuntimeError, match="has 4 channels but weight expects 5"):
        op(x[:, :4], wt, b, stride, padding)


# ------------------------------------------------------------------ the model with the switch
def models(net, channels_last, seed=0):
    """The same random model twice: eager backbone, fused backbone."""
    out = []
    for impl in ("eager", "fused"):
        torch.manual_seed(seed)
        m = randomize_lins(lpips_fast.LPIPS(net=net, pnet_rand=True, verbose=False,
                                            channels_last=channels_last))
        m.backbone_impl = impl
        out.append(m)
    return out


def images(seed=0, size=64, n=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, 3, size, size, generator=g) * 2 - 1 for _ in range(2)]


def value_and_grad(model, x0, x1):
    x0 = x0.clone().requires_grad_(True)
    v = model(x0, x1)
    (g,) = torch.autograd.grad(v.sum(), x0)
    return v.detach(), g


@pytest.mark.parametrize("net", ["alex", "vgg", "squeeze"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_model_fused_equals_eager(net, channels_last):
    eager, fused = models(net, channels_last)
    x0, x1 = images(size=64 if net != "vgg" else 48)
    calls = count_fused_calls(fused, x0, x1)
    assert calls == {"alex": 5, "vgg": 13, "squeeze": 25}[net]  # every conv + ReLU pair
    v_e, g_e = value_and_grad(eager, x0, x1)
    v_f, g_f = value_and_grad(fused, x0, x1)
    assert_model_close(v_f, g_f, v_e, g_e)
    assert eager.state_dict().keys() == fused.state_dict().keys()


def assert_model_close(v, g, v_want, g_want):
    torch.testing.assert_close(v, v_want, rtol=1e-5, atol=1e-7)
    err, scale = (g - g_want).abs().max(), g_want.abs().max()
    assert scale > 0 and err <= 1e-5 * scale, (err, scale)


@pytest.mark.parametrize("net", ["alex", "vgg", "squeeze"])
def test_model_fused_under_cpu_autocast_bf16(net):
    eager, fused = models(net, True)
    x0, x1 = images(seed=1, size=64 if net != "vgg" else 48)
    v32, g32 = value_and_grad(eager, x0, x1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v_e, g_e = value_and_grad(eager, x0, x1)
        v_f, g_f = value_and_grad(fused, x0, x1)
    for got, base, ref in ((v_f, v_e, v32), (g_f, g_e, g32)):
        err_eager = (base.double() - ref.double()).abs().max()
        err_fused = (got.double() - ref.double()).abs().max()
        assert err_eager > 0  # autocast did act (else this compares float32 twice)
        assert err_fused <= 2 * err_eager + 1e-6 * ref.abs().max(), (err_fused, err_eager)


def test_model_trainable_backbone_gets_all_gradients():
    """pnet_tune=True: the weight and bias gradients through the fused op equal eager's."""
    eager, fused = models("alex", True)
    for m in (eager, fused):
        m.net.requires_grad_(True)
    x0, x1 = images(seed=2)
    grads = []
    for m in (eager, fused):
        m(x0, x1).sum().backward()
        grads.append([p.grad for p in m.net.parameters()])
    assert all(g is not None for g in grads[1])
    for a, e in zip(*grads):
        assert a is not None and (a - e).abs().max() <= 1e-5 * e.abs().max()


def count_fused_calls(model, *args, fn=None):
    """How many conv + ReLU pairs the backbone ran through the fused ops while running fn
    (default: model): conv_bias_relu, and conv_bias_relu_pool (a pair with its max-pool)."""
    return sum(fused_op_calls(lambda: (fn or model)(*args)).values())


def test_switch_env_attribute_and_errors(monkeypatch):
    eager, model = models("alex", True)
    x0, x1 = images(size=64, n=1)
    model.backbone_impl = None  # follows the environment, read at every call
    assert count_fused_calls(model, x0, x1) == 0  # unset: eager
    monkeypatch.setenv(BACKBONE_ENV, "fused")
    assert count_fused_calls(model, x0, x1) == 5
    model.backbone_impl = "eager"  # the attribute wins over the environment
    assert count_fused_calls(model, x0, x1) == 0
    with pytest.raises(ValueError, match="backbone impl must be None or one of"):
        model.backbone_impl = "cudnn"
    model.backbone_impl = None
    monkeypatch.setenv(BACKBONE_ENV, "turbo")
    with pytest.raises(ValueError, match="LPIPS_FAST_BACKBONE must be one of"):
        model(x0, x1)


def test_fallbacks_to_eager(monkeypatch):
    """vmap, torch.func.grad, jit.trace, forward-mode AD and hooked modules run the eager
    modules (same values), never the fused op."""
    eager, model = models("alex", True)
    x0, x1 = images(size=64, n=2)
    want = eager(x0, x1)
    vmapped = lambda a, b: torch.func.vmap(lambda p, q: model(p[None], q[None])[0])(a, b)  # noqa: E731
    assert count_fused_calls(model, x0, x1, fn=vmapped) == 0
    grad_fn = lambda a, b: torch.func.grad(lambda p: model(p, b).sum())(a)  # noqa: E731
    assert count_fused_calls(model, x0, x1, fn=grad_fn) == 0
    assert count_fused_calls(model, x0, x1, fn=lambda a, b: torch.jit.trace(model, (a, b), check_trace=False)) == 0
    with torch.no_grad():
        torch.testing.assert_close(vmapped(x0, x1), want, rtol=1e-5, atol=1e-7)

    def forward_ad(a, b):
        import torch.autograd.forward_ad as fwAD
        with fwAD.dual_level():
            return model(fwAD.make_dual(a, torch.ones_like(a)), b)
    model.impl = "reference"  # (the fused head has no forward-mode derivative either)
    assert count_fused_calls(model, x0, x1, fn=forward_ad) == 0
    model.impl = "auto"
    handle = model.net.slice1[0].register_forward_hook(lambda *a: None)
    assert count_fused_calls(model, x0, x1) == 4  # the hooked pair runs its modules
    handle.remove()


@pytest.mark.parametrize("net", ["alex", "squeeze"])
def test_compile_fullgraph_fused(net):
    """torch.compile(fullgraph=True) traces the fused backbone (fake kernels, autograd):
    the op is in the graph, values and input gradients equal eager's. On torch 2.6 (no
    torch.compiler.is_exporting) every dynamo trace counts as an export, so the graph holds
    the eager modules instead (lpips_fast._torch_hooks.is_exporting)."""
    torch._dynamo.reset()
    eager, model = models(net, True)
    x0, x1 = images(seed=3)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        from torch._dynamo.backends.common import aot_autograd
        return aot_autograd(fw_compiler=lambda g, _: g, bw_compiler=lambda g, _: g)(gm, example_inputs)

    compiled = torch.compile(model, fullgraph=True, backend=backend)
    v_c, g_c = value_and_grad(compiled, x0, x1)
    v_e, g_e = value_and_grad(eager, x0, x1)
    fused = _torch_hooks._HAS_IS_EXPORTING
    assert any("conv_bias_relu" in g for g in graphs) == fused
    assert any("conv_bias_relu_pool" in g for g in graphs) == fused  # (both nets: a fused pool)
    assert_model_close(v_c, g_c, v_e, g_e)
