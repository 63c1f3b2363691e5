// The fused backbone layer conv + bias + ReLU + max-pool (a conv whose ReLU output is both an
// LPIPS tap and the input of the next slice's max-pool): host code and per-element math
// shared by the CPU kernels (cpu/conv_pool_cpu.cpp) and the CUDA kernels
// (cuda/conv_pool_cuda.cu, also run by the emulator).
//
// Forward:  y = conv(x, weight) WITHOUT bias (ATen), then ONE pass over y that writes
//           out = relu(y + b) (the tap) AND pooled = max_pool2d(out, k, s, ceil_mode). One
//           work item per pooled element: it takes the max over its window (recomputing
//           relu(y + b) for each element, the same rounding as conv.h's bias_relu) and
//           writes `out` for the elements it owns: rows [ph*sh, ph*sh + sh), the last
//           pooled row also every row below, the same for columns. Overlapping windows
//           (3x3 stride 2) read y up to (k/s)^2 times, from cache; out is a new tensor
//           (written in place, a neighbour's window could read a relu'd y).
// Backward: nothing saved but the tap `out` (which the ReLU mask needs anyway): the window
//           argmax is recomputed from it. Saving indices would write and read one more
//           pooled-sized tensor (int64 in eager: twice the pooled float32 bytes) to spare
//           re-reading out's windows, which a GPU serves from cache. ONE pass, per element
//           e of out, in out's memory order:
//             g[e] = out[e] <= 0 ? 0 : grad_out[e] + sum of grad_pooled[w] over the windows
//                                                    w (ascending) whose argmax is e
//           (an element the ReLU zeroed skips its windows: eager's threshold_backward
//           gives 0 there whatever the sum), then ONE convolution_backward (conv.h).
//
// Tie-breaking and rounding, as PyTorch's max_pool2d: the window's max starts at -inf and
// takes an element when `v > max || isnan(v)` in row-major order (the first of equal maxima;
// the last NaN), so all-zero windows (common after a ReLU) pick their first element. The
// sum of a window's gradients: on the CPU added in the dtype itself (ATen's CPU kernel does
// grad_in[idx] += grad_out, rounding each step for half/bfloat16), on CUDA in the op-math
// type, rounded once (ATen's CUDA kernels); then + grad_out rounded once (autograd's sum).
// Supported: pool padding 0, dilation 1 (LPIPS's pools); the Python side falls back to
// conv_bias_relu + F.max_pool2d for anything else.
#pragma once

#include <ATen/NumericUtils.h>
#include <ATen/OpMathType.h>

#include <optional>
#include <vector>

#include "conv.h"

namespace lpips_fast {

// A dense 4-D tensor's sizes and strides; `cl`: its memory order is channels_last.
struct Dense4 {
  int64_t n, c, h, w;
  int64_t sn, sc, sh, sw;
  bool cl;

  // (n, c, h, w) of the i-th element in memory order.
  C10_HOST_DEVICE void coords(int64_t i, int64_t& in, int64_t& ic, int64_t& ih,
                              int64_t& iw) const {
    if (cl) {
      ic = i % c; i /= c;
      iw = i % w; i /= w;
    } else {
      iw = i % w; i /= w;
      ih = i % h; i /= h;
      ic = i % c; in = i / c;
      return;
    }
    ih = i % h;
    in = i / h;
  }
  C10_HOST_DEVICE int64_t offset(int64_t in, int64_t ic, int64_t ih, int64_t iw) const {
    return in * sn + ic * sc + ih * sh + iw * sw;
  }
};

inline Dense4 dense4(const at::Tensor& t) {
  return {t.size(0), t.size(1), t.size(2), t.size(3), t.stride(0), t.stride(1),
          t.stride(2), t.stride(3), !t.is_contiguous()};
}

struct PoolShape {
  int64_t kh, kw, sh, sw;
};

// The max and the argmax (row, column) of one (non-empty) window, by PyTorch's rule (see
// the top).
template <typename A>
struct WindowMax {
  A val;
  int64_t h, w;
};

template <typename A, typename Get>
C10_HOST_DEVICE inline WindowMax<A> window_max(Get get, int64_t h0, int64_t h1, int64_t w0,
                                               int64_t w1) {
  // PyTorch starts from (-inf, the first element); after the first element that state is
  // (its value, the first element) whatever the value (-inf and NaN included)
  WindowMax<A> m{get(h0, w0), h0, w0};
  for (int64_t h = h0; h < h1; ++h) {
    for (int64_t w = h == h0 ? w0 + 1 : w0; w < w1; ++w) {
      const A v = get(h, w);
      if (v > m.val || at::_isnan(v)) m = {v, h, w};
    }
  }
  return m;
}

template <typename T>
struct PoolFwdArgs {
  const T* y;
  T* out;           // y's strides
  T* pooled;        // dense in y's memory order
  const T* bias;
  Dense4 yg, pg;    // geometry of y (and out), of pooled
  PoolShape p;
};

// Pooled element i (in pooled's memory order): its max, and `out` on the elements it owns.
template <typename T, typename A>
C10_HOST_DEVICE inline void pool_fwd_element(const PoolFwdArgs<T>& a, int64_t i) {
  int64_t n, c, ph, pw;
  a.pg.coords(i, n, c, ph, pw);
  const T b = a.bias[c];
  const int64_t base = a.yg.offset(n, c, 0, 0), H = a.yg.h, W = a.yg.w;
  auto at_hw = [&](int64_t h, int64_t w) { return base + h * a.yg.sh + w * a.yg.sw; };
  const int64_t h0 = ph * a.p.sh, w0 = pw * a.p.sw;
  const auto m = window_max<A>(
      [&](int64_t h, int64_t w) { return static_cast<A>(bias_relu<T, A>(a.y[at_hw(h, w)], b)); },
      h0, h0 + a.p.kh < H ? h0 + a.p.kh : H, w0, w0 + a.p.kw < W ? w0 + a.p.kw : W);
  a.pooled[i] = static_cast<T>(m.val);
  const int64_t h1 = ph == a.pg.h - 1 ? H : h0 + a.p.sh, w1 = pw == a.pg.w - 1 ? W : w0 + a.p.sw;
  for (int64_t h = h0; h < h1; ++h)
    for (int64_t w = w0; w < w1; ++w) a.out[at_hw(h, w)] = bias_relu<T, A>(a.y[at_hw(h, w)], b);
}

template <typename T>
struct PoolBwdArgs {
  const T* out;        // dense
  const T* grad_out;   // out's strides, or nullptr (no gradient reached the tap)
  const T* grad_pooled;
  T* g;                // out's strides
  Dense4 og, pg;       // geometry of out, of grad_pooled
  PoolShape p;
};

// Element i of out (in its memory order): the gradient of the convolution's output there.
// Acc: the type the window gradients are summed in (see the top).
template <typename T, typename Acc>
C10_HOST_DEVICE inline void pool_bwd_element(const PoolBwdArgs<T>& a, int64_t i) {
  using A = at::opmath_type<T>;
  const T o = a.out[i];
  if (o <= T(0)) {  // relu_mask (conv.h): 0 whatever the gradient; NaN passes
    a.g[i] = T(0);
    return;
  }
  int64_t n, c, h, w;
  a.og.coords(i, n, c, h, w);
  const int64_t base = a.og.offset(n, c, 0, 0), H = a.og.h, W = a.og.w;
  auto get = [&](int64_t hh, int64_t ww) {
    return static_cast<A>(a.out[base + hh * a.og.sh + ww * a.og.sw]);
  };
  // the windows holding (h, w): ph * sh <= h < ph * sh + kh, ph < PH
  const int64_t ph0 = h < a.p.kh ? 0 : (h - a.p.kh) / a.p.sh + 1;
  const int64_t pw0 = w < a.p.kw ? 0 : (w - a.p.kw) / a.p.sw + 1;
  const int64_t ph1 = h / a.p.sh < a.pg.h - 1 ? h / a.p.sh : a.pg.h - 1;
  const int64_t pw1 = w / a.p.sw < a.pg.w - 1 ? w / a.p.sw : a.pg.w - 1;
  Acc sum = Acc(0);
  for (int64_t ph = ph0; ph <= ph1; ++ph) {
    for (int64_t pw = pw0; pw <= pw1; ++pw) {
      const int64_t hs = ph * a.p.sh, ws = pw * a.p.sw;
      const auto m = window_max<A>(get, hs, hs + a.p.kh < H ? hs + a.p.kh : H, ws,
                                   ws + a.p.kw < W ? ws + a.p.kw : W);
      if (m.h == h && m.w == w) sum += static_cast<Acc>(a.grad_pooled[a.pg.offset(n, c, ph, pw)]);
    }
  }
  const T pooled_grad = static_cast<T>(sum);
  a.g[i] = a.grad_out == nullptr
               ? pooled_grad
               : static_cast<T>(static_cast<A>(a.grad_out[i]) + static_cast<A>(pooled_grad));
}

// PyTorch's pooled length (padding 0, dilation 1): a ceil-mode window may overhang the
// end but must start inside the input.
inline int64_t pool_out_size(int64_t in, int64_t k, int64_t s, bool ceil_mode) {
  const int64_t span = in - k + (ceil_mode ? s - 1 : 0);
  if (span < 0) return 0;
  int64_t out = span / s + 1;
  if (ceil_mode && (out - 1) * s >= in) --out;
  return out;
}

inline PoolShape check_pool(at::IntArrayRef kernel, at::IntArrayRef stride) {
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && kernel[0] >= 1 && kernel[1] >= 1 &&
                  stride[0] >= 1 && stride[1] >= 1,
              "lpips_fast conv_bias_relu_pool: pool kernel and stride must be two positive "
              "numbers each, got ", kernel, " and ", stride);
  return {kernel[0], kernel[1], stride[0], stride[1]};
}

inline std::vector<int64_t> pooled_sizes(const at::Tensor& y, const PoolShape& p,
                                         bool ceil_mode) {
  const int64_t ph = pool_out_size(y.size(2), p.kh, p.sh, ceil_mode);
  const int64_t pw = pool_out_size(y.size(3), p.kw, p.sw, ceil_mode);
  TORCH_CHECK(ph >= 1 && pw >= 1, "lpips_fast conv_bias_relu_pool: a ", y.size(2), " x ",
              y.size(3), " convolution output is too small for a ", p.kh, " x ", p.kw,
              " pool (stride ", p.sh, " x ", p.sw, ")");
  return {y.size(0), y.size(1), ph, pw};
}

inline at::MemoryFormat format_of(const at::Tensor& dense) {
  return dense.is_contiguous() ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
}

// The kernels' arguments from the host tensors (dense, one layout; see the ops below).
template <typename T>
PoolFwdArgs<T> pool_fwd_args(const at::Tensor& y, const at::Tensor& out, const at::Tensor& pooled,
                             const at::Tensor& bias, const PoolShape& p) {
  return {y.const_data_ptr<T>(), out.mutable_data_ptr<T>(), pooled.mutable_data_ptr<T>(),
          bias.const_data_ptr<T>(), dense4(y), dense4(pooled), p};
}

template <typename T>
PoolBwdArgs<T> pool_bwd_args(const at::Tensor& out, const std::optional<at::Tensor>& grad_out,
                             const at::Tensor& grad_pooled, const at::Tensor& g,
                             const PoolShape& p) {
  return {out.const_data_ptr<T>(), grad_out ? grad_out->const_data_ptr<T>() : nullptr,
          grad_pooled.const_data_ptr<T>(), g.mutable_data_ptr<T>(), dense4(out),
          dense4(grad_pooled), p};
}

// The op entry points; `fwd` and `bwd` launch the device's kernel.
using PoolFwdFn = void (*)(const at::Tensor& y, const at::Tensor& out, const at::Tensor& pooled,
                           const at::Tensor& bias, const PoolShape& p);
using PoolBwdFn = void (*)(const at::Tensor& out, const std::optional<at::Tensor>& grad_out,
                           const at::Tensor& grad_pooled, const at::Tensor& g,
                           const PoolShape& p);

template <PoolFwdFn fwd>
std::tuple<at::Tensor, at::Tensor> op_conv_bias_relu_pool(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef pool_kernel, at::IntArrayRef pool_stride,
    bool ceil_mode) {
  check_conv(x, w, stride, padding);
  check_bias(x, w, bias);
  const PoolShape p = check_pool(pool_kernel, pool_stride);
  at::Tensor y = conv_nobias(x, w, stride, padding);
  if (channel_inner(y) == 0) y = y.contiguous();  // (ATen returns NCHW or channels_last)
  const auto sizes = pooled_sizes(y, p, ceil_mode);
  at::Tensor out = new_output_like(y);
  at::Tensor pooled = at::empty(sizes, y.options().memory_format(format_of(y)));
  if (debug_nan_fill() && pooled.numel() > 0)
    pooled.fill_(std::numeric_limits<double>::quiet_NaN());
  if (pooled.numel() > 0) fwd(y, out, pooled, bias.contiguous().view({-1}), p);
  return {out, pooled};
}

template <PoolBwdFn bwd>
ConvGrads op_conv_bias_relu_pool_backward(
    const std::optional<at::Tensor>& grad_out, const at::Tensor& grad_pooled,
    const at::Tensor& out, const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef pool_kernel, at::IntArrayRef pool_stride,
    bool ceil_mode, std::array<bool, 3> output_mask) {
  check_conv(x, w, stride, padding);
  const PoolShape p = check_pool(pool_kernel, pool_stride);
  const at::Tensor o = channel_inner(out) == 0 ? out.contiguous() : out;
  const auto sizes = pooled_sizes(o, p, ceil_mode);
  const bool has_grad = grad_out.has_value() && grad_out->defined();
  TORCH_CHECK(grad_pooled.sizes() == at::IntArrayRef(sizes) &&
                  grad_pooled.scalar_type() == o.scalar_type() &&
                  grad_pooled.device() == o.device() && o.device() == x.device() &&
                  (!has_grad || (grad_out->sizes() == o.sizes() &&
                                 grad_out->scalar_type() == o.scalar_type() &&
                                 grad_out->device() == o.device())),
              "lpips_fast conv_bias_relu_pool_backward: grad_pooled (", grad_pooled.sizes(), ", ",
              grad_pooled.scalar_type(), ", ", grad_pooled.device(), ") must be ",
              at::IntArrayRef(sizes), " and grad_out (if given) ", o.sizes(), ", both ",
              o.scalar_type(), " on ", x.device());
  std::optional<at::Tensor> gr;
  if (has_grad)
    gr = grad_out->strides() == o.strides() ? *grad_out : grad_out->contiguous(format_of(o));
  at::Tensor g = new_output_like(o);
  if (g.numel() > 0) bwd(o, gr, grad_pooled.contiguous(format_of(o)), g, p);
  return conv_grads(g, x, w, stride, padding, output_mask);
}

}  // namespace lpips_fast
