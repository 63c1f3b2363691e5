// CUDA kernels of the fused LPIPS head.
//
// One launch walks up to kMaxLayers layers: blockIdx.y is the layer (descriptors passed by
// value in a struct), blockIdx.x = n * nblocks + block within the sample; blocks past a
// layer's work exit at once. Each block handles `pix_per_block` consecutive pixels of one
// sample and writes ONE partial sum; a second small kernel adds the partials of a sample in a
// fixed order (strided per thread, then a fixed shared-memory tree). No atomics: bit-identical
// results run after run. The block partition depends on shapes only, never on the device.
//
// Thread mapping, chosen per layer (block-uniform branch):
//  - pixels contiguous (NCHW, "pixel lanes"): lane = pixel of a 32-pixel tile (coalesced loads
//    along the row), warp w takes channels w, w + W, w + 2W, ... (W warps per block). A thread
//    keeps its first R channels of f0 and f1 in registers, so the second pass (normalized
//    squared difference, after the norms were reduced across warps in shared memory) reads
//    registers, not memory: each feature byte is read from DRAM once when C <= W * R
//    (R = 32 floats, W <= 16: C <= 512 covers alex, vgg and squeeze). Channels beyond that are
//    re-read in the second pass (correct, slower).
//  - channels contiguous (channels_last, "channel lanes"): one warp per pixel, lane = channel
//    (coalesced along the channel vector), lanes keep channels lane + 32 i (i < R) in registers
//    (C <= 1024 fully cached); sums over channels with a fixed xor-butterfly warp reduction.
// fp16/bf16 are converted to float on load; all accumulation in float (double for double).
//
// Backward: the same two mappings; pass 1 reduces S = sum_k G_k f_k per pixel, pass 2 writes
// the feature gradients from registers. The weight gradient (only needed when the lin layers
// are trained) is a separate kernel: block = (layer, channel, chunk of 2048 flattened (n, p)),
// partials per chunk, reduced per channel in a fixed order.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "../head.h"

namespace lpips_fast {
namespace {

constexpr int kMaxWarps = 16;
constexpr int kReduceThreads = 256;
constexpr int kWgradThreads = 256;
constexpr int64_t kWgradChunk = 2048;

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

template <typename T, typename A, int R>
__device__ void fwd_pixel_lanes(const LayerDesc<T, A>& d, int64_t n, int64_t blk, int W, A* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t pbeg = blk * d.pix_per_block;
  const int64_t pend = min(d.P, pbeg + d.pix_per_block);
  A bsum = 0;
  for (int64_t t0 = pbeg; t0 < pend; t0 += 32) {
    const int64_t p = t0 + lane;
    const bool valid = p < pend;
    const T* x0 = d.f0 + n * d.sN0 + (valid ? p : 0) * d.sP0;
    const T* x1 = d.f1 + n * d.sN1 + (valid ? p : 0) * d.sP1;
    A v0[R], v1[R];
    A s0 = 0, s1 = 0;
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int64_t c = warp + (int64_t)i * W;
      v0[i] = v1[i] = A(0);
      if (valid && c < d.C) {
        v0[i] = ld<T, A>(x0 + c * d.sC0);
        v1[i] = ld<T, A>(x1 + c * d.sC1);
      }
      s0 += v0[i] * v0[i];
      s1 += v1[i] * v1[i];
    }
    for (int64_t c = warp + (int64_t)R * W; valid && c < d.C; c += W) {
      const A a = ld<T, A>(x0 + c * d.sC0), b = ld<T, A>(x1 + c * d.sC1);
      s0 += a * a;
      s1 += b * b;
    }
    red[warp * 32 + lane] = s0;
    red[(W + warp) * 32 + lane] = s1;
    __syncthreads();
    A q0 = 0, q1 = 0;
    for (int w = 0; w < W; ++w) {
      q0 += red[w * 32 + lane];
      q1 += red[(W + w) * 32 + lane];
    }
    const A r0 = dev_sqrt(q0), r1 = dev_sqrt(q1);
    const A a0 = inv_norm(r0), a1 = inv_norm(r1);
    A dsum = 0;
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int64_t c = warp + (int64_t)i * W;
      if (c < d.C) dsum += dist_term(weight_at(d.w, c), v0[i], v1[i], a0, a1);
    }
    for (int64_t c = warp + (int64_t)R * W; valid && c < d.C; c += W)
      dsum += dist_term(weight_at(d.w, c), ld<T, A>(x0 + c * d.sC0), ld<T, A>(x1 + c * d.sC1), a0,
                        a1);
    __syncthreads();  // everyone has read the norms
    red[warp * 32 + lane] = dsum;
    __syncthreads();
    if (warp == 0) {
      A dv = 0;
      for (int w = 0; w < W; ++w) dv += red[w * 32 + lane];
      if (valid) {
        d.r0[n * d.P + p] = r0;
        d.r1[n * d.P + p] = r1;
        if (d.dmap != nullptr) d.dmap[n * d.P + p] = dv;
        bsum += dv;
      }
    }
    __syncthreads();  // red is reused by the next tile
  }
  if (warp == 0) {
    bsum = warp_allsum(bsum);
    if (lane == 0) d.partial[n * d.nblocks + blk] = bsum;
  }
}

template <typename T, typename A, int R>
__device__ void fwd_channel_lanes(const LayerDesc<T, A>& d, int64_t n, int64_t blk, int W,
                                  A* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t pbeg = blk * d.pix_per_block;
  const int64_t pend = min(d.P, pbeg + d.pix_per_block);
  A bsum = 0;
  for (int64_t p = pbeg + warp; p < pend; p += W) {  // warp-uniform
    const T* x0 = d.f0 + n * d.sN0 + p * d.sP0;
    const T* x1 = d.f1 + n * d.sN1 + p * d.sP1;
    A v0[R], v1[R];
    A s0 = 0, s1 = 0;
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int64_t c = lane + 32 * (int64_t)i;
      v0[i] = v1[i] = A(0);
      if (c < d.C) {
        v0[i] = ld<T, A>(x0 + c * d.sC0);
        v1[i] = ld<T, A>(x1 + c * d.sC1);
      }
      s0 += v0[i] * v0[i];
      s1 += v1[i] * v1[i];
    }
    for (int64_t c = lane + 32 * (int64_t)R; c < d.C; c += 32) {
      const A a = ld<T, A>(x0 + c * d.sC0), b = ld<T, A>(x1 + c * d.sC1);
      s0 += a * a;
      s1 += b * b;
    }
    const A r0 = dev_sqrt(warp_allsum(s0)), r1 = dev_sqrt(warp_allsum(s1));
    const A a0 = inv_norm(r0), a1 = inv_norm(r1);
    A dsum = 0;
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int64_t c = lane + 32 * (int64_t)i;
      if (c < d.C) dsum += dist_term(weight_at(d.w, c), v0[i], v1[i], a0, a1);
    }
    for (int64_t c = lane + 32 * (int64_t)R; c < d.C; c += 32)
      dsum += dist_term(weight_at(d.w, c), ld<T, A>(x0 + c * d.sC0), ld<T, A>(x1 + c * d.sC1), a0,
                        a1);
    const A dv = warp_allsum(dsum);
    if (lane == 0) {
      d.r0[n * d.P + p] = r0;
      d.r1[n * d.P + p] = r1;
      if (d.dmap != nullptr) d.dmap[n * d.P + p] = dv;
      bsum += dv;
    }
  }
  if (lane == 0) red[warp] = bsum;
  __syncthreads();
  if (threadIdx.x == 0) {
    A s = 0;
    for (int w = 0; w < W; ++w) s += red[w];
    d.partial[n * d.nblocks + blk] = s;
  }
}

template <typename T, typename A, int R>
__global__ void __launch_bounds__(kMaxWarps * 32)
    fwd_kernel(const __grid_constant__ Descs<T, A> ds) {
  const LayerDesc<T, A>& d = ds.l[blockIdx.y];
  const int64_t item = blockIdx.x;
  if (item >= d.N * d.nblocks) return;  // block-uniform
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* red = reinterpret_cast<A*>(smem_raw);
  const int W = blockDim.x >> 5;
  const int64_t n = item / d.nblocks, blk = item % d.nblocks;
  if (d.chfast)
    fwd_channel_lanes<T, A, R>(d, n, blk, W, red);
  else
    fwd_pixel_lanes<T, A, R>(d, n, blk, W, red);
}

// values[(l0 + layer) * N + n] = (sum of the sample's block partials, fixed order) / P
template <typename T, typename A>
__global__ void __launch_bounds__(kReduceThreads)
    value_reduce_kernel(const __grid_constant__ Descs<T, A> ds, A* values, int64_t l0) {
  __shared__ A sm[kReduceThreads];
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
  if (d.g0 != nullptr) d.g0[n * d.gsN0 + c * d.gsC0 + p * d.gsP0] = static_cast<T>(a0 * g - k0 * v0);
  if (d.g1 != nullptr) d.g1[n * d.gsN1 + c * d.gsC1 + p * d.gsP1] = static_cast<T>(k1 * v1 - a1 * g);
}

template <typename T, typename A, int R>
__device__ void bwd_pixel_lanes(const LayerDesc<T, A>& d, int64_t n, int64_t blk, int W, A* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t pbeg = blk * d.pix_per_block;
  const int64_t pend = min(d.P, pbeg + d.pix_per_block);
  for (int64_t t0 = pbeg; t0 < pend; t0 += 32) {
    const int64_t p = t0 + lane;
    const bool valid = p < pend;
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
      const int64_t c = warp + (int64_t)i * W;
      v0[i] = v1[i] = A(0);
      if (valid && c < d.C) {
        v0[i] = ld<T, A>(x0 + c * d.sC0);
        v1[i] = ld<T, A>(x1 + c * d.sC1);
        const A g = grad_n(u, weight_at(d.w, c), v0[i], v1[i], a0, a1);
        s0 += g * v0[i];
        s1 += g * v1[i];
      }
    }
    for (int64_t c = warp + (int64_t)R * W; valid && c < d.C; c += W) {
      const A a = ld<T, A>(x0 + c * d.sC0), b = ld<T, A>(x1 + c * d.sC1);
      const A g = grad_n(u, weight_at(d.w, c), a, b, a0, a1);
      s0 += g * a;
      s1 += g * b;
    }
    red[warp * 32 + lane] = s0;
    red[(W + warp) * 32 + lane] = s1;
    __syncthreads();
    A q0 = 0, q1 = 0;
    for (int w = 0; w < W; ++w) {
      q0 += red[w * 32 + lane];
      q1 += red[(W + w) * 32 + lane];
    }
    const A k0 = second_coef(q0, r0, a0), k1 = second_coef(q1, r1, a1);
    if (valid) {
#pragma unroll
      for (int i = 0; i < R; ++i) {
        const int64_t c = warp + (int64_t)i * W;
        if (c < d.C)
          store_grads(d, n, c, p, grad_n(u, weight_at(d.w, c), v0[i], v1[i], a0, a1), v0[i], v1[i],
                      a0, a1, k0, k1);
      }
      for (int64_t c = warp + (int64_t)R * W; c < d.C; c += W) {
        const A a = ld<T, A>(x0 + c * d.sC0), b = ld<T, A>(x1 + c * d.sC1);
        store_grads(d, n, c, p, grad_n(u, weight_at(d.w, c), a, b, a0, a1), a, b, a0, a1, k0, k1);
      }
    }
    __syncthreads();  // red is reused by the next tile
  }
}

template <typename T, typename A, int R>
__device__ void bwd_channel_lanes(const LayerDesc<T, A>& d, int64_t n, int64_t blk, int W) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t pbeg = blk * d.pix_per_block;
  const int64_t pend = min(d.P, pbeg + d.pix_per_block);
  for (int64_t p = pbeg + warp; p < pend; p += W) {  // warp-uniform
    const T* x0 = d.f0 + n * d.sN0 + p * d.sP0;
    const T* x1 = d.f1 + n * d.sN1 + p * d.sP1;
    const A u = upstream(d.gvalue, d.gmap, n, p, d.P);
    const A r0 = d.r0[n * d.P + p], r1 = d.r1[n * d.P + p];
    const A a0 = inv_norm(r0), a1 = inv_norm(r1);
    A v0[R], v1[R];
    A s0 = 0, s1 = 0;
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int64_t c = lane + 32 * (int64_t)i;
      v0[i] = v1[i] = A(0);
      if (c < d.C) {
        v0[i] = ld<T, A>(x0 + c * d.sC0);
        v1[i] = ld<T, A>(x1 + c * d.sC1);
        const A g = grad_n(u, weight_at(d.w, c), v0[i], v1[i], a0, a1);
        s0 += g * v0[i];
        s1 += g * v1[i];
      }
    }
    for (int64_t c = lane + 32 * (int64_t)R; c < d.C; c += 32) {
      const A a = ld<T, A>(x0 + c * d.sC0), b = ld<T, A>(x1 + c * d.sC1);
      const A g = grad_n(u, weight_at(d.w, c), a, b, a0, a1);
      s0 += g * a;
      s1 += g * b;
    }
    const A k0 = second_coef(warp_allsum(s0), r0, a0), k1 = second_coef(warp_allsum(s1), r1, a1);
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int64_t c = lane + 32 * (int64_t)i;
      if (c < d.C)
        store_grads(d, n, c, p, grad_n(u, weight_at(d.w, c), v0[i], v1[i], a0, a1), v0[i], v1[i],
                    a0, a1, k0, k1);
    }
    for (int64_t c = lane + 32 * (int64_t)R; c < d.C; c += 32) {
      const A a = ld<T, A>(x0 + c * d.sC0), b = ld<T, A>(x1 + c * d.sC1);
      store_grads(d, n, c, p, grad_n(u, weight_at(d.w, c), a, b, a0, a1), a, b, a0, a1, k0, k1);
    }
  }
}

template <typename T, typename A, int R>
__global__ void __launch_bounds__(kMaxWarps * 32)
    bwd_kernel(const __grid_constant__ Descs<T, A> ds) {
  const LayerDesc<T, A>& d = ds.l[blockIdx.y];
  const int64_t item = blockIdx.x;
  if (item >= d.N * d.nblocks) return;  // block-uniform
  if (d.g0 == nullptr && d.g1 == nullptr) return;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* red = reinterpret_cast<A*>(smem_raw);
  const int W = blockDim.x >> 5;
  const int64_t n = item / d.nblocks, blk = item % d.nblocks;
  if (d.chfast)
    bwd_channel_lanes<T, A, R>(d, n, blk, W);
  else
    bwd_pixel_lanes<T, A, R>(d, n, blk, W, red);
}

// ------------------------------------------------------------------------------------------
// Backward (weight gradient): wpartial[chunk * C + c] = sum over a chunk of flattened (n, p)
// of u (a0 f0_c - a1 f1_c)^2; then gw[c] = sum over chunks in a fixed order.
// ------------------------------------------------------------------------------------------

template <typename T, typename A>
__global__ void __launch_bounds__(kWgradThreads)
    wgrad_kernel(const __grid_constant__ Descs<T, A> ds) {
  __shared__ A sm[kWgradThreads];
  const LayerDesc<T, A>& d = ds.l[blockIdx.z];
  const int64_t c = blockIdx.y, chunk = blockIdx.x;
  if (d.wpartial == nullptr || c >= d.C || chunk >= d.wchunks) return;  // block-uniform
  const int64_t NP = d.N * d.P;
  const int64_t qend = min(NP, (chunk + 1) * kWgradChunk);
  A s = 0;
  for (int64_t q = chunk * kWgradChunk + threadIdx.x; q < qend; q += kWgradThreads) {
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
  __shared__ A sm[kReduceThreads];
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

// Warps per block for a group of layers: enough warps for the pixel-lane layers to keep
// every channel in registers (up to kMaxWarps); 8 when only channel-lane layers.
template <typename Desc>
int warps_for(const std::vector<Desc>& g, int R) {
  const int forced = warps_override();
  int64_t maxc = 0;
  bool any_pl = false;
  for (const auto& d : g)
    if (!d.chfast) {
      any_pl = true;
      maxc = std::max(maxc, d.C);
    }
  if (!any_pl) return forced > 0 ? forced : 8;
  const int64_t need = std::max<int64_t>(std::max(forced, 1), (maxc + R - 1) / R);
  return (int)std::min<int64_t>(kMaxWarps, need);
}

// Block partition: depends on the shapes (and the warps, derived from shapes) only.
template <typename Desc>
void set_partition(Desc& d, int W) {
  const int64_t unit = d.chfast ? W : 32;  // pixels per tile
  const int64_t tiles = (d.P + unit - 1) / unit;
  const int64_t max_blocks = 65536;
  const int64_t per_sample = std::max<int64_t>(1, max_blocks / std::max<int64_t>(1, d.N));
  const int64_t tpb = (tiles + per_sample - 1) / per_sample;
  d.pix_per_block = tpb * unit;
  d.nblocks = (d.P + d.pix_per_block - 1) / d.pix_per_block;
}

template <typename T, typename A>
void forward_typed(FwdPlan& plan) {
  constexpr int R = regs_per_thread<A>();
  const size_t L = plan.v0.size();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto aopts = plan.values.options();
  A* values = plan.values.mutable_data_ptr<A>();
  for (size_t l0 = 0; l0 < L; l0 += kMaxLayers) {
    const size_t nl = std::min<size_t>(kMaxLayers, L - l0);
    std::vector<LayerDesc<T, A>> g;
    for (size_t i = 0; i < nl; ++i) g.push_back(base_desc<T, A>(plan, l0 + i));
    const int W = warps_for(g, R);
    int64_t total = 0, gx = 1, maxn = 1;
    for (auto& d : g) {
      set_partition(d, W);
      total += d.N * d.nblocks;
      gx = std::max(gx, d.N * d.nblocks);
      maxn = std::max(maxn, d.N);
    }
    Tensor partial = at::empty({total}, aopts);
    Descs<T, A> ds{};
    int64_t off = 0;
    for (size_t i = 0; i < nl; ++i) {
      g[i].partial = partial.mutable_data_ptr<A>() + off;
      off += g[i].N * g[i].nblocks;
      ds.l[i] = g[i];
    }
    if (g[0].N == 0) continue;
    TORCH_CHECK(gx < (int64_t(1) << 31), "lpips_fast: layer too large for one launch");
    const size_t smem = 2 * W * 32 * sizeof(A);
    fwd_kernel<T, A, R><<<dim3((unsigned)gx, (unsigned)nl), W * 32, smem, stream>>>(ds);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    value_reduce_kernel<T, A><<<dim3((unsigned)maxn, (unsigned)nl), kReduceThreads, 0, stream>>>(
        ds, values, (int64_t)l0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void forward_cuda(FwdPlan& plan) {
  const c10::cuda::CUDAGuard guard(plan.values.device());
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
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto aopts = plan.gvalues.options();
  for (size_t l0 = 0; l0 < L; l0 += kMaxLayers) {
    const size_t nl = std::min<size_t>(kMaxLayers, L - l0);
    std::vector<LayerDesc<T, A>> g;
    for (size_t i = 0; i < nl; ++i) g.push_back(base_desc<T, A>(plan, l0 + i));
    const int W = warps_for(g, R);
    int64_t gx = 1, wtotal = 0, wgx = 1, maxc = 1;
    for (size_t i = 0; i < nl; ++i) {
      auto& d = g[i];
      set_partition(d, W);
      gx = std::max(gx, d.N * d.nblocks);
      d.wchunks = (d.N * d.P + kWgradChunk - 1) / kWgradChunk;
      if (plan.gws[l0 + i].numel() > 0) {
        wtotal += d.wchunks * d.C;
        wgx = std::max(wgx, d.wchunks);
        maxc = std::max(maxc, d.C);
      }
    }
    Tensor wpart = at::empty({std::max<int64_t>(wtotal, 1)}, aopts);
    Descs<T, A> ds{};
    int64_t off = 0;
    for (size_t i = 0; i < nl; ++i) {
      auto& d = g[i];
      if (plan.gws[l0 + i].numel() > 0) {
        d.wpartial = wpart.mutable_data_ptr<A>() + off;
        d.gw = plan.gws[l0 + i].mutable_data_ptr<A>();
        off += d.wchunks * d.C;
      }
      ds.l[i] = d;
    }
    if (g[0].N == 0) continue;
    TORCH_CHECK(gx < (int64_t(1) << 31) && wgx < (int64_t(1) << 31),
                "lpips_fast: layer too large for one launch");
    if (plan.want0 || plan.want1) {
      const size_t smem = 2 * W * 32 * sizeof(A);
      bwd_kernel<T, A, R><<<dim3((unsigned)gx, (unsigned)nl), W * 32, smem, stream>>>(ds);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (wtotal > 0) {
      TORCH_CHECK(maxc < 65536, "lpips_fast: weight gradient needs C < 65536 on CUDA");
      wgrad_kernel<T, A><<<dim3((unsigned)wgx, (unsigned)maxc, (unsigned)nl), kWgradThreads, 0,
                           stream>>>(ds);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      wgrad_reduce_kernel<T, A><<<dim3((unsigned)maxc, (unsigned)nl), kReduceThreads, 0, stream>>>(
          ds);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

void backward_cuda(BwdPlan& plan) {
  const c10::cuda::CUDAGuard guard(plan.gvalues.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.dtype,
                                  "lpips_fast_backward_cuda", [&] {
                                    using A = at::opmath_type<scalar_t>;
                                    backward_typed<scalar_t, A>(plan);
                                  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lpips_fast, CUDA, m) {
  m.impl("head_forward", &op_head_forward<forward_cuda>);
  m.impl("head_all_forward", &op_head_all_forward<forward_cuda>);
  m.impl("head_backward", &op_head_backward<backward_cuda>);
  m.impl("head_all_backward", &op_head_all_backward<backward_cuda>);
}

}  // namespace lpips_fast
