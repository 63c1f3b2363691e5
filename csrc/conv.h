// The fused backbone layer conv + bias + ReLU: host code shared by the CPU kernels
// (cpu/conv_cpu.cpp) and the CUDA kernels (cuda/conv_cuda.cu, also run by the emulator).
//
// Forward:  y = conv(x, weight) WITHOUT bias (ATen picks the algorithm: oneDNN, cuDNN, ...),
//           then ONE epilogue pass out = relu(y + bias), in place on the fresh y (into a
//           NaN-filled copy under LPIPS_FAST_DEBUG_NAN_FILL, so a missed element shows).
// Backward: g = (out <= 0 ? 0 : grad_out)   (ReLU's mask, one pass; eager's threshold_backward)
//           then ONE at::convolution_backward(g, ...) for the gradients output_mask asks for
//           (input, weight, bias: bias_sizes given only when the bias gradient is wanted).
//
// Rounding, per element, exactly as PyTorch's separate bias add and ReLU (bias_relu.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/macros/Macros.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>

#include <array>
#include <limits>
#include <tuple>

#include "bias_relu.h"
#include "common.h"

namespace lpips_fast {

template <typename T>
C10_HOST_DEVICE inline T relu_mask(T out, T grad) {
  return out <= T(0) ? T(0) : grad;  // threshold_backward(grad, out, 0): NaN out passes grad
}

// One epilogue pass over a dense tensor in memory order: element i has channel
// (i / inner) % C (inner = h*w for NCHW, 1 for channels_last).
template <typename T>
struct EpilogueArgs {
  const T* y;
  T* out;           // == y for the in-place pass
  const T* bias;    // C elements
  int64_t total, C, inner;
};

// The mask pass: g[i] = relu_mask(out[i], grad[i]); all three share one dense layout.
template <typename T>
struct MaskArgs {
  const T* out;
  const T* grad;
  T* g;
  int64_t total;
};

inline void check_conv(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                       at::IntArrayRef padding) {
  TORCH_CHECK(x.dim() == 4 && w.dim() == 4, "lpips_fast conv_bias_relu: x and weight must be "
              "4-D, got ", x.dim(), " and ", w.dim(), " dimensions");
  TORCH_CHECK(x.device() == w.device(), "lpips_fast conv_bias_relu: x is on ", x.device(),
              " but weight is on ", w.device());
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "lpips_fast conv_bias_relu: x is ",
              x.scalar_type(), " but weight is ", w.scalar_type());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "lpips_fast conv_bias_relu: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(x.size(1) == w.size(1), "lpips_fast conv_bias_relu: x has ", x.size(1),
              " channels but weight expects ", w.size(1), " (groups are not supported)");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && stride[0] >= 1 && stride[1] >= 1 &&
                  padding[0] >= 0 && padding[1] >= 0,
              "lpips_fast conv_bias_relu: stride must be two positive and padding two "
              "non-negative numbers, got ", stride, " and ", padding);
}

inline void check_bias(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias) {
  TORCH_CHECK(bias.device() == x.device() && bias.scalar_type() == x.scalar_type() &&
                  bias.numel() == w.size(0),
              "lpips_fast conv_bias_relu: bias must hold ", w.size(0), " ", x.scalar_type(),
              " elements on ", x.device(), ", got ", bias.numel(), " ", bias.scalar_type(),
              " on ", bias.device());
}

// Autocast is off inside the ops: they compute in their inputs' dtype (the Python wrapper
// casts them as autocast casts conv2d's); an autocast conv here would return another dtype
// than the bias's, which the epilogue reads.
inline at::Tensor conv_nobias(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                              at::IntArrayRef padding) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  return at::convolution(x, w, std::nullopt, stride, padding, /*dilation=*/{1, 1},
                         /*transposed=*/false, /*output_padding=*/{0, 0}, /*groups=*/1);
}

// Elements between channel changes for a dense NCHW or channels_last tensor; 0 for neither.
inline int64_t channel_inner(const at::Tensor& t) {
  if (t.is_contiguous()) return t.size(2) * t.size(3);
  if (t.is_contiguous(at::MemoryFormat::ChannelsLast)) return 1;
  return 0;
}

// A fresh tensor of t's sizes and strides, NaN-filled under LPIPS_FAST_DEBUG_NAN_FILL.
inline at::Tensor new_output_like(const at::Tensor& t) {
  at::Tensor o = at::empty_like(t);
  if (debug_nan_fill() && o.numel() > 0) o.fill_(std::numeric_limits<double>::quiet_NaN());
  return o;
}

// The op entry points; `epilogue` and `mask` launch the device's kernel (the tensors
// are dense, with one layout).
using EpilogueFn = void (*)(const at::Tensor& y, const at::Tensor& out, const at::Tensor& bias,
                            int64_t inner);
using MaskFn = void (*)(const at::Tensor& out, const at::Tensor& grad, const at::Tensor& g);

template <EpilogueFn epilogue>
at::Tensor op_conv_bias_relu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                             at::IntArrayRef stride, at::IntArrayRef padding) {
  check_conv(x, w, stride, padding);
  check_bias(x, w, bias);
  at::Tensor y = conv_nobias(x, w, stride, padding);
  if (channel_inner(y) == 0) y = y.contiguous();  // (ATen returns NCHW or channels_last)
  at::Tensor out = debug_nan_fill() ? new_output_like(y) : y;
  if (y.numel() > 0) epilogue(y, out, bias.contiguous().view({-1}), channel_inner(y));
  return out;
}

using ConvGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// The gradients of the bias-free convolution + bias that output_mask asks for, from the
// gradient g of its output (the others empty): ONE at::convolution_backward.
inline ConvGrads conv_grads(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                            at::IntArrayRef stride, at::IntArrayRef padding,
                            std::array<bool, 3> output_mask) {
  const int64_t cout = w.size(0);
  const at::OptionalIntArrayRef bias_sizes =
      output_mask[2] ? at::OptionalIntArrayRef(at::IntArrayRef(&cout, 1)) : std::nullopt;
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  auto grads = at::convolution_backward(
      g, x, w, bias_sizes,
      stride, padding, /*dilation=*/{1, 1}, /*transposed=*/false, /*output_padding=*/{0, 0},
      /*groups=*/1, output_mask);
  // (some backends compute more than output_mask asks for: only the asked are returned)
  auto asked = [&](int i, const at::Tensor& t) {
    return output_mask[i] && t.defined() ? t : at::empty({0}, x.options());
  };
  return {asked(0, std::get<0>(grads)), asked(1, std::get<1>(grads)), asked(2, std::get<2>(grads))};
}

template <MaskFn mask>
ConvGrads op_conv_bias_relu_backward(
    const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
    at::IntArrayRef stride, at::IntArrayRef padding, std::array<bool, 3> output_mask) {
  check_conv(x, w, stride, padding);
  TORCH_CHECK(grad_out.sizes() == out.sizes() && grad_out.scalar_type() == out.scalar_type() &&
                  grad_out.device() == out.device() && out.device() == x.device(),
              "lpips_fast conv_bias_relu_backward: grad_out (", grad_out.sizes(), ", ",
              grad_out.scalar_type(), ", ", grad_out.device(), ") must match out (", out.sizes(),
              ", ", out.scalar_type(), ", ", out.device(), ") on x's device ", x.device());
  // The mask pass walks memory linearly: out dense, the gradient in out's layout.
  const at::Tensor o = channel_inner(out) == 0 ? out.contiguous() : out;
  const at::Tensor gr = grad_out.strides() == o.strides()
                            ? grad_out
                            : grad_out.contiguous(o.suggest_memory_format());
  at::Tensor g = new_output_like(o);
  if (g.numel() > 0) mask(o, gr, g);
  return conv_grads(g, x, w, stride, padding, output_mask);
}

}  // namespace lpips_fast
