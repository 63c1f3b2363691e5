// Per-layer descriptors and the per-pixel math of the fused LPIPS head, shared by the CPU
// kernels (csrc/cpu/head_cpu.cpp) and the CUDA kernels (csrc/cuda/head_cuda.cu).
//
// Math (see lpips_fast/reference.py, the oracle), per sample n and pixel p, over channels c:
//   r = sqrt(sum_c f_c^2),  a = 1 / (r + eps),  n_c = a f_c           (eps = 1e-10)
//   d(p) = sum_c w_c (a0 f0_c - a1 f1_c)^2                            (w_c = 1 without weights)
//   value = mean_p d(p)
// d is computed in two passes over a pixel's channels (norms first, then the squared
// difference of the normalized vectors), never by the one-pass expansion
// a0^2 S00 - 2 a0 a1 S01 + a1^2 S11, which cancels catastrophically when f0 ~ f1.
//
// Backward, with u(p) = grad_value[n] / P + grad_map[n, p] and G_c = u 2 w_c (a0 f0_c - a1 f1_c):
//   dL/df0_c =  a0 G_c - a0^2 (f0_c / r0) sum_k G_k f0_k
//   dL/df1_c = -a1 G_c + a1^2 (f1_c / r1) sum_k G_k f1_k
//   dL/dw_c  = sum_{n,p} u(p) (a0 f0_c - a1 f1_c)^2
// At r = 0 (an all-zero vector) the second term is 0: the gradient stays finite.
//
// Prologue (op conv_bias_relu_head, csrc/conv_head.h): with `bias` set, f0 / f1 are the
// bias-free convolution's output y and the features are relu(y + b_c) (bias_relu.h, the
// epilogue's rounding); the kernel that first reads an element also writes that feature to
// o0 / o1 (the tap, for the rest of the network and autograd; f's strides), so y is read
// once and the tap written once, instead of an epilogue pass and the head reading the tap.
//
// Layout: every feature tensor is addressed as base + n*sN + c*sC + p*sP with p = y*w + x,
// which covers NCHW-contiguous (sC = P, sP = 1), channels_last (sC = 1, sP = C) and a batch
// broadcast by expand (sN = 0) without copies.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/Half.h>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "bias_relu.h"

namespace lpips_fast {

constexpr double kEps = 1e-10;

// Largest number of layers one CUDA launch walks (SqueezeNet has 7); more are split.
constexpr int kMaxLayers = 8;

// One layer of one call. T: feature dtype; A: accumulator dtype (float, or double for double).
template <typename T, typename A>
struct LayerDesc {
  const T* f0;
  const T* f1;
  const A* w;       // C channel weights, or nullptr for the plain channel sum
  int64_t sN0, sC0, sP0;
  int64_t sN1, sC1, sP1;
  int64_t N, C, P;
  // forward outputs
  A* r0;            // N x P norms (written by forward, read by backward)
  A* r1;
  A* dmap;          // N x P distance map, or nullptr
  A* partial;       // N x nblocks per-block partial sums (forward), deterministic order
  // backward inputs / outputs
  const A* gvalue;  // N upstream gradients of the per-sample values
  const A* gmap;    // N x P upstream gradient of the map, or nullptr
  T* g0;            // gradient for f0 (nullptr: not wanted)
  T* g1;
  int64_t gsN0, gsC0, gsP0;
  int64_t gsN1, gsC1, gsP1;
  A* wpartial;      // per-block, per-channel partial sums of the weight gradient, or nullptr
  A* gw;            // C weight gradients (CUDA: written by the final reduction), or nullptr
  int64_t wchunks;  // CUDA: chunks of flattened (n, p) of the weight-gradient kernel
  int64_t wchunk;   // CUDA: elements per chunk
  // work decomposition (fixed by shapes only, so the result is independent of thread counts)
  int64_t nblocks;  // blocks per sample
  int64_t pix_per_block;
  int32_t chfast;   // channels contiguous (channels_last): cooperate over channels
  // forward prologue (see the top), or nullptr
  const T* bias;    // C elements
  T* o0;            // the taps, addressed with f0's / f1's strides
  T* o1;
};

// Feature c at offset `off` of a pixel's base pointer f: f itself, or with the prologue
// (PRO, bias != nullptr) relu(y + b_c). load_feature_first also writes the prologue's
// feature to out + off (out: the tap at the same pixel): for the pass that reads it first.
template <bool PRO, typename T, typename A>
C10_HOST_DEVICE inline A load_feature(const T* f, const T* bias, int64_t c, int64_t off) {
  if constexpr (PRO) return static_cast<A>(bias_relu<T, A>(f[off], bias[c]));
  return static_cast<A>(f[off]);
}

template <bool PRO, typename T, typename A>
C10_HOST_DEVICE inline A load_feature_first(const T* f, T* out, const T* bias, int64_t c,
                                            int64_t off) {
  if constexpr (PRO) {
    const T v = bias_relu<T, A>(f[off], bias[c]);
    out[off] = v;
    return static_cast<A>(v);
  }
  return static_cast<A>(f[off]);
}

template <typename A>
C10_HOST_DEVICE inline A inv_norm(A r) {
  return A(1) / (r + A(kEps));
}

template <typename A>
C10_HOST_DEVICE inline A weight_at(const A* w, int64_t c) {
  return w == nullptr ? A(1) : w[c];
}

// Weighted squared difference of one channel of the normalized vectors.
template <typename A>
C10_HOST_DEVICE inline A dist_term(A wc, A x0, A x1, A a0, A a1) {
  const A diff = x0 * a0 - x1 * a1;
  return wc * diff * diff;
}

// G_c = u * 2 w_c (n0_c - n1_c)
template <typename A>
C10_HOST_DEVICE inline A grad_n(A u, A wc, A x0, A x1, A a0, A a1) {
  return u * A(2) * wc * (x0 * a0 - x1 * a1);
}

// Coefficient k of the second term, dL/df_c = +-a G_c -+ k f_c, with S = sum_k G_k f_k:
// k = a^2 S / r, and 0 at r = 0 (then f = 0 and the term vanishes; finite gradient).
// S / r is formed first: it is bounded by |G|, while a / r could overflow for tiny r.
template <typename A>
C10_HOST_DEVICE inline A second_coef(A S, A r, A a) {
  return r > A(0) ? (S / r) * a * a : A(0);
}

// A feature gradient in the features' dtype. At an all-zero feature vector the gradient is
// a0 G_c with a0 = 1/eps = 1e10: finite in float32, but past float16's range (65504). Float16
// saturates to its largest finite value with the right sign, so the promise of a finite
// gradient holds in every dtype (bfloat16 and wider hold 1e10 |G_c|).
template <typename T, typename A>
C10_HOST_DEVICE inline T grad_cast(A x) {
  if constexpr (std::is_same<T, c10::Half>::value) {
    const A m = A(65504);
    x = x > m ? m : (x < -m ? -m : x);
  }
  return static_cast<T>(x);
}

// Upstream gradient of pixel p of sample n.
template <typename A>
C10_HOST_DEVICE inline A upstream(const A* gvalue, const A* gmap, int64_t n, int64_t p,
                                  int64_t P) {
  A u = gvalue[n] / A(P);
  if (gmap != nullptr) u += gmap[n * P + p];
  return u;
}

}  // namespace lpips_fast
