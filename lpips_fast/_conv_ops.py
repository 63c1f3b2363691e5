"""Python side of the fused backbone layer ops (C++: csrc/conv.h, csrc/cpu/conv_cpu.cpp,
csrc/cuda/conv_cuda.cu; autograd: csrc/conv_autograd.cpp): fake kernels, the autocast-aware
wrapper.

- ``conv_bias_relu(x, weight, bias, stride[2], padding[2]) -> out``
  = relu(conv2d(x, weight, bias, stride, padding)): ATen's bias-free convolution, then one
  bias + ReLU pass (CUDA: one kernel) instead of eager's bias add and ReLU passes.
- ``conv_bias_relu_backward(grad_out, out, x, weight, stride[2], padding[2], output_mask[3])
  -> (grad_x, grad_weight, grad_bias)``: one ReLU-mask pass, one convolution_backward.

- ``conv_bias_relu_pool(x, weight, bias, stride[2], padding[2], pool_kernel[2],
  pool_stride[2], ceil_mode) -> (out, pooled)``: out as conv_bias_relu, and
  pooled = max_pool2d(out, pool_kernel, pool_stride, 0, 1, ceil_mode) from the same epilogue
  pass (the pool that starts the next backbone slice; csrc/conv_pool.h).
- ``conv_bias_relu_pool_backward(grad_out?, grad_pooled, out, x, weight, stride, padding,
  pool_kernel, pool_stride, ceil_mode, output_mask[3])``: one pass (the window argmax
  recomputed from out, nothing else saved; the ReLU mask; + grad_out), one
  convolution_backward.

Autograd (C++, registered for the Autograd key, no Python per call) returns the gradients
that the backward call needs (input, weight, bias), through the backward ops above; a
backward that records a graph (create_graph=True) runs eager's own differentiable formulas
(threshold_backward, max_pool2d_with_indices_backward, convolution_backward), so
second-order gradients are eager's.
Not supported through these ops, the backbone takes its eager modules there instead
(lpips_fast.backbones): torch.func transforms (vmap, grad, jacrev, ...) and forward-mode AD
(a C++ autograd Function raises under both), graphs recorded for export.
"""
from __future__ import annotations

from typing import Sequence

import torch

_DILATION, _OUTPUT_PADDING = [1, 1], [0, 0]


def _conv_backward(grad, x, weight, stride, padding, mask):
    """aten.convolution_backward with this op's fixed arguments (the backward fakes' shapes)."""
    bias_sizes = [weight.shape[0]] if mask[2] else None
    return torch.ops.aten.convolution_backward(grad, x, weight, bias_sizes, stride, padding,
                                               _DILATION, False, _OUTPUT_PADDING, 1, mask)


def register(ns: str = "lpips_fast") -> None:
    """Fake kernels of the conv ops in torch.ops.<ns> (the extension's, or the tests' CPU
    emulation of the CUDA kernels; their autograd is C++, csrc/conv_autograd.cpp)."""

    @torch.library.register_fake(f"{ns}::conv_bias_relu")
    def _fwd_fake(x, weight, bias, stride, padding):
        # ATen's own shape and layout rules (the real op returns the convolution's output)
        y = torch.ops.aten.convolution(x, weight, None, stride, padding, _DILATION, False,
                                       _OUTPUT_PADDING, 1)
        return torch.empty_like(y)

    @torch.library.register_fake(f"{ns}::conv_bias_relu_backward")
    def _bwd_fake(grad_out, out, x, weight, stride, padding, output_mask):
        # the real op hands convolution_backward the masked gradient in out's layout
        grads = _conv_backward(torch.empty_like(out), x, weight, stride, padding, output_mask)
        return tuple(g if m and g is not None else x.new_empty(0)
                     for g, m in zip(grads, output_mask))

    @torch.library.register_fake(f"{ns}::conv_bias_relu_pool")
    def _pool_fwd_fake(x, weight, bias, stride, padding, pool_kernel, pool_stride, ceil_mode):
        out = _fwd_fake(x, weight, bias, stride, padding)
        pooled = torch.ops.aten.max_pool2d(out, pool_kernel, pool_stride, [0, 0], _DILATION,
                                           ceil_mode)  # (its shape, layout and size check)
        return out, torch.empty_like(pooled)

    @torch.library.register_fake(f"{ns}::conv_bias_relu_pool_backward")
    def _pool_bwd_fake(grad_out, grad_pooled, out, x, weight, stride, padding, pool_kernel,
                       pool_stride, ceil_mode, output_mask):
        return _bwd_fake(out, out, x, weight, stride, padding, output_mask)


def _autocast_args(*tensors):
    """The tensors as autocast hands them to conv2d: floating ones but float64 in the
    autocast dtype (custom ops are not cast by autocast itself)."""
    dev = tensors[0].device.type
    if dev not in ("cpu", "cuda") or not torch.is_autocast_enabled(dev):
        return tensors
    low = torch.get_autocast_dtype(dev)
    return tuple(t.to(low) if t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def conv_bias_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   stride: Sequence[int], padding: Sequence[int],
                   ns: str = "lpips_fast") -> torch.Tensor:
    """relu(conv2d(x, weight, bias, stride, padding)) through the fused op, under the
    caller's autocast as eager conv2d would run it."""
    x, weight, bias = _autocast_args(x, weight, bias)
    return getattr(torch.ops, ns).conv_bias_relu(x, weight, bias, list(stride), list(padding))


def conv_bias_relu_pool(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        stride: Sequence[int], padding: Sequence[int],
                        pool_kernel: Sequence[int], pool_stride: Sequence[int], ceil_mode: bool,
                        ns: str = "lpips_fast") -> tuple[torch.Tensor, torch.Tensor]:
    """(relu(conv2d(x, weight, bias, stride, padding)), its max_pool2d(pool_kernel,
    pool_stride, padding 0, dilation 1, ceil_mode)) through the fused op, under the caller's
    autocast as eager conv2d would run it."""
    x, weight, bias = _autocast_args(x, weight, bias)
    return getattr(torch.ops, ns).conv_bias_relu_pool(x, weight, bias, list(stride), list(padding),
                                                      list(pool_kernel), list(pool_stride),
                                                      bool(ceil_mode))
