// CUDA kernels of the fused LPIPS head.
//
// One launch walks up to kMaxLayers layers: blockIdx.y is the layer (descriptors passed by
// value in a struct), blockIdx.x = n * nblocks + block within the sample; blocks past a
// layer's work exit at once. Each block handles `pix_per_block` consecutive pixels of one
// sample and writes ONE partial sum; a second small kernel adds the partials of a sample in a
// fixed order (strided per thread, then a fixed shared-memory tree). No atomics: bit-identical
// results run after run. The block partition depends on shapes only, never on the device.
//
// Thread mapping, by layout (a layer's blocks run one of two kernels; a launch group holding
// both layouts launches both, each kernel's blocks skip the other kind's layers):
//  - pixels contiguous (NCHW, "pixel lanes", fwd_pl_kernel): lane = pixel of a 32-pixel tile
//    (coalesced loads along the row), warp w takes channels w, w + W, w + 2W, ... (W warps per
//    block). A thread keeps its first R channels of f0 and f1 in registers, so the second pass
//    (normalized squared difference, after the norms were reduced across warps in shared
//    memory) reads registers, not memory: each feature byte is read from DRAM once when
//    C <= W * R (R = 32 floats, W <= 16: C <= 512 covers alex, vgg and squeeze). Channels
//    beyond that are re-read in the second pass (correct, slower).
//  - channels contiguous (channels_last, "channel lanes", fwd_cl_kernel): a warp takes
//    kClPixels pixels at once, lane = channel; two passes over the channels, the second served
//    by L1 (see the kernel). The first version cached channels in registers like the pixel
//    lanes; at 128 registers it kept too few bytes in flight (10-20% of the copy bandwidth on
//    an H100, benchmarks/results/nvidia-h100-80gb-hbm3-gpu-check-run1.md).
// fp16/bf16 are converted to float on load; all accumulation in float (double for double).
//
// Backward: the same two mappings; pass 1 reduces S = sum_k G_k f_k per pixel, pass 2 writes
// the feature gradients. The weight gradient (only needed when the lin layers are trained) is
// a separate kernel: block = (layer, channel, chunk of wchunk flattened (n, p)), partials per
// chunk, reduced per channel in a fixed order.
//
// The same source runs on the CPU under csrc/emu (tests): see launch.h for the differences.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "../conv_head.h"
#include "../head.h"
#include "launch.h"  // GPU build vs CPU emulation (csrc/emu): launches, shared memory, limits

namespace lpips_fast {
namespace {

constexpr int kMaxWarps = 16;   // pixel-lane blocks: up to 16 warps (512 threads)
constexpr int kClWarps = 8;     // channel-lane blocks: 8 warps by default
constexpr int kClPixels = 4;    // pixels a channel-lane warp takes at once (default)
constexpr int kReduceThreads = 256;
constexpr int kWgradThreads = 256;

template <typename T, typename A>
struct Descs {
  LayerDesc<T, A> l[kMaxLayers];
};

__device__ __forceinline__ float dev_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double dev_sqrt(double x) { return sqrt(x); }

template <typename T, typename A>
__device__ __forceinline__ A ld(const T* p) {
  return static_cast<A>(*p);
}

// All lanes end with the same, bit-identical sum (xor butterfly; a + b == b + a).
template <typename A>
__device__ __forceinline__ A warp_allsum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Fixed-order block reduction of one value per thread (blockDim.x == NT, a power of two).
template <int NT, typename A>
__device__ A block_sum(A v, A* sm) {
  sm[threadIdx.x] = v;
  __syncthreads();
#pragma unroll
  for (int s = NT / 2; s > 0; s >>= 1) {
    if ((int)threadIdx.x < s) sm[threadIdx.x] += sm[threadIdx.x + s];
    __syncthreads();
  }
  return sm[0];
}

// ------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------

// A launch's pixel-lane blocks have the warps its widest layer needs (W); a narrower layer
// needs Wt = ceil(C / R) warps per 32-pixel tile, so its block takes k = W / Wt tiles at once,
// one per group of Wt warps (spare warps only keep the barriers). Without this, an all-layer
// launch ran vgg's 64-channel layer with 16 warps per tile (2x slower at 2048x2048, H100).
// The block partition gives such a block k tiles per round (set_partition: the same function).
struct TileGroups {
  int Wt, k, g, wg;  // warps per tile, tiles per round, this warp's group and rank in it
  bool active;
};

C10_HOST_DEVICE inline int tile_warps(int64_t C, int R, int W) {
  const int64_t need = (C + R - 1) / R;
  return (int)(need < 1 ? 1 : need > W ? W : need);
}

__device__ __forceinline__ TileGroups tile_groups(int64_t C, int R, int W, int warp) {
  TileGroups t;
  t.Wt = tile_warps(C, R, W);
  t.k = W / t.Wt;
  t.g = warp / t.Wt;
  t.wg = warp % t.Wt;
  t.active = t.g < t.k;
  return t;
}

template <bool PRO, typename T, typename A, int R>
__device__ void fwd_pixel_lanes(const LayerDesc<T, A>& d, int64_t n, int64_t blk, int W, A* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const TileGroups tg = tile_groups(d.C, R, W, warp);
  const int w0 = tg.g * tg.Wt;  // the group's first warp
  const int64_t pbeg = blk * d.pix_per_block;
  const int64_t pend = min(d.P, pbeg + d.pix_per_block);
  A bsum = 0;
  for (int64_t t = pbeg; t < pend; t += 32 * (int64_t)tg.k) {  // block-uniform rounds
    const int64_t p = t + 32 * (int64_t)tg.g + lane;
    const bool valid = tg.active && p < pend;
    const int64_t at0 = n * d.sN0 + (valid ? p : 0) * d.sP0;
    const int64_t at1 = n * d.sN1 + (valid ? p : 0) * d.sP1;
    const T* x0 = d.f0 + at0;
    const T* x1 = d.f1 + at1;
    T* t0 = PRO ? d.o0 + at0 : nullptr;  // the prologue's taps at this pixel
    T* t1 = PRO ? d.o1 + at1 : nullptr;
    A v0[R], v1[R];
    A s0 = 0, s1 = 0;
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int c = tg.wg + i * tg.Wt;
      v0[i] = v1[i] = A(0);
      if (valid && c < d.C) {
        v0[i] = load_feature_first<PRO, T, A>(x0, t0, d.bias, c, c * d.sC0);
        v1[i] = load_feature_first<PRO, T, A>(x1, t1, d.bias, c, c * d.sC1);
      }
      s0 += v0[i] * v0[i];
      s1 += v1[i] * v1[i];
    }
    for (int64_t c = tg.wg + (int64_t)R * tg.Wt; valid && c < d.C; c += tg.Wt) {
      const A a = load_feature_first<PRO, T, A>(x0, t0, d.bias, c, c * d.sC0);
      const A b = load_feature_first<PRO, T, A>(x1, t1, d.bias, c, c * d.sC1);
      s0 += a * a;
      s1 += b * b;
    }
    red[warp * 32 + lane] = s0;
    red[(W + warp) * 32 + lane] = s1;
    __syncthreads();
    A q0 = 0, q1 = 0;
    for (int w = w0; tg.active && w < w0 + tg.Wt; ++w) {
      q0 += red[w * 32 + lane];
      q1 += red[(W + w) * 32 + lane];
    }
    const A r0 = dev_sqrt(q0), r1 = dev_sqrt(q1);
    if (valid && tg.wg == 0) {  // stored now, so that they need no registers below
      d.r0[n * d.P + p] = r0;
      d.r1[n * d.P + p] = r1;
    }
    const A a0 = inv_norm(r0), a1 = inv_norm(r1);
    A dsum = 0;
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int c = tg.wg + i * tg.Wt;
      if (c < d.C) dsum += dist_term(weight_at(d.w, c), v0[i], v1[i], a0, a1);
    }
    for (int64_t c = tg.wg + (int64_t)R * tg.Wt; valid && c < d.C; c += tg.Wt)
      dsum += dist_term(weight_at(d.w, c), load_feature<PRO, T, A>(x0, d.bias, c, c * d.sC0),
                        load_feature<PRO, T, A>(x1, d.bias, c, c * d.sC1), a0, a1);
    __syncthreads();  // everyone has read the norms
    red[warp * 32 + lane] = dsum;
    __syncthreads();
    if (tg.active && tg.wg == 0) {
      A dv = 0;
      for (int w = w0; w < w0 + tg.Wt; ++w) dv += red[w * 32 + lane];
      if (valid) {
        if (d.dmap != nullptr) d.dmap[n * d.P + p] = dv;
        bsum += dv;
      }
    }
    __syncthreads();  // red is reused by the next round
  }
  // The block's partial: each group's lead warp sums its lanes, then the groups in order.
  if (tg.active && tg.wg == 0) {
    bsum = warp_allsum(bsum);
    if (lane == 0) red[tg.g] = bsum;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    A sum = 0;
    for (int g = 0; g < tg.k; ++g) sum += red[g];
    d.partial[n * d.nblocks + blk] = sum;
  }
}

template <bool PRO, typename T, typename A, int R>
__global__ void __launch_bounds__(kMaxWarps * 32)
    fwd_pl_kernel(const __grid_constant__ Descs<T, A> ds) {
  const LayerDesc<T, A>& d = ds.l[blockIdx.y];
  const int64_t item = blockIdx.x;
  if (d.chfast || item >= d.N * d.nblocks) return;  // block-uniform
  LF_DYNAMIC_SHARED(A, red);
  const int64_t n = item / d.nblocks, blk = item % d.nblocks;
  fwd_pixel_lanes<PRO, T, A, R>(d, n, blk, blockDim.x >> 5, red);
}

// The PX pixels a channel-lane warp takes from p0: the two base pointers and each pixel's
// offset from them (past the block's end: the last pixel again, so that every lane loads
// alike; `last` says which results count).
template <typename T, int PX>
struct ClPixels {
  const T* b0;
  const T* b1;
  int last;
  int o0[PX], o1[PX];

  template <typename A>
  __device__ __forceinline__ ClPixels(const LayerDesc<T, A>& d, int64_t n, int64_t p0,
                                      int64_t pend)
      : b0(d.f0 + n * d.sN0 + p0 * d.sP0),
        b1(d.f1 + n * d.sN1 + p0 * d.sP1),
        last((int)min((int64_t)PX, pend - p0) - 1) {
#pragma unroll
    for (int j = 0; j < PX; ++j) {
      o0[j] = min(j, last) * (int)d.sP0;
      o1[j] = min(j, last) * (int)d.sP1;
    }
  }
};

// Channel lanes (channels contiguous, sC = 1): a warp takes PX pixels at once; lane =
// channel (c = lane + 32 i, coalesced along each pixel's channel vector). Pass 1 sums the
// squares of all its pixels' channels (independent loads: many bytes in flight per warp), the
// norms are reduced across the warp (fixed xor butterfly), pass 2 reads the same channels
// again (from L1: the warp has just loaded them) for the weighted squared difference. No
// register cache, so few registers and many resident warps, whatever C is.
template <bool PRO, typename T, typename A, int PX>
__global__ void __launch_bounds__(kMaxWarps * 32, 2)
    fwd_cl_kernel(const __grid_constant__ Descs<T, A> ds) {
  const LayerDesc<T, A>& d = ds.l[blockIdx.y];
  const int64_t item = blockIdx.x;
  if (!d.chfast || item >= d.N * d.nblocks) return;  // block-uniform
  LF_SHARED(A, red, kMaxWarps);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, W = blockDim.x >> 5;
  const int C = (int)d.C;
  const int64_t n = item / d.nblocks, blk = item % d.nblocks;
  const int64_t pbeg = blk * d.pix_per_block;
  const int64_t pend = min(d.P, pbeg + d.pix_per_block);
  A bsum = 0;
  for (int64_t p0 = pbeg + (int64_t)warp * PX; p0 < pend; p0 += (int64_t)W * PX) {
    const ClPixels<T, PX> px(d, n, p0, pend);
    // the prologue's taps at the warp's first pixel (pixels past `last` repeat it: not written)
    T* t0 = PRO ? d.o0 + (px.b0 - d.f0) : nullptr;
    T* t1 = PRO ? d.o1 + (px.b1 - d.f1) : nullptr;
    A s0[PX], s1[PX], dist[PX];
#pragma unroll
    for (int j = 0; j < PX; ++j) s0[j] = s1[j] = dist[j] = A(0);
#pragma unroll 1
    for (int c = lane; c < C; c += 32) {
#pragma unroll
      for (int j = 0; j < PX; ++j) {
        A a, b;
        if (j <= px.last) {  // warp-uniform
          a = load_feature_first<PRO, T, A>(px.b0, t0, d.bias, c, px.o0[j] + c);
          b = load_feature_first<PRO, T, A>(px.b1, t1, d.bias, c, px.o1[j] + c);
        } else {
          a = load_feature<PRO, T, A>(px.b0, d.bias, c, px.o0[j] + c);
          b = load_feature<PRO, T, A>(px.b1, d.bias, c, px.o1[j] + c);
        }
        s0[j] += a * a;
        s1[j] += b * b;
      }
    }
#pragma unroll
    for (int j = 0; j < PX; ++j) {
      s0[j] = dev_sqrt(warp_allsum(s0[j]));  // now the norms r0, r1
      s1[j] = dev_sqrt(warp_allsum(s1[j]));
    }
#pragma unroll 1
    for (int c = lane; c < C; c += 32) {
      const A wc = weight_at(d.w, c);
#pragma unroll
      for (int j = 0; j < PX; ++j)
        dist[j] += dist_term(wc, load_feature<PRO, T, A>(px.b0, d.bias, c, px.o0[j] + c),
                             load_feature<PRO, T, A>(px.b1, d.bias, c, px.o1[j] + c),
                             inv_norm(s0[j]), inv_norm(s1[j]));
    }
#pragma unroll
    for (int j = 0; j < PX; ++j) {
      const A dv = warp_allsum(dist[j]);
      const int64_t q = n * d.P + p0 + j;
      if (lane == 0 && j <= px.last) {
        d.r0[q] = s0[j];
        d.r1[q] = s1[j];
        if (d.dmap != nullptr) d.dmap[q] = dv;
        bsum += dv;
      }
    }
  }
  if (lane == 0) red[warp] = bsum;
  __syncthreads();
  if (threadIdx.x == 0) {
    A sum = 0;
    for (int w = 0; w < W; ++w) sum += red[w];
    d.partial[n * d.nblocks + blk] = sum;
  }
}

// values[(l0 + layer) * N + n] = (sum of the sample's block partials, fixed order) / P
template <typename T, typename A>
__global__ void __launch_bounds__(kReduceThreads)
    value_reduce_kernel(const __grid_constant__ Descs<T, A> ds, A* values, int64_t l0) {
  LF_SHARED(A, sm, kReduceThreads);
  const LayerDesc<T, A>& d = ds.l[blockIdx.y];
  const int64_t n = blockIdx.x;
  if (n >= d.N) return;
  A s = 0;
  for (int64_t b = threadIdx.x; b < d.nblocks; b += kReduceThreads) s += d.partial[n * d.nblocks + b];
  s = block_sum<kReduceThreads>(s, sm);
  if (threadIdx.x == 0) values[(l0 + blockIdx.y) * d.N + n] = s / static_cast<A>(d.P);
}

// ------------------------------------------------------------------------------------------
// Backward (feature gradients)
// ------------------------------------------------------------------------------------------

template <typename T, typename A>
__device__ __forceinline__ void store_grads(const LayerDesc<T, A>& d, int64_t n, int64_t c,
                                            int64_t p, A g, A v0, A v1, A a0, A a1, A k0,
                                            A k1) {
  if (d.g0 != nullptr) d.g0[n * d.gsN0 + c * d.gsC0 + p * d.gsP0] = grad_cast<T>(a0 * g - k0 * v0);
  if (d.g1 != nullptr) d.g1[n * d.gsN1 + c * d.gsC1 + p * d.gsP1] = grad_cast<T>(k1 * v1 - a1 * g);
}

template <typename T, typename A, int R>
__device__ void bwd_pixel_lanes(const LayerDesc<T, A>& d, int64_t n, int64_t blk, int W, A* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const TileGroups tg = tile_groups(d.C, R, W, warp);  // as in the forward
  const int w0 = tg.g * tg.Wt;
  const int64_t pbeg = blk * d.pix_per_block;
  const int64_t pend = min(d.P, pbeg + d.pix_per_block);
  for (int64_t t = pbeg; t < pend; t += 32 * (int64_t)tg.k) {  // block-uniform rounds
    const int64_t p = t + 32 * (int64_t)tg.g + lane;
    const bool valid = tg.active && p < pend;
    const int64_t pp = valid ? p : 0;
    const T* x0 = d.f0 + n * d.sN0 + pp * d.sP0;
    const T* x1 = d.f1 + n * d.sN1 + pp * d.sP1;
    const A u = valid ? upstream(d.gvalue, d.gmap, n, pp, d.P) : A(0);
    const A r0 = valid ? d.r0[n * d.P + pp] : A(0), r1 = valid ? d.r1[n * d.P + pp] : A(0);
    const A a0 = inv_norm(r0), a1 = inv_norm(r1);
    A v0[R], v1[R];
    A s0 = 0, s1 = 0;
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int c = tg.wg + i * tg.Wt;
      v0[i] = v1[i] = A(0);
      if (valid && c < d.C) {
        v0[i] = ld<T, A>(x0 + c * d.sC0);
        v1[i] = ld<T, A>(x1 + c * d.sC1);
        const A g = grad_n(u, weight_at(d.w, c), v0[i], v1[i], a0, a1);
        s0 += g * v0[i];
        s1 += g * v1[i];
      }
    }
    for (int64_t c = tg.wg + (int64_t)R * tg.Wt; valid && c < d.C; c += tg.Wt) {
      const A a = ld<T, A>(x0 + c * d.sC0), b = ld<T, A>(x1 + c * d.sC1);
      const A g = grad_n(u, weight_at(d.w, c), a, b, a0, a1);
      s0 += g * a;
      s1 += g * b;
    }
    red[warp * 32 + lane] = s0;
    red[(W + warp) * 32 + lane] = s1;
    __syncthreads();
    A q0 = 0, q1 = 0;
    for (int w = w0; tg.active && w < w0 + tg.Wt; ++w) {
      q0 += red[w * 32 + lane];
      q1 += red[(W + w) * 32 + lane];
    }
    const A k0 = second_coef(q0, r0, a0), k1 = second_coef(q1, r1, a1);
    if (valid) {
#pragma unroll
      for (int i = 0; i < R; ++i) {
        const int c = tg.wg + i * tg.Wt;
        if (c < d.C)
          store_grads(d, n, c, p, grad_n(u, weight_at(d.w, c), v0[i], v1[i], a0, a1), v0[i], v1[i],
                      a0, a1, k0, k1);
      }
      for (int64_t c = tg.wg + (int64_t)R * tg.Wt; c < d.C; c += tg.Wt) {
        const A a = ld<T, A>(x0 + c * d.sC0), b = ld<T, A>(x1 + c * d.sC1);
        store_grads(d, n, c, p, grad_n(u, weight_at(d.w, c), a, b, a0, a1), a, b, a0, a1, k0, k1);
      }
    }
    __syncthreads();  // red is reused by the next round
  }
}

template <typename T, typename A, int R>
__global__ void __launch_bounds__(kMaxWarps * 32)
    bwd_pl_kernel(const __grid_constant__ Descs<T, A> ds) {
  const LayerDesc<T, A>& d = ds.l[blockIdx.y];
  const int64_t item = blockIdx.x;
  if (d.chfast || item >= d.N * d.nblocks) return;  // block-uniform
  if (d.g0 == nullptr && d.g1 == nullptr) return;
  LF_DYNAMIC_SHARED(A, red);
  const int64_t n = item / d.nblocks, blk = item % d.nblocks;
  bwd_pixel_lanes<T, A, R>(d, n, blk, blockDim.x >> 5, red);
}

// Channel lanes, as fwd_cl_kernel: pass 1 reduces S = sum_k G_k f_k of each of the warp's
// pixels, pass 2 re-reads the channels (L1) and writes the gradients (coalesced along C).
template <typename T, typename A, int PX>
__global__ void __launch_bounds__(kMaxWarps * 32, 2)
    bwd_cl_kernel(const __grid_constant__ Descs<T, A> ds) {
  const LayerDesc<T, A>& d = ds.l[blockIdx.y];
  const int64_t item = blockIdx.x;
  if (!d.chfast || item >= d.N * d.nblocks) return;  // block-uniform
  if (d.g0 == nullptr && d.g1 == nullptr) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, W = blockDim.x >> 5;
  const int C = (int)d.C;
  const int64_t n = item / d.nblocks, blk = item % d.nblocks;
  const int64_t pbeg = blk * d.pix_per_block;
  const int64_t pend = min(d.P, pbeg + d.pix_per_block);
  for (int64_t p0 = pbeg + (int64_t)warp * PX; p0 < pend; p0 += (int64_t)W * PX) {
    const ClPixels<T, PX> px(d, n, p0, pend);
    A u[PX], r0[PX], r1[PX], s0[PX], s1[PX];
#pragma unroll
    for (int j = 0; j < PX; ++j) {
      const int64_t q = n * d.P + p0 + min(j, px.last);
      u[j] = upstream(d.gvalue, d.gmap, n, p0 + min(j, px.last), d.P);
      r0[j] = d.r0[q];
      r1[j] = d.r1[q];
      s0[j] = s1[j] = A(0);
    }
#pragma unroll 1
    for (int c = lane; c < C; c += 32) {
      const A wc = weight_at(d.w, c);
#pragma unroll
      for (int j = 0; j < PX; ++j) {
        const A a = ld<T, A>(px.b0 + px.o0[j] + c), b = ld<T, A>(px.b1 + px.o1[j] + c);
        const A g = grad_n(u[j], wc, a, b, inv_norm(r0[j]), inv_norm(r1[j]));
        s0[j] += g * a;
        s1[j] += g * b;
      }
    }
#pragma unroll
    for (int j = 0; j < PX; ++j) {  // now the coefficients k0, k1 of the second term
      s0[j] = second_coef(warp_allsum(s0[j]), r0[j], inv_norm(r0[j]));
      s1[j] = second_coef(warp_allsum(s1[j]), r1[j], inv_norm(r1[j]));
    }
#pragma unroll 1
    for (int c = lane; c < C; c += 32) {
      const A wc = weight_at(d.w, c);
#pragma unroll
      for (int j = 0; j < PX; ++j) {
        if (j > px.last) continue;  // warp-uniform
        const A a = ld<T, A>(px.b0 + px.o0[j] + c), b = ld<T, A>(px.b1 + px.o1[j] + c);
        const A a0 = inv_norm(r0[j]), a1 = inv_norm(r1[j]);
        store_grads(d, n, c, p0 + j, grad_n(u[j], wc, a, b, a0, a1), a, b, a0, a1, s0[j], s1[j]);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// Backward (weight gradient): wpartial[chunk * C + c] = sum over a chunk of flattened (n, p)
// of u (a0 f0_c - a1 f1_c)^2; then gw[c] = sum over chunks in a fixed order.
// ------------------------------------------------------------------------------------------

template <typename T, typename A>
__global__ void __launch_bounds__(kWgradThreads)
    wgrad_kernel(const __grid_constant__ Descs<T, A> ds) {
  LF_SHARED(A, sm, kWgradThreads);
  const LayerDesc<T, A>& d = ds.l[blockIdx.z];
  const int64_t c = blockIdx.y, chunk = blockIdx.x;
  if (d.wpartial == nullptr || c >= d.C || chunk >= d.wchunks) return;  // block-uniform
  const int64_t NP = d.N * d.P;
  const int64_t qend = min(NP, (chunk + 1) * d.wchunk);
  A s = 0;
  for (int64_t q = chunk * d.wchunk + threadIdx.x; q < qend; q += kWgradThreads) {
    const int64_t n = q / d.P, p = q % d.P;
    const A u = upstream(d.gvalue, d.gmap, n, p, d.P);
    const A a0 = inv_norm(d.r0[q]), a1 = inv_norm(d.r1[q]);
    s += u * dist_term(A(1), ld<T, A>(d.f0 + n * d.sN0 + c * d.sC0 + p * d.sP0),
                       ld<T, A>(d.f1 + n * d.sN1 + c * d.sC1 + p * d.sP1), a0, a1);
  }
  s = block_sum<kWgradThreads>(s, sm);
  if (threadIdx.x == 0) d.wpartial[chunk * d.C + c] = s;
}

template <typename T, typename A>
__global__ void __launch_bounds__(kReduceThreads)
    wgrad_reduce_kernel(const __grid_constant__ Descs<T, A> ds) {
  LF_SHARED(A, sm, kReduceThreads);
  const LayerDesc<T, A>& d = ds.l[blockIdx.y];
  const int64_t c = blockIdx.x;
  if (d.wpartial == nullptr || c >= d.C) return;
  A s = 0;
  for (int64_t k = threadIdx.x; k < d.wchunks; k += kReduceThreads) s += d.wpartial[k * d.C + c];
  s = block_sum<kReduceThreads>(s, sm);
  if (threadIdx.x == 0) d.gw[c] = s;
}

// ------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------

template <typename A>
constexpr int regs_per_thread() {
  return std::is_same<A, double>::value ? 16 : 32;
}

// Tuning knob for benchmarks (benchmarks/gpu_tune.py), read per launch like the NaN-fill flag:
// LPIPS_FAST_CUDA_WARPS=N makes channel-lane blocks N warps and pixel-lane blocks at least N.
// Unset (0): the defaults below. It changes the block partition, so results may differ in
// the last bits from the default's (still deterministic for a fixed setting).
inline int warps_override() {
  const char* v = std::getenv("LPIPS_FAST_CUDA_WARPS");
  return v == nullptr ? 0 : std::max(0, std::min(kMaxWarps, std::atoi(v)));
}

// Warps per pixel-lane block for a group of layers: enough to keep every channel of the
// widest pixel-lane layer in registers (W * R >= C), up to kMaxWarps.
template <typename Desc>
int pl_warps(const std::vector<Desc>& g, int R) {
  int64_t maxc = 1;
  for (const auto& d : g)
    if (!d.chfast) maxc = std::max(maxc, d.C);
  const int64_t need = std::max<int64_t>(warps_override(), (maxc + R - 1) / R);
  return (int)std::min<int64_t>(kMaxWarps, need);
}

inline int cl_warps() {
  const int forced = warps_override();
  return forced > 0 ? forced : kClWarps;
}

// Tuning knob like LPIPS_FAST_CUDA_WARPS: LPIPS_FAST_CUDA_CL_PIXELS=2|4|8 pixels per
// channel-lane warp round (kClPixels when unset).
inline int cl_pixels() {
  const char* v = std::getenv("LPIPS_FAST_CUDA_CL_PIXELS");
  const int px = v == nullptr ? kClPixels : std::atoi(v);
  return px == 2 || px == 8 ? px : kClPixels;
}


// Block partition: depends on the shapes (and the warps, derived from shapes) only. A block
// round is W * px pixels on channel lanes, and k tiles of 32 on pixel lanes (TileGroups).
template <typename Desc>
void set_partition(Desc& d, int W, int px, int R) {
  const int64_t unit = d.chfast ? (int64_t)W * px : 32 * (int64_t)(W / tile_warps(d.C, R, W));
  const int64_t tiles = (d.P + unit - 1) / unit;
  const int64_t per_sample = std::max<int64_t>(1, max_blocks_per_layer() / std::max<int64_t>(1, d.N));
  const int64_t tpb = (tiles + per_sample - 1) / per_sample;
  d.pix_per_block = tpb * unit;
  d.nblocks = (d.P + d.pix_per_block - 1) / d.pix_per_block;
}

// One launch group (at most kMaxLayers layers): descriptors with their partitions, the
// warps of each kind of block, and the grid extents that the kernels need.
template <typename T, typename A>
struct Group {
  std::vector<LayerDesc<T, A>> g;
  int Wpl = 1, Wcl = 1, px = kClPixels;
  int64_t gx_pl = 0, gx_cl = 0, maxn = 1;

  template <typename Plan>
  Group(Plan& plan, size_t l0, size_t nl) {
    constexpr int R = regs_per_thread<A>();
    for (size_t i = 0; i < nl; ++i) g.push_back(base_desc<T, A>(plan, l0 + i));
    Wpl = pl_warps(g, R);
    Wcl = cl_warps();
    px = cl_pixels();
    for (auto& d : g) {
      set_partition(d, d.chfast ? Wcl : Wpl, px, R);
      (d.chfast ? gx_cl : gx_pl) = std::max(d.chfast ? gx_cl : gx_pl, d.N * d.nblocks);
      maxn = std::max(maxn, d.N);
    }
    TORCH_CHECK(std::max(gx_pl, gx_cl) < (int64_t(1) << 31),
                "lpips_fast: layer too large for one launch");
  }

  Descs<T, A> descs() const {
    Descs<T, A> ds{};
    for (size_t i = 0; i < g.size(); ++i) ds.l[i] = g[i];
    return ds;
  }
};

// The channel-lane forward kernel for `px` pixels per warp round (cl_pixels).
template <bool PRO, typename T, typename A>
auto fwd_cl_kernel_for(int px) {
  return px == 2   ? fwd_cl_kernel<PRO, T, A, 2>
         : px == 8 ? fwd_cl_kernel<PRO, T, A, 8>
                   : fwd_cl_kernel<PRO, T, A, kClPixels>;
}

template <typename T, typename A>
void forward_typed(FwdPlan& plan) {
  constexpr int R = regs_per_thread<A>();
  const size_t L = plan.v0.size();
  const auto stream = current_stream();
  A* values = plan.values.mutable_data_ptr<A>();
  for (size_t l0 = 0; l0 < L; l0 += kMaxLayers) {
    const size_t nl = std::min<size_t>(kMaxLayers, L - l0);
    Group<T, A> grp(plan, l0, nl);
    if (grp.g[0].N == 0) continue;
    int64_t total = 0;
    for (const auto& d : grp.g) total += d.N * d.nblocks;
    Tensor partial = new_output({total}, plan.values.options());
    int64_t off = 0;
    for (auto& d : grp.g) {
      d.partial = partial.mutable_data_ptr<A>() + off;
      off += d.N * d.nblocks;
    }
    const auto ds = grp.descs();
    const unsigned y = (unsigned)nl;
    // the prologue's kernels (head.h) where the group's layers have one: all or none do
    const bool pro = grp.g[0].bias != nullptr;
    for (const auto& d : grp.g)
      TORCH_INTERNAL_ASSERT((d.bias != nullptr) == pro, "lpips_fast: a launch group mixes "
                            "layers with and without the prologue");
    if (grp.gx_pl > 0)
      launch(pro ? fwd_pl_kernel<true, T, A, R> : fwd_pl_kernel<false, T, A, R>,
             "fwd_pl_kernel", dim3((unsigned)grp.gx_pl, y), grp.Wpl * 32,
             2 * grp.Wpl * 32 * sizeof(A), stream, ds);
    if (grp.gx_cl > 0)
      launch(pro ? fwd_cl_kernel_for<true, T, A>(grp.px) : fwd_cl_kernel_for<false, T, A>(grp.px),
             "fwd_cl_kernel", dim3((unsigned)grp.gx_cl, y), grp.Wcl * 32, 0, stream, ds);
    launch(value_reduce_kernel<T, A>, "value_reduce_kernel", dim3((unsigned)grp.maxn, y),
           kReduceThreads, 0, stream, ds, values, (int64_t)l0);
  }
}

void forward_cuda(FwdPlan& plan) {
  const DeviceGuard guard(plan.values.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.dtype,
                                  "lpips_fast_forward_cuda", [&] {
                                    using A = at::opmath_type<scalar_t>;
                                    forward_typed<scalar_t, A>(plan);
                                  });
}

template <typename T, typename A>
void backward_typed(BwdPlan& plan) {
  constexpr int R = regs_per_thread<A>();
  const size_t L = plan.v0.size();
  const auto stream = current_stream();
  for (size_t l0 = 0; l0 < L; l0 += kMaxLayers) {
    const size_t nl = std::min<size_t>(kMaxLayers, L - l0);
    Group<T, A> grp(plan, l0, nl);
    if (grp.g[0].N == 0) continue;  // (the weight gradients were allocated as zeros)
    int64_t wtotal = 0, wgx = 1, maxc = 1;
    for (size_t i = 0; i < nl; ++i) {
      auto& d = grp.g[i];
      d.wchunk = wgrad_chunk();
      d.wchunks = (d.N * d.P + d.wchunk - 1) / d.wchunk;
      if (plan.gws[l0 + i].numel() > 0) {
        wtotal += d.wchunks * d.C;
        wgx = std::max(wgx, d.wchunks);
        maxc = std::max(maxc, d.C);
      }
    }
    TORCH_CHECK(wgx < (int64_t(1) << 31), "lpips_fast: layer too large for one launch");
    Tensor wpart = new_output({std::max<int64_t>(wtotal, 1)}, plan.gvalues.options());
    int64_t off = 0;
    for (size_t i = 0; i < nl; ++i) {
      if (plan.gws[l0 + i].numel() == 0) continue;
      grp.g[i].wpartial = wpart.mutable_data_ptr<A>() + off;
      grp.g[i].gw = plan.gws[l0 + i].mutable_data_ptr<A>();
      off += grp.g[i].wchunks * grp.g[i].C;
    }
    const auto ds = grp.descs();
    const unsigned y = (unsigned)nl;
    if (plan.want0 || plan.want1) {
      if (grp.gx_pl > 0)
        launch(bwd_pl_kernel<T, A, R>, "bwd_pl_kernel", dim3((unsigned)grp.gx_pl, y),
               grp.Wpl * 32, 2 * grp.Wpl * 32 * sizeof(A), stream, ds);
      const auto bwd_cl = grp.px == 2   ? bwd_cl_kernel<T, A, 2>
                          : grp.px == 8 ? bwd_cl_kernel<T, A, 8>
                                        : bwd_cl_kernel<T, A, kClPixels>;
      if (grp.gx_cl > 0)
        launch(bwd_cl, "bwd_cl_kernel", dim3((unsigned)grp.gx_cl, y), grp.Wcl * 32,
               0, stream, ds);
    }
    if (wtotal > 0) {
      TORCH_CHECK(maxc <= 65535, "lpips_fast: the weight gradient needs C <= 65535 on CUDA");
      launch(wgrad_kernel<T, A>, "wgrad_kernel", dim3((unsigned)wgx, (unsigned)maxc, y),
             kWgradThreads, 0, stream, ds);
      launch(wgrad_reduce_kernel<T, A>, "wgrad_reduce_kernel", dim3((unsigned)maxc, y),
             kReduceThreads, 0, stream, ds);
    }
  }
}

void backward_cuda(BwdPlan& plan) {
  const DeviceGuard guard(plan.v0[0].t.device());  // the features' device
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.dtype,
                                  "lpips_fast_backward_cuda", [&] {
                                    using A = at::opmath_type<scalar_t>;
                                    backward_typed<scalar_t, A>(plan);
                                  });
}

}  // namespace

TORCH_LIBRARY_IMPL(LF_OPS_NAMESPACE, LF_DISPATCH_KEY, m) {
  m.impl("head_forward", &op_head_forward<forward_cuda>);
  m.impl("head_all_forward", &op_head_all_forward<forward_cuda>);
  m.impl("head_backward", &op_head_backward<backward_cuda>);
  m.impl("head_all_backward", &op_head_all_backward<backward_cuda>);
  m.impl("conv_bias_relu_head", &op_conv_bias_relu_head<forward_cuda>);
}

}  // namespace lpips_fast
