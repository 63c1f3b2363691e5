// CUDA kernels of the fused backbone layer (host code and math: ../conv.h): the bias + ReLU
// epilogue of the bias-free convolution and the ReLU-mask pass of its backward. Both are
// memory-bound element-wise passes: each thread takes one 16-byte chunk (kVec elements) per
// step of a grid-stride loop, loaded and stored as one vector when the pointers allow
// (always for ATen's fresh outputs), and finds a chunk's channel with one division, then
// steps it along (element i has channel (i / inner) % C).
//
// The same source runs on the CPU under csrc/emu (tests): see launch.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../conv.h"
#include "launch.h"

namespace lpips_fast {
namespace {

template <typename T>
struct alignas(16) Vec {
  static constexpr int n = 16 / sizeof(T) > 0 ? 16 / sizeof(T) : 1;
  T v[n];
};

// kVec elements from p (one 16-byte load when `vec`), n <= kVec valid.
template <typename T, bool vec>
__device__ __forceinline__ Vec<T> load_chunk(const T* p, int64_t n) {
  Vec<T> r;
  if (vec && n == Vec<T>::n) {
    r = *reinterpret_cast<const Vec<T>*>(p);
  } else {
    for (int64_t k = 0; k < n; ++k) r.v[k] = p[k];
  }
  return r;
}

template <typename T, bool vec>
__device__ __forceinline__ void store_chunk(T* p, const Vec<T>& r, int64_t n) {
  if (vec && n == Vec<T>::n) {
    *reinterpret_cast<Vec<T>*>(p) = r;
  } else {
    for (int64_t k = 0; k < n; ++k) p[k] = r.v[k];
  }
}

template <typename T, bool vec>
__global__ void __launch_bounds__(kEwThreads) bias_relu_kernel(EpilogueArgs<T> a) {
  using A = at::opmath_type<T>;
  constexpr int V = Vec<T>::n;
  const int64_t step = (int64_t)gridDim.x * blockDim.x * V;
  for (int64_t i0 = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * V; i0 < a.total;
       i0 += step) {
    const int64_t n = a.total - i0 < V ? a.total - i0 : V;
    int64_t c = (i0 / a.inner) % a.C, pos = i0 % a.inner;
    Vec<T> r = load_chunk<T, vec>(a.y + i0, n);
    for (int64_t k = 0; k < n; ++k) {
      r.v[k] = bias_relu<T, A>(r.v[k], a.bias[c]);
      if (++pos == a.inner) {
        pos = 0;
        if (++c == a.C) c = 0;
      }
    }
    store_chunk<T, vec>(a.out + i0, r, n);
  }
}

template <typename T, bool vec>
__global__ void __launch_bounds__(kEwThreads) relu_mask_kernel(MaskArgs<T> a) {
  constexpr int V = Vec<T>::n;
  const int64_t step = (int64_t)gridDim.x * blockDim.x * V;
  for (int64_t i0 = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * V; i0 < a.total;
       i0 += step) {
    const int64_t n = a.total - i0 < V ? a.total - i0 : V;
    const Vec<T> o = load_chunk<T, vec>(a.out + i0, n);
    Vec<T> r = load_chunk<T, vec>(a.grad + i0, n);
    for (int64_t k = 0; k < n; ++k) r.v[k] = relu_mask(o.v[k], r.v[k]);
    store_chunk<T, vec>(a.g + i0, r, n);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

void epilogue_cuda(const at::Tensor& y, const at::Tensor& out, const at::Tensor& bias,
                   int64_t inner) {
  const DeviceGuard guard(y.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "conv_bias_relu_cuda", [&] {
    const EpilogueArgs<scalar_t> a{y.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                   bias.const_data_ptr<scalar_t>(), y.numel(), y.size(1), inner};
    const dim3 grid = ew_grid(a.total, Vec<scalar_t>::n);
    if (aligned16(a.y) && aligned16(a.out))
      launch(bias_relu_kernel<scalar_t, true>, "bias_relu_kernel", grid, kEwThreads, 0,
             current_stream(), a);
    else
      launch(bias_relu_kernel<scalar_t, false>, "bias_relu_kernel", grid, kEwThreads, 0,
             current_stream(), a);
  });
}

void mask_cuda(const at::Tensor& out, const at::Tensor& grad, const at::Tensor& g) {
  const DeviceGuard guard(out.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "relu_mask_cuda", [&] {
    const MaskArgs<scalar_t> a{out.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
                               g.mutable_data_ptr<scalar_t>(), out.numel()};
    const dim3 grid = ew_grid(a.total, Vec<scalar_t>::n);
    if (aligned16(a.out) && aligned16(a.grad) && aligned16(a.g))
      launch(relu_mask_kernel<scalar_t, true>, "relu_mask_kernel", grid, kEwThreads, 0,
             current_stream(), a);
    else
      launch(relu_mask_kernel<scalar_t, false>, "relu_mask_kernel", grid, kEwThreads, 0,
             current_stream(), a);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(LF_OPS_NAMESPACE, LF_DISPATCH_KEY, m) {
  m.impl("conv_bias_relu", &op_conv_bias_relu<epilogue_cuda>);
  m.impl("conv_bias_relu_backward", &op_conv_bias_relu_backward<mask_cuda>);
}

}  // namespace lpips_fast
