// The few places where head_cuda.cu differs between the GPU build (nvcc) and the CPU emulation
// of its kernels (csrc/emu, built with -DLPIPS_FAST_EMU by the tests): includes, shared-memory
// declarations, launches, stream and device guard, the op namespace and dispatch key, and the
// device limits that tests lower to reach multi-tile paths at small sizes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <algorithm>
#include <cstdlib>
#include <utility>

#ifdef LPIPS_FAST_EMU
#include "../emu/cuda_emu.h"
#include <c10/util/Exception.h>
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
// LF_SHARED(T, name, count): a block's static shared array; LF_DYNAMIC_SHARED(T, name): its
// dynamic shared memory (the size given at launch).
#define LF_SHARED(T, name, count) __shared__ T name[count]
#define LF_DYNAMIC_SHARED(T, name) \
  extern __shared__ __align__(16) unsigned char name##_raw[]; \
  T* name = reinterpret_cast<T*>(name##_raw)
#endif

namespace lpips_fast {

#ifdef LPIPS_FAST_EMU
#define LF_OPS_NAMESPACE lpips_fast_emu
#define LF_DISPATCH_KEY CPU
using Stream = cudaStream_t;
inline Stream current_stream() { return nullptr; }
struct DeviceGuard {
  template <typename D>
  explicit DeviceGuard(const D&) {}
};
// Tests lower the device limits (LPIPS_FAST_EMU_MAX_BLOCKS, LPIPS_FAST_EMU_WGRAD_CHUNK) so
// that small inputs take the paths that only large ones take on a GPU.
inline int64_t emu_limit(const char* name, int64_t dflt) {
  const char* v = std::getenv(name);
  return v != nullptr && std::atoll(v) > 0 ? std::atoll(v) : dflt;
}
#else
#define LF_OPS_NAMESPACE lpips_fast
#define LF_DISPATCH_KEY CUDA
using Stream = cudaStream_t;
inline Stream current_stream() { return c10::cuda::getCurrentCUDAStream(); }
using DeviceGuard = c10::cuda::CUDAGuard;
inline int64_t emu_limit(const char*, int64_t dflt) { return dflt; }
#endif

// Blocks per layer and sample group (grid x); the partition depends on shapes only.
inline int64_t max_blocks_per_layer() { return emu_limit("LPIPS_FAST_EMU_MAX_BLOCKS", 65536); }
// Flattened (n, p) elements per block of the weight-gradient kernel.
inline int64_t wgrad_chunk() { return emu_limit("LPIPS_FAST_EMU_WGRAD_CHUNK", 2048); }

// Threads per block of the element-wise kernels (conv_cuda.cu, conv_pool_cuda.cu), each
// running a grid-stride loop.
constexpr int kEwThreads = 256;

// Largest grid of the element-wise kernels (the loop covers the rest); tests lower it
// (LPIPS_FAST_EMU_EW_BLOCKS) so that small inputs take several grid-stride steps.
inline int64_t ew_max_blocks() { return emu_limit("LPIPS_FAST_EMU_EW_BLOCKS", int64_t(1) << 20); }

// The grid for `total` elements, V per thread per step.
inline dim3 ew_grid(int64_t total, int V) {
  const int64_t per_block = (int64_t)kEwThreads * V;
  return dim3((unsigned)std::min<int64_t>((total + per_block - 1) / per_block, ew_max_blocks()));
}

// kernel<<<grid, block, smem, stream>>>(args...), then the launch error check.
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), const char* name, dim3 grid, dim3 block, size_t smem,
            Stream stream, Args&&... args) {
#ifdef LPIPS_FAST_EMU
  (void)stream;
  lpips_emu::run_grid(name, grid, block, smem, [&] { kernel(args...); });
#else
  (void)name;
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

}  // namespace lpips_fast
