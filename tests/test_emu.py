"""The CUDA kernels and their host code, executed on the CPU (csrc/emu, tests/emu.py), over the
cases a GPU run would need: every channel count class (the register cache and its overflow
loop: R = 32 floats per thread, at most 16 warps, so C > 512 overflows on pixel lanes), every
layout the ops accept without a copy, every dtype, gradient mask and layer count, and the
multi-tile and multi-chunk paths (device limits lowered). tests/test_kernels.py runs its own
cases on the emulation too ("emu" device); this file adds the matrix.

Tolerances, against lpips_fast.reference in float64 on the same (rounded) inputs:
- float32: values 1e-5 relative (a two-pass sum over C <= 1100 channels in float32: about
  sqrt(C) * 6e-8 typical, C * 6e-8 worst; the CPU kernel itself is 1.4e-6 away at C = 1100),
  maps and gradients 1e-4 elementwise with 1e-5 of the largest magnitude (each element is a
  difference of two C-term sums);
- float64: 1e-10;
- float16 / bfloat16 inputs (float32 accumulation, outputs rounded to the input dtype for the
  gradients): the emulated CUDA kernel against the CPU kernel, both computing in float32 from
  the same rounded inputs: values 1e-5, gradients one unit in the last place of the dtype.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from helpers import ops
from lpips_fast import _ops
from lpips_fast import reference as R

pytestmark = pytest.mark.skipif(not _ops.available(), reason=f"extension not built: {_ops.load_error}")

CHANNELS = [1, 5, 37, 64, 192, 512, 513, 1100]
LAYOUTS = ["nchw", "channels_last", "expand0", "pixel_stride2", "channel_slice",
           "channel_slice_cl", "mixed"]


@pytest.fixture(autouse=True)
def nan_fill(monkeypatch):
    monkeypatch.setenv("LPIPS_FAST_DEBUG_NAN_FILL", "1")  # an unwritten element fails


@pytest.fixture
def emu():
    return ops("emu")


def feature(shape, dtype, layout, seed):
    """ReLU'ed randn in `layout`: a view with the strides the ops meet in practice."""
    n, c, h, w = shape
    g = torch.Generator().manual_seed(seed)

    def randn(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).relu().to(dtype)
    if layout == "channels_last":
        return randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
    if layout == "pixel_stride2":  # every other column: pixel stride 2
        return randn(n, c, h, 2 * w)[..., ::2]
    if layout == "channel_slice":  # channels 1..c of c + 3: an offset base, NCHW strides
        return randn(n, c + 3, h, w)[:, 1:c + 1]
    if layout == "channel_slice_cl":  # the same in channels_last: pixel stride c + 3
        return randn(n, c + 3, h, w).contiguous(memory_format=torch.channels_last)[:, 1:c + 1]
    return randn(n, c, h, w)


def pair(shape, dtype, layout, seed=0):
    if layout == "expand0":  # f0 is one sample broadcast over the batch (batch stride 0)
        return (feature((1,) + shape[1:], dtype, "nchw", seed).expand(shape),
                feature(shape, dtype, "nchw", seed + 1))
    if layout == "mixed":  # f0 NCHW, f1 channels_last
        return feature(shape, dtype, "nchw", seed), feature(shape, dtype, "channels_last", seed + 1)
    return feature(shape, dtype, layout, seed), feature(shape, dtype, layout, seed + 1)


def weight(c, seed=7):
    return torch.rand(1, c, 1, 1, generator=torch.Generator().manual_seed(seed))


def close(actual, expected, rtol, atol_frac, what):
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: not finite (an unwritten element?)"
    atol = atol_frac * expected.abs().max().item() + 1e-300
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def run(ops, f0, f1, w, gv, gm):
    """Values, maps and the gradients of sum(gv * value) + sum(gm * map)."""
    a = f0.detach().requires_grad_()
    b = f1.detach().requires_grad_()
    wt = None if w is None else w.detach().requires_grad_()
    value, dmap = ops.head(a, b, wt, return_map=True)
    inputs = [a, b] + ([wt] if wt is not None else [])
    loss = (value.double() * gv).sum() + (dmap.double() * gm).sum()
    return (value, dmap) + torch.autograd.grad(loss, inputs)


def reference(f0, f1, w, gv, gm):
    return run(R, f0.double(), f1.double(), None if w is None else w.double(), gv, gm)


def upstream(shape, seed=9):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape[0], generator=g, dtype=torch.float64),
            torch.randn((shape[0], 1) + tuple(shape[2:]), generator=g, dtype=torch.float64))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("c", CHANNELS)
def test_every_channel_count_and_layout(emu, c, layout):
    shape = (2, c, 5, 7)
    f0, f1 = pair(shape, torch.float32, layout, seed=c)
    w = weight(c)
    gv, gm = upstream(shape)
    got = run(emu, f0, f1, w, gv, gm)
    ref = reference(f0, f1, w, gv, gm)
    close(got[0], ref[0], 1e-5, 0, "value")
    close(got[1], ref[1], 1e-4, 1e-5, "map")
    for name, a, b in zip(["f0", "f1", "w"], got[2:], ref[2:]):
        close(a, b, 1e-4, 1e-5, f"grad {name}")


@pytest.mark.parametrize("weighted", [True, False], ids=["lin", "sum"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "expand0"])
@pytest.mark.parametrize("c", [37, 513])
def test_float64(emu, c, layout, weighted):
    shape = (2, c, 4, 6)
    f0, f1 = pair(shape, torch.float64, layout, seed=3)
    w = weight(c).double() if weighted else None
    gv, gm = upstream(shape)
    for a, b in zip(run(emu, f0, f1, w, gv, gm), reference(f0, f1, w, gv, gm)):
        close(a, b, 1e-10, 1e-12, "float64")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "mixed"])
@pytest.mark.parametrize("c", [5, 192, 1100])
def test_low_precision_matches_the_cpu_kernel(emu, c, layout, dtype):
    shape = (2, c, 5, 6)
    f0, f1 = pair(shape, dtype, layout, seed=5)
    w = weight(c)
    gv, gm = upstream(shape)
    got, cpu = run(emu, f0, f1, w, gv, gm), run(_ops, f0, f1, w, gv, gm)
    close(got[0], cpu[0], 1e-5, 0, "value")
    close(got[1], cpu[1], 1e-4, 1e-5, "map")
    ulp = torch.finfo(dtype).eps
    for name, a, b in zip(["f0", "f1", "w"], got[2:], cpu[2:]):
        assert a.dtype == b.dtype, name
        close(a, b, ulp, ulp / 16, f"grad {name}")


@pytest.mark.parametrize("mask", list(itertools.product([False, True], repeat=3)),
                         ids=lambda m: "".join("1" if x else "0" for x in m))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_every_gradient_mask(emu, mask, layout):
    shape = (2, 40, 3, 5)
    f0, f1 = pair(shape, torch.float32, layout, seed=11)
    w = weight(40)
    gv, gm = upstream(shape)
    outs = {}
    for name, ns in (("emu", torch.ops.lpips_fast_emu), ("cpu", torch.ops.lpips_fast)):
        _, _, r0, r1 = ns.head_forward(f0, f1, w, True)
        outs[name] = ns.head_backward(gv.float(), gm.float(), f0, f1, w, r0, r1, list(mask))
    for k, (a, b) in enumerate(zip(outs["emu"], outs["cpu"])):
        assert (a.numel() > 0) == mask[k], (k, a.shape)
        if mask[k]:
            close(a, b, 1e-4, 1e-5, f"output {k}")


@pytest.mark.parametrize("layers", [1, 8, 9, 17])
def test_all_layer_op(emu, layers):
    """L layers in launch groups of 8, mixed channel counts and layouts, weights on some."""
    kinds = ["nchw", "channels_last", "expand0", "pixel_stride2", "mixed"]
    f0s, f1s, ws = [], [], []
    for i in range(layers):
        c = CHANNELS[i % len(CHANNELS)]
        a, b = pair((3, c, 2 + i % 4, 3 + i % 3), torch.float32, kinds[i % len(kinds)], seed=20 + i)
        f0s.append(a.detach().requires_grad_())
        f1s.append(b)
        ws.append(weight(c, seed=i).requires_grad_() if i % 3 else None)
    values, maps = emu.head_all(f0s, f1s, ws, return_map=True)
    assert values.shape == (layers, 3)
    loss = values.sum() + sum((m * m).sum() for m in maps)
    grads = torch.autograd.grad(loss, f0s + [w for w in ws if w is not None])
    r0s = [f.detach().double().requires_grad_() for f in f0s]
    rws = [None if w is None else w.detach().double().requires_grad_() for w in ws]
    ref = [R.head(a, b.double(), w, return_map=True) for a, b, w in zip(r0s, f1s, rws)]
    ref_loss = sum(v.sum() + (m * m).sum() for v, m in ref)
    ref_grads = torch.autograd.grad(ref_loss, r0s + [w for w in rws if w is not None])
    for i, (v, m) in enumerate(ref):
        close(values[i], v, 1e-5, 0, f"value of layer {i}")
        close(maps[i], m, 1e-4, 1e-5, f"map of layer {i}")
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        close(a, b, 1e-4, 1e-5, f"gradient {i}")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_multi_tile_and_multi_chunk(emu, layout, monkeypatch):
    """A GPU splits a layer over at most 65536 blocks and the weight gradient into chunks of
    2048 (n, p); lowered here, so that blocks run many rounds and the chunks are many."""
    monkeypatch.setenv("LPIPS_FAST_EMU_MAX_BLOCKS", "4")
    monkeypatch.setenv("LPIPS_FAST_EMU_WGRAD_CHUNK", "7")
    shape = (3, 48, 11, 13)
    f0, f1 = pair(shape, torch.float32, layout, seed=13)
    w = weight(48)
    gv, gm = upstream(shape)
    for a, b in zip(run(emu, f0, f1, w, gv, gm), reference(f0, f1, w, gv, gm)):
        close(a, b, 1e-4, 1e-5, "multi-tile")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_near_identical_inputs(emu, layout):
    """f1 = f0 + 1e-3 noise: float32 within 1e-5 relative of float64 (no cancellation)."""
    shape = (3, 256, 6, 7)
    f0 = feature(shape, torch.float64, "nchw", seed=3) + 0.5
    f1 = f0 + 1e-3 * torch.randn(shape, generator=torch.Generator().manual_seed(4),
                                 dtype=torch.float64)
    f0, f1 = f0.float(), f1.float()
    if layout == "channels_last":
        f0 = f0.contiguous(memory_format=torch.channels_last)
        f1 = f1.contiguous(memory_format=torch.channels_last)
    w = weight(256)
    value, _ = emu.head(f0, f1, w)
    ref, _ = R.head(f0.double(), f1.double(), w.double())
    assert ((value.double() - ref).abs() / ref).max().item() < 1e-5


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_offsets_beyond_32_bits(emu, layout):
    """Sample 1 starts 2^31 + 64 elements after sample 0, inside a sparse 8 GiB mapping of
    which only the touched pages ever exist: an offset computed in 32 bits lands far outside
    (and crashes, or reads other numbers), as it would on a GPU with a tensor that large."""
    import mmap
    c, h, w = 8, 3, 4
    step = (1 << 31) + 64
    try:
        buf = mmap.mmap(-1, (step + c * h * w) * 4, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                        | getattr(mmap, "MAP_NORESERVE", 0))
    except (OSError, ValueError, OverflowError) as e:
        pytest.skip(f"no sparse 8 GiB mapping here: {e}")
    flat = torch.frombuffer(buf, dtype=torch.float32)
    strides = (step, h * w, w, 1) if layout == "nchw" else (step, 1, w * c, c)
    f0 = flat.as_strided((2, c, h, w), strides)
    f0.copy_(feature((2, c, h, w), torch.float32, "nchw", seed=17))
    f1 = feature((2, c, h, w), torch.float32, layout, seed=18)
    wt = weight(c)
    gv, gm = upstream((2, c, h, w))
    ref = reference(f0.contiguous(), f1, wt, gv, gm)
    for name, ops in (("emu", emu), ("cpu", _ops)):
        got = run(ops, f0, f1, wt, gv, gm)
        for what, a, b in zip(["value", "map", "grad f0", "grad f1", "grad w"], got, ref):
            close(a, b, 1e-4, 1e-5, f"{name} {what}")
    del f0, flat


@pytest.mark.parametrize("weighted", [True, False], ids=["lin", "sum"])
def test_narrow_layers_share_a_wide_launch(emu, weighted):
    """NCHW layers of 16 and 64 channels launched with a 600-channel one: their blocks get the
    wide layer's 16 warps, and take several 32-pixel tiles at once (one per group of warps),
    with pixels for every group (20 x 21 = 420 pixels per sample)."""
    f0s, f1s, ws = [], [], []
    for i, c in enumerate([16, 64, 600]):
        a, b = pair((2, c, 20, 21), torch.float32, "nchw", seed=60 + i)
        f0s.append(a.detach().requires_grad_())
        f1s.append(b)
        ws.append(weight(c, seed=i) if weighted else None)
    values, maps = emu.head_all(f0s, f1s, ws, return_map=True)
    grads = torch.autograd.grad(values.sum() + sum((m * m).sum() for m in maps), f0s)
    r0s = [f.detach().double().requires_grad_() for f in f0s]
    ref = [R.head(a, b.double(), None if w is None else w.double(), return_map=True)
           for a, b, w in zip(r0s, f1s, ws)]
    ref_grads = torch.autograd.grad(sum(v.sum() + (m * m).sum() for v, m in ref), r0s)
    for i, ((v, m), g, rg) in enumerate(zip(ref, grads, ref_grads)):
        close(values[i], v, 1e-5, 0, f"value of layer {i}")
        close(maps[i], m, 1e-4, 1e-5, f"map of layer {i}")
        close(g, rg, 1e-4, 1e-5, f"gradient of layer {i}")
