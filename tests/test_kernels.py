"""The fused head kernels (torch.ops.lpips_fast) against the pure-PyTorch reference.

Every comparison is against lpips_fast.reference evaluated in float64 on the same inputs.
CUDA variants carry the `cuda` marker and skip without a GPU.

Tolerances (why):
- float64 kernels: 1e-10 relative; float64 eps is 2.2e-16, sums over <= 1024 channels and
  <= a few hundred pixels stay many orders below that.
- float32 values: 1e-5 relative, the bound the issue sets (eps 1.2e-7; a two-pass sum over C
  channels has a worst-case relative error ~ C * eps but typically ~ sqrt(C) * eps ~ 4e-6 for
  C = 1024, and the pixel mean adds ~ log2(P) * eps).
- float32 maps / gradients: elementwise rtol 1e-4 with atol 1e-5 of the largest magnitude:
  each element is a sum over C products, and the gradient subtracts two such terms.
- float16 / bfloat16: the flash-attention rule, at most 2x the error that plain PyTorch makes
  when it computes the same head in that dtype (plus a floor of 1e-6 of the magnitude).
"""
from __future__ import annotations


import pytest
import torch

from lpips_fast import _ops
from lpips_fast import reference as R
from helpers import DEVICES, HAS_CUDA, feats, make_weight, ops, tdev

needs_ext = pytest.mark.skipif(not _ops.available(), reason=f"extension not built: {_ops.load_error}")
pytestmark = needs_ext


@pytest.fixture(autouse=True)
def nan_fill(monkeypatch):
    """Outputs are pre-filled with NaN in C++ (see csrc/common.h): a kernel that forgets an
    element leaves a NaN, which every comparison below catches."""
    monkeypatch.setenv("LPIPS_FAST_DEBUG_NAN_FILL", "1")
    yield


def test_extension_loaded():
    # Fails (rather than skips) when the extension is missing, so CI notices.
    assert _ops.available(), _ops.load_error


# ------------------------------------------------------------------------------- helpers
def make_pair(shape, dtype, device, layout, seed=0):
    """(f0, f1, user-facing shapes); layout 'expand0'/'expand1' gives that input batch 1."""
    one = (1,) + tuple(shape[1:])
    base = "channels_last" if layout.endswith("_cl") else "nchw"
    if layout.startswith("expand0"):
        return feats(one, dtype, device, base, seed), feats(shape, dtype, device, base, seed + 1)
    if layout.startswith("expand1"):
        return feats(shape, dtype, device, base, seed), feats(one, dtype, device, base, seed + 1)
    return feats(shape, dtype, device, layout, seed), feats(shape, dtype, device, layout, seed + 1)


def ref64(f0, f1, w, return_map=True):
    """Float64 reference on the same (possibly low-precision) input values."""
    return R.head(f0.double().cpu(), f1.double().cpu(), None if w is None else w.double().cpu(),
                  return_map=return_map)


def assert_close_rel(actual, expected, rtol, atol_frac, what=""):
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol_frac * scale + 1e-300,
                               msg=lambda m: f"{what}: {m}")


SHAPES = [
    (2, 37, 5, 7),     # C not a multiple of 32, odd h, w
    (3, 64, 1, 1),     # h*w = 1
    (1, 1024, 3, 3),   # large C (beyond the CUDA register cache), N = 1
    (1, 5, 9, 11),     # N = 1, small odd C
    (2, 48, 13, 17),   # several pixel blocks (P = 221 > 64 on CPU, > 32 on CUDA)
    (2, 1, 4, 4),      # C = 1
]
LAYOUTS = ["nchw", "channels_last", "expand0", "expand1", "expand0_cl", "transposed"]


# ------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("weighted", [True, False], ids=["lin", "sum"])
def test_forward_matches_reference(device, dtype, layout, shape, weighted):
    f0, f1 = make_pair(shape, dtype, device, layout)
    w = make_weight(shape[1], device, dtype) if weighted else None
    value, dmap = ops(device).head(f0, f1, w, return_map=True)
    v_ref, d_ref = ref64(f0, f1, w)
    assert value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert value.shape == (shape[0],) and dmap.shape == (shape[0], 1) + tuple(shape[2:])
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    assert_close_rel(value, v_ref, rtol, 0.0, "value")
    assert_close_rel(dmap, d_ref, rtol * 10, rtol, "map")
    v2, none = ops(device).head(f0, f1, w, return_map=False)
    assert none is None
    assert torch.equal(v2, value)  # the map does not change the value, bit for bit


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_near_identical_inputs(device, layout):
    """f1 = f0 + 1e-3 noise: float32 within 1e-5 relative of float64 (no cancellation)."""
    shape = (4, 256, 9, 9)
    f0 = feats(shape, torch.float64, "cpu", seed=3) + 0.5
    g = torch.Generator().manual_seed(4)
    f1 = f0 + 1e-3 * torch.randn(shape, generator=g, dtype=torch.float64)
    w = make_weight(shape[1], "cpu", torch.float64)
    f0_32, f1_32 = f0.float(), f1.float()
    v_ref, _ = ref64(f0_32, f1_32, w.float())
    if layout == "channels_last":
        f0_32 = f0_32.contiguous(memory_format=torch.channels_last)
        f1_32 = f1_32.contiguous(memory_format=torch.channels_last)
    value, _ = ops(device).head(f0_32.to(tdev(device)), f1_32.to(tdev(device)), w.float().to(tdev(device)))
    rel = ((value.double().cpu() - v_ref).abs() / v_ref.abs()).max().item()
    assert rel < 1e-5, rel

    # The test is discriminative: the one-pass expansion in float32 fails it.
    def one_pass(a, b, wt):
        a0 = 1 / (a.pow(2).sum(1).sqrt() + 1e-10)
        a1 = 1 / (b.pow(2).sum(1).sqrt() + 1e-10)
        wt = wt.reshape(1, -1, 1, 1)
        s00, s01, s11 = (wt * a * a).sum(1), (wt * a * b).sum(1), (wt * b * b).sum(1)
        return (a0 * a0 * s00 - 2 * a0 * a1 * s01 + a1 * a1 * s11).mean((1, 2))
    naive = one_pass(f0.float(), f1.float(), w.float())
    assert ((naive.double() - v_ref).abs() / v_ref.abs()).max().item() > 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "expand0"])
def test_low_precision(device, dtype, layout):
    """fp16/bf16 features, float32 accumulation: at most 2x plain PyTorch's error in `dtype`."""
    shape = (3, 96, 11, 10)
    f0, f1 = make_pair(shape, dtype, device, layout, seed=11)
    w = make_weight(shape[1], device, torch.float32)
    f0 = f0.detach().requires_grad_()
    f1 = f1.detach().requires_grad_()
    value, dmap = ops(device).head(f0, f1, w, return_map=True)
    assert value.dtype == torch.float32 and dmap.dtype == torch.float32
    # float64 reference on the same rounded inputs, with gradients
    r0 = f0.detach().double().cpu().requires_grad_()
    r1 = f1.detach().double().cpu().requires_grad_()
    v_ref, d_ref = R.head(r0, r1, w.double().cpu(), return_map=True)
    # plain PyTorch in the low dtype (no promotion)
    p0 = f0.detach().clone().requires_grad_()
    p1 = f1.detach().clone().requires_grad_()
    d_pt = R.distance_map(p0, p1, w.to(dtype))
    v_pt = d_pt.mean(dim=(1, 2, 3))

    def check(ours, pt, ref, what):
        ref = ref.detach().double().cpu()
        err = (ours.detach().double().cpu() - ref).abs().max().item()
        err_pt = (pt.detach().double().cpu() - ref).abs().max().item()
        floor = 1e-6 * ref.abs().max().item()
        assert err <= 2 * err_pt + floor, (what, err, err_pt)

    check(value, v_pt, v_ref, "value")
    check(dmap, d_pt, d_ref, "map")
    gv = torch.randn(shape[0], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    g0, g1 = torch.autograd.grad((value * gv.to(tdev(device)).float()).sum(), [f0, f1])
    q0, q1 = torch.autograd.grad((v_ref * gv).sum(), [r0, r1])
    t0, t1 = torch.autograd.grad((v_pt * gv.to(tdev(device)).to(dtype)).sum(), [p0, p1])
    assert g0.dtype == dtype and g1.dtype == dtype
    check(g0, t0, q0, "grad f0")
    check(g1, t1, q1, "grad f1")


# ------------------------------------------------------------------------------- backward
BWD_SHAPES = [(2, 37, 5, 7), (1, 1024, 2, 3), (3, 64, 1, 1), (2, 48, 13, 17)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", BWD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("weighted", [True, False], ids=["lin", "sum"])
def test_backward_matches_reference(device, dtype, layout, shape, weighted):
    f0, f1 = make_pair(shape, dtype, device, layout, seed=21)
    f0 = f0.detach().requires_grad_()
    f1 = f1.detach().requires_grad_()
    w = make_weight(shape[1], device, dtype).requires_grad_() if weighted else None
    g = torch.Generator().manual_seed(9)
    gv = torch.randn(shape[0], generator=g, dtype=torch.float64)
    gm = torch.randn((shape[0], 1) + tuple(shape[2:]), generator=g, dtype=torch.float64)
    value, dmap = ops(device).head(f0, f1, w, return_map=True)
    loss = (value * gv.to(tdev(device), value.dtype)).sum() + (dmap * gm.to(tdev(device), dmap.dtype)).sum()
    inputs = [f0, f1] + ([w] if weighted else [])
    grads = torch.autograd.grad(loss, inputs)
    r_in = [x.detach().double().cpu().requires_grad_() for x in inputs]
    v_ref, d_ref = R.head(r_in[0], r_in[1], r_in[2] if weighted else None, return_map=True)
    r_grads = torch.autograd.grad((v_ref * gv).sum() + (d_ref * gm).sum(), r_in)
    rtol, atol = (1e-9, 1e-10) if dtype == torch.float64 else (1e-4, 1e-5)
    for name, a, b, x in zip(["f0", "f1", "w"], grads, r_grads, inputs):
        assert a.shape == x.shape and a.dtype == x.dtype, name
        assert_close_rel(a, b, rtol, atol, f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_zero_vector_gradient_is_finite(device, layout):
    """An all-zero feature vector (after ReLU): gradient a0 * G_c, finite (official: NaN)."""
    shape = (2, 33, 4, 5)
    f0, f1 = make_pair(shape, torch.float64, "cpu", "nchw", seed=31)
    f1 = f1 + 0.1  # no zero vector in f1
    f0[1, :, 2, 3] = 0  # one zero vector in f0
    w = make_weight(shape[1], "cpu", torch.float64)
    x0 = f0.to(tdev(device))
    x1 = f1.to(tdev(device))
    if layout == "channels_last":
        x0 = x0.contiguous(memory_format=torch.channels_last)
        x1 = x1.contiguous(memory_format=torch.channels_last)
    x0.requires_grad_()
    value, _ = ops(device).head(x0, x1, w.to(tdev(device)))
    (g0,) = torch.autograd.grad(value.sum(), [x0])
    g0 = g0.cpu()
    assert torch.isfinite(g0).all()
    # explicit: at r0 = 0, dL/df0_c = a0 G_c with a0 = 1/eps, G_c = u 2 w_c (0 - n1_c), u = 1/P
    P = shape[2] * shape[3]
    n1 = f1[1, :, 2, 3] / (f1[1, :, 2, 3].norm() + R.EPS)
    expected = (1 / R.EPS) * (1.0 / P) * 2 * w.flatten() * (0 - n1)
    torch.testing.assert_close(g0[1, :, 2, 3], expected, rtol=1e-12, atol=0)
    # the official formulation (norm via sqrt of the sum of squares) is NaN there
    y0 = f0.clone().requires_grad_()
    n0 = y0 / (torch.sqrt((y0 ** 2).sum(dim=1, keepdim=True)) + R.EPS)
    nn1 = f1 / (torch.sqrt((f1 ** 2).sum(dim=1, keepdim=True)) + R.EPS)
    (gy,) = torch.autograd.grad(((n0 - nn1) ** 2 * w).sum(1).mean((1, 2)).sum(), [y0])
    assert torch.isnan(gy[1, :, 2, 3]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_zero_vector_gradient_is_finite_in_low_precision(device, dtype, layout):
    """At an all-zero vector the gradient is a0 G_c with a0 = 1e10: past float16's range, so it
    saturates at 65504 with the right sign; bfloat16 holds it (to its 8-bit mantissa)."""
    shape = (2, 33, 4, 5)
    f0, f1 = make_pair(shape, torch.float64, "cpu", "nchw", seed=32)
    f1 = f1 + 0.1
    f0[1, :, 2, 3] = 0
    x0, x1 = f0.to(tdev(device), dtype), f1.to(tdev(device), dtype)
    if layout == "channels_last":
        x0 = x0.contiguous(memory_format=torch.channels_last)
        x1 = x1.contiguous(memory_format=torch.channels_last)
    x0.requires_grad_()
    w = make_weight(shape[1], device)
    value, _ = ops(device).head(x0, x1, w)
    (g0,) = torch.autograd.grad(value.sum(), [x0])
    assert g0.dtype == dtype and torch.isfinite(g0).all()
    # expected at the zero vector, in float64 from the same rounded inputs
    v1 = x1[1, :, 2, 3].double().cpu()
    expected = (1 / R.EPS) * (1.0 / 20) * 2 * w.flatten().double().cpu() * (0 - v1 / v1.norm())
    got = g0[1, :, 2, 3].double().cpu()
    if dtype == torch.float16:
        torch.testing.assert_close(got, expected.clamp(-65504, 65504), rtol=1e-3, atol=0)
    else:
        torch.testing.assert_close(got, expected, rtol=1e-2, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_empty_batch(device, layout):
    """N = 0: empty values and feature gradients, and a weight gradient of zeros (a sum over
    no pixels), never uninitialised memory."""
    f0, f1 = make_pair((0, 7, 3, 4), torch.float32, device, layout)
    f0 = f0.detach().requires_grad_()
    w = make_weight(7, device).requires_grad_()
    for _ in range(3):  # fresh allocations may reuse memory that held other numbers
        torch.rand(1000, device=tdev(device))
        value, dmap = ops(device).head(f0, f1, w, return_map=True)
        g0, gw = torch.autograd.grad(value.sum() + dmap.sum(), [f0, w], allow_unused=True)
        assert value.shape == (0,) and dmap.shape == (0, 1, 3, 4) and g0.shape == f0.shape
        assert torch.equal(gw, torch.zeros_like(w)), gw


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_backward_device_mismatch_is_a_clear_error():
    f0, f1, w = _opcheck_args("cuda")
    _, _, r0, r1 = torch.ops.lpips_fast.head_forward(f0, f1, w, False)
    gv = torch.ones(f0.shape[0])  # on the CPU, the features on the GPU
    with pytest.raises(RuntimeError, match="grad of the values is on cpu"):
        torch.ops.lpips_fast.head_backward(gv, None, f0, f1, w, r0, r1, [True, True, True])
    with pytest.raises(RuntimeError, match="saved norms on cpu"):
        torch.ops.lpips_fast.head_backward(gv.cuda(), None, f0, f1, w, r0.cpu(), r1,
                                           [True, True, True])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "expand0"])
@pytest.mark.parametrize("weighted", [True, False], ids=["lin", "sum"])
def test_gradcheck_float64(device, layout, weighted):
    shape = (2, 5, 3, 2)
    f0, f1 = make_pair(shape, torch.float64, device, layout, seed=41)
    f0 = (f0 + 0.05).detach().requires_grad_()  # keep away from the norm's kink at 0
    f1 = (f1 + 0.05).detach().requires_grad_()
    args = [f0, f1]
    if weighted:
        args.append(make_weight(shape[1], device, torch.float64).requires_grad_())

    def fn(*a):
        v, d = ops(device).head(a[0], a[1], a[2] if weighted else None, return_map=True)
        return v, d

    assert torch.autograd.gradcheck(fn, tuple(args), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("weighted", [True, False], ids=["lin", "sum"])
def test_gradgradcheck_float64(device, layout, weighted):
    """Second derivatives (create_graph=True: gradient penalties) through the fused ops, one
    layer and all layers, values and maps: the backward then records the reference math."""
    shape = (2, 5, 3, 2)
    f0, f1 = make_pair(shape, torch.float64, device, layout, seed=43)
    f0 = (f0 + 0.05).detach().requires_grad_()
    f1 = (f1 + 0.05).detach().requires_grad_()
    w = make_weight(shape[1], device, torch.float64).requires_grad_() if weighted else None
    args = (f0, f1) + ((w,) if weighted else ())

    def single(a, b, *wt):
        return ops(device).head(a, b, wt[0] if wt else None, return_map=True)

    def multi(a, b, *wt):
        values, maps = ops(device).head_all([a, 2 * a], [b, b], [wt[0] if wt else None, None],
                                            return_map=True)
        return values, maps[0], maps[1]

    for fn in (single, multi):
        assert torch.autograd.gradgradcheck(fn, args, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_head_all_float64(device):
    shapes = [(2, 4, 3, 2), (2, 6, 2, 2)]
    f0s = [(feats(s, torch.float64, device, seed=i) + 0.05).requires_grad_() for i, s in enumerate(shapes)]
    f1s = [(feats(s, torch.float64, device, seed=10 + i) + 0.05).requires_grad_() for i, s in enumerate(shapes)]
    w0 = make_weight(4, device, torch.float64).requires_grad_()

    def fn(a0, a1, b0, b1, wt):
        values, maps = ops(device).head_all([a0, a1], [b0, b1], [wt, None], return_map=True)
        return values, maps[0], maps[1]

    assert torch.autograd.gradcheck(fn, (f0s[0], f0s[1], f1s[0], f1s[1], w0), eps=1e-6,
                                    atol=1e-7, rtol=1e-6)


# ------------------------------------------------------------------------------- head_all
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weighted", [True, False], ids=["lin", "sum"])
def test_head_all_matches_reference(device, weighted):
    # 9 layers: more than one CUDA launch group (8 per launch), mixed layouts and sizes
    specs = [(64, 15, 15, "nchw"), (192, 7, 7, "channels_last"), (384, 3, 3, "nchw"),
             (256, 3, 3, "nchw"), (37, 5, 6, "channels_last"), (1, 2, 2, "nchw"),
             (600, 2, 1, "nchw"), (8, 1, 1, "nchw"), (100, 4, 3, "expand0")]
    n = 3
    f0s, f1s, ws = [], [], []
    for i, (c, h, wd, lay) in enumerate(specs):
        a, b = make_pair((n, c, h, wd), torch.float32, device, lay, seed=50 + i)
        f0s.append(a.detach().requires_grad_())
        f1s.append(b.detach().requires_grad_())
        ws.append(make_weight(c, device).requires_grad_() if (weighted and i != 5) else None)
    values, maps = ops(device).head_all(f0s, f1s, ws, return_map=True)
    assert values.shape == (len(specs), n) and len(maps) == len(specs)
    g = torch.Generator().manual_seed(3)
    gv = torch.randn(values.shape, generator=g, dtype=torch.float64)
    gms = [torch.randn(m.shape, generator=g, dtype=torch.float64) for m in maps]
    loss = (values * gv.to(tdev(device)).float()).sum() + sum(
        (m * gm.to(tdev(device)).float()).sum() for m, gm in zip(maps, gms))
    wl = [w for w in ws if w is not None]
    grads = torch.autograd.grad(loss, f0s + f1s + wl)
    r0s = [x.detach().double().cpu().requires_grad_() for x in f0s]
    r1s = [x.detach().double().cpu().requires_grad_() for x in f1s]
    rws = [None if w is None else w.detach().double().cpu().requires_grad_() for w in ws]
    rloss = 0
    for i in range(len(specs)):
        v, d = R.head(r0s[i], r1s[i], rws[i], return_map=True)
        assert_close_rel(values[i], v, 1e-5, 0, f"layer {i} value")
        assert_close_rel(maps[i], d, 1e-4, 1e-5, f"layer {i} map")
        rloss = rloss + (v * gv[i]).sum() + (d * gms[i]).sum()
    rgrads = torch.autograd.grad(rloss, r0s + r1s + [w for w in rws if w is not None])
    for k, (a, b) in enumerate(zip(grads, rgrads)):
        assert_close_rel(a, b, 1e-4, 1e-5, f"grad {k}")
    # the single-layer op agrees
    for i in range(len(specs)):
        v1, _ = ops(device).head(f0s[i], f1s[i], ws[i])
        assert_close_rel(v1, values[i], 1e-6, 0, f"head vs head_all layer {i}")


# ------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_deterministic(device, layout, monkeypatch):
    shape = (2, 96, 40, 33)  # many blocks per sample
    f0, f1 = make_pair(shape, torch.float32, device, layout, seed=61)
    f0 = f0.detach().requires_grad_()
    f1 = f1.detach().requires_grad_()
    w = make_weight(shape[1], device).requires_grad_()

    def run():
        v, d = ops(device).head(f0, f1, w, return_map=True)
        gs = torch.autograd.grad(v.sum() + (d * d).sum(), [f0, f1, w])
        return [v, d, *gs]

    threads = torch.get_num_threads()
    first = run()
    if device == "emu":  # the order in which threads and blocks run must not matter
        for order in ("reverse", "random"):
            monkeypatch.setenv("LPIPS_FAST_EMU_ORDER", order)
            for a, b in zip(first, run()):
                assert torch.equal(a, b), f"not bit-identical with {order} thread order"
        return
    try:
        for nt in ([1, max(2, threads)] if device == "cpu" else [threads, threads]):
            torch.set_num_threads(nt)
            again = run()
            for a, b in zip(first, again):
                assert torch.equal(a, b), f"not bit-identical with {nt} threads"
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------- knobs
@pytest.mark.parametrize("env,value", [
    ("LPIPS_FAST_CUDA_CL_PIXELS", "2"), ("LPIPS_FAST_CUDA_CL_PIXELS", "8"),
    ("LPIPS_FAST_CUDA_WARPS", "1"), ("LPIPS_FAST_CUDA_WARPS", "16"),
    ("LPIPS_FAST_EMU_MAX_BLOCKS", "3"),     # several pixel rounds per block (large images)
    ("LPIPS_FAST_EMU_WGRAD_CHUNK", "16"),   # many weight-gradient chunks (large images)
])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_emulated_kernels_under_every_setting(env, value, layout, monkeypatch):
    """The tuning knobs and the device limits change the work split, never the result."""
    monkeypatch.setenv(env, value)
    shape = (2, 70, 9, 13)  # P = 117: a partial last pixel group and tile
    f0, f1 = make_pair(shape, torch.float32, "emu", layout, seed=81)
    f0, f1 = f0.detach().requires_grad_(), f1.detach().requires_grad_()
    w = make_weight(shape[1], "emu").requires_grad_()
    value_, dmap = ops("emu").head(f0, f1, w, return_map=True)
    grads = torch.autograd.grad(value_.sum() + dmap.sum(), [f0, f1, w])
    r_in = [x.detach().double().requires_grad_() for x in (f0, f1, w)]
    v_ref, d_ref = R.head(*r_in, return_map=True)
    r_grads = torch.autograd.grad(v_ref.sum() + d_ref.sum(), r_in)
    assert_close_rel(value_, v_ref, 1e-5, 0.0, "value")
    assert_close_rel(dmap, d_ref, 1e-4, 1e-5, "map")
    for name, a, b in zip(["f0", "f1", "w"], grads, r_grads):
        assert_close_rel(a, b, 1e-4, 1e-5, f"grad {name}")


# ------------------------------------------------------------------------------- registration
def _opcheck_args(device, weighted=True):
    f0, f1 = make_pair((2, 7, 3, 4), torch.float32, device, "nchw", seed=71)
    w = make_weight(7, device) if weighted else None
    return f0, f1, w


@pytest.mark.parametrize("weighted", [True, False], ids=["lin", "sum"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck_cpu(weighted, layout):
    f0, f1 = make_pair((2, 7, 3, 4), torch.float32, "cpu", layout, seed=71)
    w = make_weight(7, "cpu") if weighted else None
    f0r, f1r = f0.clone().requires_grad_(), f1.clone().requires_grad_()
    wr = None if w is None else w.clone().requires_grad_()
    ops = torch.ops.lpips_fast
    torch.library.opcheck(ops.head_forward.default, (f0r, f1r, wr, True))
    torch.library.opcheck(ops.head_forward.default, (f0, f1, w, False))
    _, _, r0, r1 = ops.head_forward(f0, f1, w, False)
    gv = torch.randn(2)
    gm = torch.randn(2, 1, 3, 4)
    torch.library.opcheck(ops.head_backward.default,
                          (gv, gm, f0, f1, w, r0, r1, [True, True, weighted]))
    torch.library.opcheck(ops.head_backward.default,
                          (gv, None, f0, f1, w, r0, r1, [True, False, False]))
    g0, g1 = make_pair((2, 5, 2, 2), torch.float32, "cpu", layout, seed=72)
    w2 = torch.empty(0)  # an empty weight means "no weights" in the multi-layer ops
    torch.library.opcheck(ops.head_all_forward.default,
                          ([f0r, g0.requires_grad_()], [f1r, g1.requires_grad_()],
                           [torch.empty(0) if wr is None else wr, w2], True))
    wl = [torch.empty(0) if w is None else w, w2]
    _, _, r0s, r1s = ops.head_all_forward([f0, g0.detach()], [f1, g1.detach()], wl, False)
    torch.library.opcheck(ops.head_all_backward.default,
                          (torch.randn(2, 2), [gm, None], [f0, g0.detach()], [f1, g1.detach()],
                           wl, r0s, r1s, [True, True, True]))


def test_compile_fullgraph_cpu():
    f0, f1, w = _opcheck_args("cpu")
    f0 = f0.requires_grad_()

    def fn(a, b, wt):
        v, d = _ops.head(a, b, wt, return_map=True)
        return v.sum() + d.square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(f0, f1, w)
    ref = fn(f0, f1, w)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)
    (g,) = torch.autograd.grad(out, [f0])
    (gr,) = torch.autograd.grad(ref, [f0])
    torch.testing.assert_close(g, gr, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_compile_fullgraph_inductor_cpu():
    f0, f1, w = _opcheck_args("cpu")

    def fn(a, b, wt):
        values, _ = _ops.head_all([a, a * 2], [b, b], [wt, None])
        return values.sum(0)

    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True)(f0, f1, w)
    torch.testing.assert_close(out, fn(f0, f1, w), rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("bad, match", [
    (lambda f0, f1, w: (f0[0], f1, w), "4-D"),
    (lambda f0, f1, w: (f0, f1[:, :3], w), "shape mismatch"),
    (lambda f0, f1, w: (f0, f1.double(), w), "dtype mismatch"),
    (lambda f0, f1, w: (f0, f1, w[:, :3]), "weight has 3 elements"),
    (lambda f0, f1, w: (f0[:1].expand(3, -1, -1, -1), f1, w), "batch mismatch"),
])
def test_clear_errors(bad, match):
    f0, f1, w = _opcheck_args("cpu")
    a, b, c = bad(f0, f1, w)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.lpips_fast.head_forward(a, b, c, False)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_device_mismatch_error():
    f0, f1, w = _opcheck_args("cpu")
    with pytest.raises(RuntimeError, match="on cuda"):
        torch.ops.lpips_fast.head_forward(f0, f1.cuda(), w, False)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_opcheck_cuda():
    f0, f1, w = _opcheck_args("cuda")
    torch.library.opcheck(torch.ops.lpips_fast.head_forward.default,
                          (f0.requires_grad_(), f1, w, True))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cuda_matches_cpu_large(layout):
    """A realistic layer (vgg conv1 at 128x128) on CUDA against the CPU kernel."""
    shape = (2, 64, 128, 128)
    f0, f1 = make_pair(shape, torch.float32, "cpu", layout, seed=81)
    w = make_weight(64, "cpu")
    v_cpu, d_cpu = _ops.head(f0, f1, w, return_map=True)
    v_gpu, d_gpu = _ops.head(f0.cuda(), f1.cuda(), w.cuda(), return_map=True)
    assert_close_rel(v_gpu, v_cpu, 1e-5, 0, "value")
    assert_close_rel(d_gpu, d_cpu, 1e-4, 1e-5, "map")


@pytest.mark.parametrize("device", [d for d in DEVICES if d != "emu"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_a_large_layer_stays_at_float_rounding(layout, device):
    """One layer of 2048 x 2048 pixels (4M pixels, 65,536 blocks of 64): the CPU kernels
    added the block partials in float32 one after another, 5.3e-6 relative off the float64
    value here and 7e-6 at 4096 x 4096, growing with the pixel count, where PyTorch's
    float32 sum of the same terms is off by ~1e-8. The value and the weight gradient (its
    partials are summed the same way) must stay at float32 rounding: 5e-7 relative. Not
    emulated (minutes at this size); the CUDA kernels add their partials in a tree."""
    gen = torch.Generator().manual_seed(11)
    f0, f1 = (torch.rand(1, 4, 2048, 2048, generator=gen).to(device) for _ in range(2))
    if layout == "channels_last":
        f0, f1 = (f.contiguous(memory_format=torch.channels_last) for f in (f0, f1))
    w = make_weight(4, device).requires_grad_()
    value, _ = ops(device).head(f0, f1, w)
    (gw,) = torch.autograd.grad(value.sum(), [w])
    w64 = w.detach().double().requires_grad_()
    v64, _ = R.head(f0.double(), f1.double(), w64)
    (gw64,) = torch.autograd.grad(v64.sum(), [w64])
    assert ((value.double() - v64).abs() / v64).max().item() <= 5e-7
    assert ((gw.double() - gw64).abs().max() / gw64.abs().max()).item() <= 5e-7


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_of_a_sliced_map(device):
    """N = 0 features cut out of a larger map (the model's tiles do this): their strides do
    not merge the pixels, and contiguous() returns an empty tensor unchanged, so the kernels
    failed an internal assert ('pixel_strides ... INTERNAL ASSERT FAILED')."""
    gen = torch.Generator().manual_seed(12)
    big = torch.rand(0, 7, 10, 12, generator=gen).to(tdev(device))
    f0, f1 = big[..., 2:7, 3:9], big[..., 1:6, 4:10]
    f0 = f0.requires_grad_()
    w = make_weight(7, device).requires_grad_()
    value, dmap = ops(device).head(f0, f1, w, return_map=True)
    g0, gw = torch.autograd.grad(value.sum() + dmap.sum(), [f0, w], allow_unused=True)
    assert value.shape == (0,) and dmap.shape == (0, 1, 5, 6) and g0.shape == f0.shape
    assert torch.equal(gw, torch.zeros_like(w))
    values, maps = ops(device).head_all([f0], [f1], [w], return_map=True)
    assert values.shape == (1, 0) and maps[0].shape == (0, 1, 5, 6)
