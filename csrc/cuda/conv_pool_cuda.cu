// CUDA kernels of the fused conv + bias + ReLU + max-pool layer (host code and math:
// ../conv_pool.h): one thread per pooled element (forward) or per element of the
// convolution output (backward), in memory order, grid-stride loops. Not vectorized: a
// thread's reads are a window, not a run (a GPU run decides whether that matters,
// benchmarks/bench_backbone.py).
//
// The same source runs on the CPU under csrc/emu (tests): see launch.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>

#include "../conv_pool.h"
#include "launch.h"

namespace lpips_fast {
namespace {

template <typename T>
__global__ void __launch_bounds__(kEwThreads) pool_fwd_kernel(PoolFwdArgs<T> a, int64_t total) {
  const int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step)
    pool_fwd_element<T, at::opmath_type<T>>(a, i);
}

template <typename T>
__global__ void __launch_bounds__(kEwThreads) pool_bwd_kernel(PoolBwdArgs<T> a, int64_t total) {
  const int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step)
    pool_bwd_element<T, at::opmath_type<T>>(a, i);  // summed in op-math, as ATen's CUDA kernels
}

void pool_fwd_cuda(const at::Tensor& y, const at::Tensor& out, const at::Tensor& pooled,
                   const at::Tensor& bias, const PoolShape& p) {
  const DeviceGuard guard(y.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "conv_bias_relu_pool_cuda", [&] {
    const auto a = pool_fwd_args<scalar_t>(y, out, pooled, bias, p);
    launch(pool_fwd_kernel<scalar_t>, "pool_fwd_kernel", ew_grid(pooled.numel(), 1), kEwThreads,
           0, current_stream(), a, pooled.numel());
  });
}

void pool_bwd_cuda(const at::Tensor& out, const std::optional<at::Tensor>& grad_out,
                   const at::Tensor& grad_pooled, const at::Tensor& g, const PoolShape& p) {
  const DeviceGuard guard(out.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "conv_bias_relu_pool_backward_cuda", [&] {
    const auto a = pool_bwd_args<scalar_t>(out, grad_out, grad_pooled, g, p);
    launch(pool_bwd_kernel<scalar_t>, "pool_bwd_kernel", ew_grid(out.numel(), 1), kEwThreads, 0,
           current_stream(), a, out.numel());
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(LF_OPS_NAMESPACE, LF_DISPATCH_KEY, m) {
  m.impl("conv_bias_relu_pool", &op_conv_bias_relu_pool<pool_fwd_cuda>);
  m.impl("conv_bias_relu_pool_backward", &op_conv_bias_relu_pool_backward<pool_bwd_cuda>);
}

}  // namespace lpips_fast
