// CPU kernels of the fused conv + bias + ReLU + max-pool layer (host code and math:
// ../conv_pool.h): one parallel loop over the pooled elements (forward) or over the
// convolution output's elements (backward), in memory order.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../conv_pool.h"

namespace lpips_fast {
namespace {

// Work items per parallel task: each reads a window (up to 9 elements for LPIPS's pools).
constexpr int64_t kPoolGrain = 4096;

void pool_fwd_cpu(const at::Tensor& y, const at::Tensor& out, const at::Tensor& pooled,
                  const at::Tensor& bias, const PoolShape& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "conv_bias_relu_pool_cpu", [&] {
    const auto a = pool_fwd_args<scalar_t>(y, out, pooled, bias, p);
    at::parallel_for(0, pooled.numel(), kPoolGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        pool_fwd_element<scalar_t, at::opmath_type<scalar_t>>(a, i);
    });
  });
}

void pool_bwd_cpu(const at::Tensor& out, const std::optional<at::Tensor>& grad_out,
                  const at::Tensor& grad_pooled, const at::Tensor& g, const PoolShape& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "conv_bias_relu_pool_backward_cpu", [&] {
    const auto a = pool_bwd_args<scalar_t>(out, grad_out, grad_pooled, g, p);
    at::parallel_for(0, out.numel(), kPoolGrain, [&](int64_t begin, int64_t end) {
      // window gradients summed in the dtype, as ATen's CPU max-pool backward does
      for (int64_t i = begin; i < end; ++i) pool_bwd_element<scalar_t, scalar_t>(a, i);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lpips_fast, CPU, m) {
  m.impl("conv_bias_relu_pool", &op_conv_bias_relu_pool<pool_fwd_cpu>);
  m.impl("conv_bias_relu_pool_backward", &op_conv_bias_relu_pool_backward<pool_bwd_cpu>);
}

}  // namespace lpips_fast
