"""Python side of the fused slice end conv + bias + ReLU + LPIPS head (C++: csrc/conv_head.h,
the head kernels' prologue in csrc/head.h): fake kernel, autograd, the autocast-aware wrapper.

- ``conv_bias_relu_head(x, weight, bias, stride[2], padding[2], lin_weight?, return_map)
  -> (out, value, dmap, r0, r1)``: out = relu(conv2d(x, weight, bias, stride, padding)) of
  x's 2N samples (the pair's two batches, sample n paired with n + N), and the LPIPS head of
  that tap, (value, dmap, r0, r1) = head_forward(out[:N], out[N:], lin_weight, return_map),
  with the head's first read of each element taken from the epilogue: y is read once and
  the tap written once (per tap element 2 x its bytes instead of 3 x, csrc/conv_head.h).

Backward (no kernel of its own): the head's backward (head_backward from the tap and the
saved norms r0, r1) gives the tap's gradient, the gradient that reached the tap from the
rest of the network is added (autograd's sum of the two), then conv_bias_relu_backward (one
ReLU-mask pass, one convolution_backward): the gradients of the unfused path
conv_bias_relu -> head on the tap's halves. A backward that records a graph
(create_graph=True) runs the reference head's and eager's differentiable formulas, as the
head and conv ops do. Like the other backbone ops it is taken only where the backbone takes
the fused ops (not under torch.func or forward-mode AD, not while exporting).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _conv_ops

# (lpips_fast._ops is imported where used: its register() registers this op, so it imports
# this module while it is itself being imported)

_OP = "conv_bias_relu_head"


def register(ns: str = "lpips_fast") -> None:
    """Fake kernel and autograd of conv_bias_relu_head in torch.ops.<ns> (the extension's,
    or the tests' CPU emulation of the CUDA kernels)."""
    from . import _ops
    ops = getattr(torch.ops, ns)

    @torch.library.register_fake(f"{ns}::{_OP}")
    def _fake(x, weight, bias, stride, padding, lin_weight, return_map):
        y = torch.ops.aten.convolution(x, weight, None, stride, padding, [1, 1], False,
                                       [0, 0], 1)  # ATen's own shape and layout rules
        torch._check(y.shape[0] % 2 == 0, lambda: "x must hold the pair's two batches")
        n, _, h, w = y.shape
        acc = _ops._acc_dtype(y.dtype)
        value = y.new_empty((n // 2,), dtype=acc)
        dmap = y.new_empty((n // 2, 1, h, w) if return_map else (0,), dtype=acc)
        r0, r1 = (y.new_empty((n // 2, h * w), dtype=acc) for _ in range(2))
        return torch.empty_like(y), value, dmap, r0, r1

    def setup_context(ctx, inputs, output):
        x, weight, _bias, stride, padding, lin_weight, return_map = inputs
        out, _, _, r0, r1 = output
        ctx.save_for_backward(x, weight, out, lin_weight, r0, r1)
        ctx.stride, ctx.padding, ctx.return_map = list(stride), list(padding), return_map
        ctx.mark_non_differentiable(r0, r1)
        ctx.set_materialize_grads(False)  # a gradient that reaches no output stays None

    def backward(ctx, grad_out, grad_value, grad_map, _gr0, _gr1):
        x, weight, out, lin_weight, r0, r1 = ctx.saved_tensors
        conv_mask = [bool(n) for n in ctx.needs_input_grad[:3]]
        want_lin = bool(ctx.needs_input_grad[5]) and lin_weight is not None
        if not ctx.return_map or (grad_map is not None and grad_map.numel() == 0):
            grad_map = None
        grad_tap, grad_lin = _head_backward(ops, ctx, out, lin_weight, r0, r1, grad_value,
                                            grad_map, any(conv_mask), want_lin)
        if grad_out is not None:
            grad_tap = grad_out if grad_tap is None else grad_out + grad_tap
        grads = (None,) * 3
        if grad_tap is not None and any(conv_mask):
            args = (x, weight, ctx.stride, ctx.padding, conv_mask)
            if torch.is_grad_enabled():  # create_graph: eager's differentiable formulas
                grads = _conv_ops._conv_backward(
                    torch.ops.aten.threshold_backward(grad_tap, out, 0), *args)
            else:
                grads = ops.conv_bias_relu_backward(grad_tap, out, *args)
        return (*(g if m else None for g, m in zip(grads, conv_mask)), None, None, grad_lin,
                None)

    torch.library.register_autograd(f"{ns}::{_OP}", backward, setup_context=setup_context)


def _head_backward(ops, ctx, out, lin_weight, r0, r1, grad_value, grad_map, want_tap, want_lin):
    """(the tap's gradient from the head, or None; the lin weight's gradient, or None)."""
    from . import _ops
    if (grad_value is None and grad_map is None) or not (want_tap or want_lin):
        return None, None
    n = out.shape[0] // 2
    f0, f1 = out[:n], out[n:]
    if grad_value is None:
        grad_value = r0.new_zeros(n)
    mask = [want_tap, want_tap, want_lin]
    if torch.is_grad_enabled():  # create_graph: the reference head's differentiable math
        g0s, g1s, gws = _ops._graph_grads([f0], [f1], [lin_weight], [grad_value], [grad_map],
                                          mask)
        g0, g1, gw = g0s[0], g1s[0], gws[0]
    else:
        g0, g1, gw = ops.head_backward(grad_value, grad_map, f0, f1, lin_weight, r0, r1, mask)
        gw = gw.reshape(lin_weight.shape).to(lin_weight.dtype) if want_lin else None
    return (torch.cat([g0, g1]) if want_tap else None), gw


def conv_bias_relu_head(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        stride: Sequence[int], padding: Sequence[int],
                        lin_weight: Optional[torch.Tensor], return_map: bool,
                        ns: str = "lpips_fast"):
    """(relu(conv2d(x, weight, bias, stride, padding)), (value N, map N x 1 x h x w or None))
    for x holding the pair's 2N samples, through the fused op (the head as
    lpips_fast._ops.head of the tap's halves), under the caller's autocast as eager conv2d
    would run it (the head accumulates in float32, float64 for float64)."""
    x, weight, bias = _conv_ops._autocast_args(x, weight, bias)
    out, value, dmap, _, _ = getattr(torch.ops, ns).conv_bias_relu_head(
        x, weight, bias, list(stride), list(padding), lin_weight, bool(return_map))
    return out, (value, dmap if return_map else None)
