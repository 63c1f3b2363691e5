// Operator schemas of the lpips_fast ops, shared by the real library (lpips_fast.cpp, namespace
// lpips_fast) and the CPU emulation of the CUDA kernels (emu/emu.cpp, namespace lpips_fast_emu).
//
// head_forward: one layer. value (N), dmap (N x 1 x h x w when return_map, else empty),
//   r0 / r1 (N x h*w per-pixel feature norms, saved for the backward). Accumulator dtype
//   (float32, float64 for float64 inputs) for all outputs.
// head_backward: gradients for f0, f1 (dtype and layout of the inputs) and the weight
//   (C elements, accumulator dtype); output_mask selects which are computed, the others
//   are returned empty.
// head_all_forward / head_all_backward: all layers of one call in one launch; values is
//   L x N. `weights` has one tensor per layer; an EMPTY tensor (numel 0) means "no weights"
//   for that layer (Tensor?[] would be simpler but custom-op autograd does not track the
//   tensors inside an optional list, so their gradients would be lost).
// conv_bias_relu: relu(conv2d(x, weight) + bias) (dilation 1, groups 1) as ATen's bias-free
//   convolution plus one epilogue pass (csrc/conv.h); the output has the convolution's layout.
//   Its autograd and conv_bias_relu_pool's: conv_autograd.cpp (the Autograd key).
// conv_bias_relu_backward: gradients for x, weight, bias (output_mask selects; the others are
//   returned empty) from the forward's output: one ReLU-mask pass, one convolution_backward.
// conv_bias_relu_pool: (out, pooled) = (conv_bias_relu(...), max_pool2d(out, pool_kernel,
//   pool_stride, padding 0, dilation 1, ceil_mode)) in one epilogue pass (csrc/conv_pool.h).
// conv_bias_relu_pool_backward: gradients for x, weight, bias from the gradients of out (none
//   when no gradient reached it) and pooled: one pass (window argmax recomputed from out,
//   ReLU mask), one convolution_backward.
// conv_bias_relu_head: (out, value, dmap, r0, r1) = (conv_bias_relu(...) of x's 2N samples,
//   and head_forward(out[:N], out[N:], lin_weight, return_map)) with the head's first read
//   taken from the epilogue (csrc/conv_head.h). Its backward is head_backward, then
//   conv_bias_relu_backward (lpips_fast/_conv_head.py).
#pragma once

#include <torch/library.h>

namespace lpips_fast {

inline void define_schemas(torch::Library& m) {
  m.def(
      "head_forward(Tensor f0, Tensor f1, Tensor? weight, bool return_map) -> "
      "(Tensor value, Tensor dmap, Tensor r0, Tensor r1)");
  m.def(
      "head_backward(Tensor grad_value, Tensor? grad_map, Tensor f0, Tensor f1, Tensor? weight, "
      "Tensor r0, Tensor r1, bool[3] output_mask) -> (Tensor grad_f0, Tensor grad_f1, "
      "Tensor grad_weight)");
  m.def(
      "head_all_forward(Tensor[] f0s, Tensor[] f1s, Tensor[] weights, bool return_map) -> "
      "(Tensor values, Tensor[] dmaps, Tensor[] r0s, Tensor[] r1s)");
  m.def(
      "head_all_backward(Tensor grad_values, Tensor?[] grad_maps, Tensor[] f0s, Tensor[] f1s, "
      "Tensor[] weights, Tensor[] r0s, Tensor[] r1s, bool[3] output_mask) -> "
      "(Tensor[] grad_f0s, Tensor[] grad_f1s, Tensor[] grad_weights)");
  m.def(
      "conv_bias_relu(Tensor x, Tensor weight, Tensor bias, int[2] stride, int[2] padding) -> "
      "Tensor");
  m.def(
      "conv_bias_relu_backward(Tensor grad_out, Tensor out, Tensor x, Tensor weight, "
      "int[2] stride, int[2] padding, bool[3] output_mask) -> (Tensor grad_x, "
      "Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "conv_bias_relu_pool(Tensor x, Tensor weight, Tensor bias, int[2] stride, int[2] padding, "
      "int[2] pool_kernel, int[2] pool_stride, bool ceil_mode) -> (Tensor out, Tensor pooled)");
  m.def(
      "conv_bias_relu_pool_backward(Tensor? grad_out, Tensor grad_pooled, Tensor out, Tensor x, "
      "Tensor weight, int[2] stride, int[2] padding, int[2] pool_kernel, int[2] pool_stride, "
      "bool ceil_mode, bool[3] output_mask) -> (Tensor grad_x, Tensor grad_weight, "
      "Tensor grad_bias)");
  m.def(
      "conv_bias_relu_head(Tensor x, Tensor weight, Tensor bias, int[2] stride, int[2] padding, "
      "Tensor? lin_weight, bool return_map) -> (Tensor out, Tensor value, Tensor dmap, "
      "Tensor r0, Tensor r1)");
}

}  // namespace lpips_fast
