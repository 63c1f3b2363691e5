// CPU kernels of the fused LPIPS head.
//
// Work decomposition: every (layer, sample, block of kBlock = 64 consecutive pixels) is one
// work item; at::parallel_for runs over the flattened items of all layers. Block boundaries
// depend on the shapes only, each item writes its own partial sum, and the partials are then
// added in a fixed order: results are bit-identical whatever the number of threads.
//
// Inside a block:
//  - pixels contiguous (NCHW): channels outer, the block's pixels inner; per-pixel
//    accumulators live in small arrays, so the inner loops are unit-stride and vectorize.
//    The second pass re-reads the block's C x 64 values from cache.
//  - channels contiguous (channels_last): pixels outer, channels inner; the forward's channel
//    sums are `omp simd` reductions (2-3x faster than the lanes below, measured), and so is
//    the backward's sum_c G_c f_c.
//  - anything else: pixels outer, channels inner, with kLanes independent partial sums so the
//    reduction vectorizes without -ffast-math.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common.h"
#include "../conv_head.h"
#include "../head.h"

namespace lpips_fast {
namespace {

constexpr int64_t kBlock = 64;
constexpr int kLanes = 8;

int64_t num_blocks(int64_t P) { return (P + kBlock - 1) / kBlock; }

// Sum of kLanes partial sums in a fixed order.
template <typename A>
inline A lane_sum(const A* acc) {
  A s = 0;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

// ---------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------

// Pixels contiguous (sP0 == sP1 == 1): channels outer, pixels inner.
template <typename T, typename A>
A fwd_block_pixels(const LayerDesc<T, A>& d, int64_t n, int64_t p0, int64_t cnt) {
  A s0[kBlock], s1[kBlock], a0[kBlock], a1[kBlock], dd[kBlock];
  for (int64_t i = 0; i < cnt; ++i) s0[i] = s1[i] = dd[i] = A(0);
  const T* b0 = d.f0 + n * d.sN0 + p0;
  const T* b1 = d.f1 + n * d.sN1 + p0;
  for (int64_t c = 0; c < d.C; ++c) {
    const T* x0 = b0 + c * d.sC0;
    const T* x1 = b1 + c * d.sC1;
    for (int64_t i = 0; i < cnt; ++i) {
      const A v0 = static_cast<A>(x0[i]), v1 = static_cast<A>(x1[i]);
      s0[i] += v0 * v0;
      s1[i] += v1 * v1;
    }
  }
  for (int64_t i = 0; i < cnt; ++i) {
    s0[i] = std::sqrt(s0[i]);
    s1[i] = std::sqrt(s1[i]);
    a0[i] = inv_norm(s0[i]);
    a1[i] = inv_norm(s1[i]);
  }
  for (int64_t c = 0; c < d.C; ++c) {
    const T* x0 = b0 + c * d.sC0;
    const T* x1 = b1 + c * d.sC1;
    const A wc = weight_at(d.w, c);
    for (int64_t i = 0; i < cnt; ++i)
      dd[i] += dist_term(wc, static_cast<A>(x0[i]), static_cast<A>(x1[i]), a0[i], a1[i]);
  }
  A bs = 0;
  A* r0 = d.r0 + n * d.P + p0;
  A* r1 = d.r1 + n * d.P + p0;
  for (int64_t i = 0; i < cnt; ++i) {
    r0[i] = s0[i];
    r1[i] = s1[i];
    bs += dd[i];
  }
  if (d.dmap != nullptr) std::copy(dd, dd + cnt, d.dmap + n * d.P + p0);
  return bs;
}

// Channels inner; UNIT: both channel strides are 1 (channels_last), lets the loops vectorize.
template <bool UNIT, typename T, typename A>
A fwd_block_channels(const LayerDesc<T, A>& d, int64_t n, int64_t p0, int64_t cnt) {
  const int64_t sC0 = UNIT ? 1 : d.sC0, sC1 = UNIT ? 1 : d.sC1;
  const int64_t C = d.C, Cv = C - C % kLanes;
  A bs = 0;
  for (int64_t i = 0; i < cnt; ++i) {
    const int64_t p = p0 + i;
    const T* x0 = d.f0 + n * d.sN0 + p * d.sP0;
    const T* x1 = d.f1 + n * d.sN1 + p * d.sP1;
    A q0[kLanes] = {}, q1[kLanes] = {};
    for (int64_t c = 0; c < Cv; c += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        const A v0 = static_cast<A>(x0[(c + j) * sC0]), v1 = static_cast<A>(x1[(c + j) * sC1]);
        q0[j] += v0 * v0;
        q1[j] += v1 * v1;
      }
    for (int64_t c = Cv; c < C; ++c) {
      const A v0 = static_cast<A>(x0[c * sC0]), v1 = static_cast<A>(x1[c * sC1]);
      q0[c - Cv] += v0 * v0;
      q1[c - Cv] += v1 * v1;
    }
    const A r0 = std::sqrt(lane_sum(q0)), r1 = std::sqrt(lane_sum(q1));
    const A a0 = inv_norm(r0), a1 = inv_norm(r1);
    A q[kLanes] = {};
    for (int64_t c = 0; c < Cv; c += kLanes)
      for (int j = 0; j < kLanes; ++j)
        q[j] += dist_term(weight_at(d.w, c + j), static_cast<A>(x0[(c + j) * sC0]),
                          static_cast<A>(x1[(c + j) * sC1]), a0, a1);
    for (int64_t c = Cv; c < C; ++c)
      q[c - Cv] += dist_term(weight_at(d.w, c), static_cast<A>(x0[c * sC0]),
                             static_cast<A>(x1[c * sC1]), a0, a1);
    const A dv = lane_sum(q);
    d.r0[n * d.P + p] = r0;
    d.r1[n * d.P + p] = r1;
    if (d.dmap != nullptr) d.dmap[n * d.P + p] = dv;
    bs += dv;
  }
  return bs;
}

// channels_last: each pixel's channels are contiguous. `omp simd` reductions vectorize the
// channel sums with a vector width fixed at compile time, so results stay deterministic.
template <typename T, typename A>
A fwd_block_cl(const LayerDesc<T, A>& d, int64_t n, int64_t p0, int64_t cnt) {
  const int64_t C = d.C;
  const A* __restrict__ w = d.w;
  A bs = 0;
  for (int64_t i = 0; i < cnt; ++i) {
    const int64_t p = p0 + i;
    const T* __restrict__ x0 = d.f0 + n * d.sN0 + p * d.sP0;
    const T* __restrict__ x1 = d.f1 + n * d.sN1 + p * d.sP1;
    A q0 = 0, q1 = 0;
#pragma omp simd reduction(+ : q0, q1)
    for (int64_t c = 0; c < C; ++c) {
      const A v0 = static_cast<A>(x0[c]), v1 = static_cast<A>(x1[c]);
      q0 += v0 * v0;
      q1 += v1 * v1;
    }
    const A r0 = std::sqrt(q0), r1 = std::sqrt(q1);
    const A a0 = inv_norm(r0), a1 = inv_norm(r1);
    A q = 0;
    if (w != nullptr) {
#pragma omp simd reduction(+ : q)
      for (int64_t c = 0; c < C; ++c)
        q += dist_term(w[c], static_cast<A>(x0[c]), static_cast<A>(x1[c]), a0, a1);
    } else {
#pragma omp simd reduction(+ : q)
      for (int64_t c = 0; c < C; ++c)
        q += dist_term(A(1), static_cast<A>(x0[c]), static_cast<A>(x1[c]), a0, a1);
    }
    d.r0[n * d.P + p] = r0;
    d.r1[n * d.P + p] = r1;
    if (d.dmap != nullptr) d.dmap[n * d.P + p] = q;
    bs += q;
  }
  return bs;
}

template <typename T, typename A>
A fwd_block(const LayerDesc<T, A>& d, int64_t n, int64_t b) {
  const int64_t p0 = b * kBlock, cnt = std::min(kBlock, d.P - p0);
  if (d.chfast) return fwd_block_cl(d, n, p0, cnt);
  if (d.sP0 == 1 && d.sP1 == 1) return fwd_block_pixels(d, n, p0, cnt);
  return fwd_block_channels<false>(d, n, p0, cnt);
}

// The prologue (head.h) of one block: the tap of both inputs, relu(y + b), written for the
// block's pixels; the block's head then reads the tap (from cache) with the code above, so
// the CPU twin of the CUDA prologue shares its per-pixel math.
template <typename T, typename A>
void prologue_block(const LayerDesc<T, A>& d, int64_t n, int64_t b) {
  const int64_t p0 = b * kBlock, cnt = std::min(kBlock, d.P - p0);
  const T* ys[2] = {d.f0 + n * d.sN0, d.f1 + n * d.sN1};
  T* outs[2] = {d.o0 + n * d.sN0, d.o1 + n * d.sN1};
  const int64_t sC[2] = {d.sC0, d.sC1}, sP[2] = {d.sP0, d.sP1};
  for (int k = 0; k < 2; ++k) {
    const bool chin = sC[k] == 1 && d.C > 1;  // channels_last: channels inner
    const int64_t outer = chin ? cnt : d.C, inner = chin ? d.C : cnt;
    for (int64_t i = 0; i < outer; ++i)
      for (int64_t j = 0; j < inner; ++j) {
        const int64_t c = chin ? j : i, p = p0 + (chin ? i : j);
        const int64_t off = c * sC[k] + p * sP[k];
        outs[k][off] = bias_relu<T, A>(ys[k][off], d.bias[c]);
      }
  }
}

// d as the head reads it after prologue_block: f0 / f1 the taps, no prologue.
template <typename T, typename A>
LayerDesc<T, A> tap_desc(LayerDesc<T, A> d) {
  if (d.bias == nullptr) return d;
  d.f0 = d.o0;
  d.f1 = d.o1;
  d.bias = nullptr;
  d.o0 = d.o1 = nullptr;
  return d;
}

// Calls fn(layer, n, block) for every work item of every layer, in parallel.
template <typename Desc, typename Fn>
void for_all_blocks(const std::vector<Desc>& descs, Fn fn) {
  std::vector<int64_t> start(descs.size() + 1, 0);
  for (size_t l = 0; l < descs.size(); ++l)
    start[l + 1] = start[l] + descs[l].N * descs[l].nblocks;
  const int64_t total = start.back();
  if (total == 0) return;
  at::parallel_for(0, total, 4, [&](int64_t begin, int64_t end) {
    size_t l = std::upper_bound(start.begin(), start.end(), begin) - start.begin() - 1;
    for (int64_t it = begin; it < end; ++it) {
      while (it >= start[l + 1]) ++l;
      const int64_t local = it - start[l];
      fn(l, local / descs[l].nblocks, local % descs[l].nblocks);
    }
  });
}

template <typename T, typename A>
void forward_typed(FwdPlan& plan) {
  const size_t L = plan.v0.size();
  std::vector<LayerDesc<T, A>> descs, taps;
  std::vector<std::vector<A>> partials(L);
  for (size_t l = 0; l < L; ++l) {
    auto d = base_desc<T, A>(plan, l);
    d.pix_per_block = kBlock;
    d.nblocks = num_blocks(d.P);
    partials[l].assign(d.N * d.nblocks, A(0));
    d.partial = partials[l].data();
    descs.push_back(d);
    taps.push_back(tap_desc(d));
  }
  for_all_blocks(descs, [&](size_t l, int64_t n, int64_t b) {
    const auto& d = descs[l];
    if (d.bias != nullptr) prologue_block(d, n, b);
    d.partial[n * d.nblocks + b] = fwd_block(taps[l], n, b);
  });
  A* values = plan.values.mutable_data_ptr<A>();
  for (size_t l = 0; l < L; ++l) {
    const auto& d = descs[l];
    for (int64_t n = 0; n < d.N; ++n) {
      // Fixed order over blocks, in double: a float sum of P / 64 block partials drifts
      // with the pixel count (7e-6 relative at 4096 x 4096, where torch's cascade sum of
      // the same terms is off by 5e-8); in double it stays at float rounding.
      double s = 0;
      for (int64_t b = 0; b < d.nblocks; ++b) s += d.partial[n * d.nblocks + b];
      values[l * d.N + n] = static_cast<A>(s / static_cast<double>(d.P));
    }
  }
}

void forward_cpu(FwdPlan& plan) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.dtype, "lpips_fast_forward_cpu",
                                  [&] {
                                    using A = at::opmath_type<scalar_t>;
                                    forward_typed<scalar_t, A>(plan);
                                  });
}

// ---------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------

template <typename T, typename A>
void bwd_block_pixels(const LayerDesc<T, A>& d, int64_t n, int64_t b) {
  const int64_t p0 = b * kBlock, cnt = std::min(kBlock, d.P - p0);
  A u[kBlock], a0[kBlock], a1[kBlock], S0[kBlock], S1[kBlock];
  for (int64_t i = 0; i < cnt; ++i) {
    const int64_t p = p0 + i;
    u[i] = upstream(d.gvalue, d.gmap, n, p, d.P);
    a0[i] = inv_norm(d.r0[n * d.P + p]);
    a1[i] = inv_norm(d.r1[n * d.P + p]);
    S0[i] = S1[i] = A(0);
  }
  const T* b0 = d.f0 + n * d.sN0 + p0;
  const T* b1 = d.f1 + n * d.sN1 + p0;
  A* wrow = d.wpartial != nullptr ? d.wpartial + (n * d.nblocks + b) * d.C : nullptr;
  for (int64_t c = 0; c < d.C; ++c) {
    const T* x0 = b0 + c * d.sC0;
    const T* x1 = b1 + c * d.sC1;
    const A wc = weight_at(d.w, c);
    for (int64_t i = 0; i < cnt; ++i) {
      const A v0 = static_cast<A>(x0[i]), v1 = static_cast<A>(x1[i]);
      const A g = grad_n(u[i], wc, v0, v1, a0[i], a1[i]);
      S0[i] += g * v0;
      S1[i] += g * v1;
    }
    if (wrow != nullptr) {
      A ws = 0;
      for (int64_t i = 0; i < cnt; ++i)
        ws += u[i] * dist_term(A(1), static_cast<A>(x0[i]), static_cast<A>(x1[i]), a0[i], a1[i]);
      wrow[c] = ws;
    }
  }
  if (d.g0 == nullptr && d.g1 == nullptr) return;
  for (int64_t i = 0; i < cnt; ++i) {
    S0[i] = second_coef(S0[i], d.r0[n * d.P + p0 + i], a0[i]);
    S1[i] = second_coef(S1[i], d.r1[n * d.P + p0 + i], a1[i]);
  }
  for (int64_t c = 0; c < d.C; ++c) {
    const T* x0 = b0 + c * d.sC0;
    const T* x1 = b1 + c * d.sC1;
    const A wc = weight_at(d.w, c);
    T* o0 = d.g0 != nullptr ? d.g0 + n * d.gsN0 + c * d.gsC0 + p0 * d.gsP0 : nullptr;
    T* o1 = d.g1 != nullptr ? d.g1 + n * d.gsN1 + c * d.gsC1 + p0 * d.gsP1 : nullptr;
    for (int64_t i = 0; i < cnt; ++i) {
      const A v0 = static_cast<A>(x0[i]), v1 = static_cast<A>(x1[i]);
      const A g = grad_n(u[i], wc, v0, v1, a0[i], a1[i]);
      if (o0 != nullptr) o0[i * d.gsP0] = grad_cast<T>(a0[i] * g - S0[i] * v0);
      if (o1 != nullptr) o1[i * d.gsP1] = grad_cast<T>(S1[i] * v1 - a1[i] * g);
    }
  }
}

template <bool UNIT, typename T, typename A>
void bwd_block_channels(const LayerDesc<T, A>& d, int64_t n, int64_t b) {
  const int64_t p0 = b * kBlock, cnt = std::min(kBlock, d.P - p0);
  const int64_t sC0 = UNIT ? 1 : d.sC0, sC1 = UNIT ? 1 : d.sC1;
  const int64_t C = d.C, Cv = C - C % kLanes;
  A* wrow = d.wpartial != nullptr ? d.wpartial + (n * d.nblocks + b) * d.C : nullptr;
  if (wrow != nullptr) std::fill(wrow, wrow + C, A(0));
  for (int64_t i = 0; i < cnt; ++i) {
    const int64_t p = p0 + i;
    const T* x0 = d.f0 + n * d.sN0 + p * d.sP0;
    const T* x1 = d.f1 + n * d.sN1 + p * d.sP1;
    const A u = upstream(d.gvalue, d.gmap, n, p, d.P);
    const A r0 = d.r0[n * d.P + p], r1 = d.r1[n * d.P + p];
    const A a0 = inv_norm(r0), a1 = inv_norm(r1);
    A S0 = 0, S1 = 0;  // sum_c G_c f_c for each input
    if (UNIT) {
      const A* __restrict__ w = d.w;
#pragma omp simd reduction(+ : S0, S1)
      for (int64_t c = 0; c < C; ++c) {
        const A v0 = static_cast<A>(x0[c]), v1 = static_cast<A>(x1[c]);
        const A g = grad_n(u, w != nullptr ? w[c] : A(1), v0, v1, a0, a1);
        S0 += g * v0;
        S1 += g * v1;
      }
    } else {
      A q0[kLanes] = {}, q1[kLanes] = {};
      for (int64_t c = 0; c < Cv; c += kLanes)
        for (int j = 0; j < kLanes; ++j) {
          const A v0 = static_cast<A>(x0[(c + j) * sC0]), v1 = static_cast<A>(x1[(c + j) * sC1]);
          const A g = grad_n(u, weight_at(d.w, c + j), v0, v1, a0, a1);
          q0[j] += g * v0;
          q1[j] += g * v1;
        }
      for (int64_t c = Cv; c < C; ++c) {
        const A v0 = static_cast<A>(x0[c * sC0]), v1 = static_cast<A>(x1[c * sC1]);
        const A g = grad_n(u, weight_at(d.w, c), v0, v1, a0, a1);
        q0[c - Cv] += g * v0;
        q1[c - Cv] += g * v1;
      }
      S0 = lane_sum(q0);
      S1 = lane_sum(q1);
    }
    if (wrow != nullptr)
      for (int64_t c = 0; c < C; ++c)
        wrow[c] += u * dist_term(A(1), static_cast<A>(x0[c * sC0]), static_cast<A>(x1[c * sC1]),
                                 a0, a1);
    if (d.g0 == nullptr && d.g1 == nullptr) continue;
    const A k0 = second_coef(S0, r0, a0), k1 = second_coef(S1, r1, a1);
    T* o0 = d.g0 != nullptr ? d.g0 + n * d.gsN0 + p * d.gsP0 : nullptr;
    T* o1 = d.g1 != nullptr ? d.g1 + n * d.gsN1 + p * d.gsP1 : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      const A v0 = static_cast<A>(x0[c * sC0]), v1 = static_cast<A>(x1[c * sC1]);
      const A g = grad_n(u, weight_at(d.w, c), v0, v1, a0, a1);
      if (o0 != nullptr) o0[c * d.gsC0] = grad_cast<T>(a0 * g - k0 * v0);
      if (o1 != nullptr) o1[c * d.gsC1] = grad_cast<T>(k1 * v1 - a1 * g);
    }
  }
}

template <typename T, typename A>
void backward_typed(BwdPlan& plan) {
  const size_t L = plan.v0.size();
  std::vector<LayerDesc<T, A>> descs;
  std::vector<std::vector<A>> wpart(L);
  for (size_t l = 0; l < L; ++l) {
    auto d = base_desc<T, A>(plan, l);
    d.pix_per_block = kBlock;
    d.nblocks = num_blocks(d.P);
    if (plan.gws[l].numel() > 0) {
      wpart[l].assign(d.N * d.nblocks * d.C, A(0));
      d.wpartial = wpart[l].data();
    }
    descs.push_back(d);
  }
  for_all_blocks(descs, [&](size_t l, int64_t n, int64_t b) {
    const auto& d = descs[l];
    if (d.chfast)
      bwd_block_channels<true>(d, n, b);
    else if (d.sP0 == 1 && d.sP1 == 1)
      bwd_block_pixels(d, n, b);
    else
      bwd_block_channels<false>(d, n, b);
  });
  // Weight gradients: per channel, the per-block partials added in a fixed order.
  for (size_t l = 0; l < L; ++l) {
    const auto& d = descs[l];
    if (d.wpartial == nullptr) continue;
    A* gw = plan.gws[l].mutable_data_ptr<A>();
    const int64_t rows = d.N * d.nblocks;
    at::parallel_for(0, d.C, 16, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double s = 0;  // in double, as the forward's block sums (see there)
        for (int64_t r = 0; r < rows; ++r) s += d.wpartial[r * d.C + c];
        gw[c] = static_cast<A>(s);
      }
    });
  }
}

void backward_cpu(BwdPlan& plan) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.dtype,
                                  "lpips_fast_backward_cpu", [&] {
                                    using A = at::opmath_type<scalar_t>;
                                    backward_typed<scalar_t, A>(plan);
                                  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lpips_fast, CPU, m) {
  m.impl("head_forward", &op_head_forward<forward_cpu>);
  m.impl("head_all_forward", &op_head_all_forward<forward_cpu>);
  m.impl("head_backward", &op_head_backward<backward_cpu>);
  m.impl("head_all_backward", &op_head_all_backward<backward_cpu>);
  m.impl("conv_bias_relu_head", &op_conv_bias_relu_head<forward_cpu>);
}

}  // namespace lpips_fast
