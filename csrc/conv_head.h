// The fused last layer of a backbone slice whose tap no max-pool follows, with the LPIPS head
// of that tap: conv + bias + ReLU whose epilogue IS the head's first read (head.h,
// "Prologue"). Host code shared by the CPU kernels (cpu/head_cpu.cpp) and the CUDA kernels
// (cuda/head_cuda.cu, also run by the emulator).
//
// Forward:  y = conv(x, weight) WITHOUT bias (ATen, as conv.h), then the head's forward
//           kernels with the prologue: they read y, use relu(y + b) (conv.h's rounding) as
//           the features and write it to `out` (the tap) as they go. The pair's two images
//           are samples n and n + N of x (2N samples: the model's torch.cat of the pair).
//           Per tap element: read y, write out (2 x its bytes), against 3 x for the
//           epilogue pass (read y, write out) and then the head reading out.
// Backward: unchanged pieces, nothing fused: the head's backward (head_backward, from the
//           tap and the saved norms) gives the tap's gradient, + the gradient reaching the
//           tap from the rest of the network, then conv_bias_relu_backward (ReLU mask, one
//           convolution_backward). See lpips_fast/_conv_head.py.
#pragma once

#include "common.h"
#include "conv.h"

namespace lpips_fast {

template <FwdRunner run>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> op_conv_bias_relu_head(
    const Tensor& x, const Tensor& w, const Tensor& bias, at::IntArrayRef stride,
    at::IntArrayRef padding, const std::optional<Tensor>& lin_weight, bool return_map) {
  check_conv(x, w, stride, padding);
  check_bias(x, w, bias);
  TORCH_CHECK(x.size(0) % 2 == 0, "lpips_fast conv_bias_relu_head: x must hold the pair's two "
              "batches (2N samples, sample n paired with n + N), got ", x.size(0), " samples");
  Tensor y = conv_nobias(x, w, stride, padding);
  if (channel_inner(y) == 0) y = y.contiguous();  // (ATen returns NCHW or channels_last)
  Tensor out = new_output_like(y);
  TORCH_INTERNAL_ASSERT(out.strides() == y.strides());  // the kernels address both alike
  const int64_t N = y.size(0) / 2;
  const std::vector<Tensor> y0{y.narrow(0, 0, N)}, y1{y.narrow(0, N, N)};
  FwdPlan plan = plan_forward(y0, y1, {lin_weight}, return_map);
  // a dense y has pixel strides: the kernels read y itself, never a copy
  TORCH_INTERNAL_ASSERT(plan.v0[0].t.is_same(y0[0]) && plan.v1[0].t.is_same(y1[0]));
  plan.prologue.push_back({bias.contiguous().view({-1}), out.narrow(0, 0, N), out.narrow(0, N, N)});
  run(plan);
  return {out, plan.values.view({-1}), plan.dmaps[0], plan.r0s[0], plan.r1s[0]};
}

}  // namespace lpips_fast
