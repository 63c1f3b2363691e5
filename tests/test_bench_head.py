"""Micro-benchmarks of the fused head on CPU (pytest-benchmark).

The project's pytest options include --benchmark-disable, so in a normal test run each body
runs once as a plain test (and checks its result); run
`pytest tests/test_bench_head.py --benchmark-enable` for timings. No timing is asserted.
"""
from __future__ import annotations

import pytest
import torch

from lpips_fast import _ops
from lpips_fast import reference as R

pytestmark = pytest.mark.skipif(not _ops.available(), reason="extension not built")

# alex at 64x64 input, batch 8: layer 1 and layer 3 feature shapes
SHAPES = [(8, 64, 15, 15), (8, 384, 3, 3)]


def _inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    f0 = torch.randn(shape, generator=g).relu()
    f1 = torch.randn(shape, generator=g).relu()
    w = torch.rand(1, shape[1], 1, 1, generator=g)
    return f0, f1, w


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bench_fused_forward(benchmark, shape):
    f0, f1, w = _inputs(shape)
    value, _ = benchmark(_ops.head, f0, f1, w)
    torch.testing.assert_close(value, R.head(f0, f1, w)[0], rtol=1e-5, atol=0)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bench_reference_forward(benchmark, shape):
    f0, f1, w = _inputs(shape)
    value, _ = benchmark(R.head, f0, f1, w)
    assert value.shape == (shape[0],) and torch.isfinite(value).all()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bench_fused_forward_backward(benchmark, shape):
    f0, f1, w = _inputs(shape)
    f0.requires_grad_()

    def step():
        v, _ = _ops.head(f0, f1, w)
        return torch.autograd.grad(v.sum(), [f0])[0]

    g = benchmark(step)
    f0r = f0.detach().double().requires_grad_()
    (gr,) = torch.autograd.grad(R.head(f0r, f1.double(), w.double())[0].sum(), [f0r])
    torch.testing.assert_close(g.double(), gr, rtol=1e-4, atol=1e-5 * gr.abs().max().item())


def test_bench_fused_head_all(benchmark):
    ins = [_inputs(s, seed=i) for i, s in enumerate(SHAPES)]
    values, _ = benchmark(_ops.head_all, [a for a, _, _ in ins], [b for _, b, _ in ins],
                          [c for _, _, c in ins])
    for i, (a, b, c) in enumerate(ins):
        torch.testing.assert_close(values[i], R.head(a, b, c)[0], rtol=1e-5, atol=0)
