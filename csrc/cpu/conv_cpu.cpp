// CPU kernels of the fused backbone layer (host code and math: ../conv.h): the bias + ReLU
// epilogue and the ReLU-mask pass, each one parallel loop over the elements in memory order.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../conv.h"

namespace lpips_fast {
namespace {

constexpr int64_t kGrain = 32768;  // elements per parallel task

template <typename T>
void epilogue_typed(const EpilogueArgs<T>& a) {
  using A = at::opmath_type<T>;
  at::parallel_for(0, a.total, kGrain, [&](int64_t begin, int64_t end) {
    int64_t c = (begin / a.inner) % a.C, pos = begin % a.inner;  // one division per task
    for (int64_t i = begin; i < end; ++i) {
      a.out[i] = bias_relu<T, A>(a.y[i], a.bias[c]);
      if (++pos == a.inner) {
        pos = 0;
        if (++c == a.C) c = 0;
      }
    }
  });
}

void epilogue_cpu(const at::Tensor& y, const at::Tensor& out, const at::Tensor& bias,
                  int64_t inner) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "conv_bias_relu_cpu", [&] {
    epilogue_typed<scalar_t>({y.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                              bias.const_data_ptr<scalar_t>(), y.numel(), y.size(1), inner});
  });
}

void mask_cpu(const at::Tensor& out, const at::Tensor& grad, const at::Tensor& g) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "relu_mask_cpu", [&] {
    const scalar_t* o = out.const_data_ptr<scalar_t>();
    const scalar_t* gr = grad.const_data_ptr<scalar_t>();
    scalar_t* d = g.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, out.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) d[i] = relu_mask(o[i], gr[i]);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lpips_fast, CPU, m) {
  m.impl("conv_bias_relu", &op_conv_bias_relu<epilogue_cpu>);
  m.impl("conv_bias_relu_backward", &op_conv_bias_relu_backward<mask_cpu>);
}

}  // namespace lpips_fast
