// CUDA on the CPU, for tests: just enough of CUDA C++ to compile csrc/cuda/head_cuda.cu with
// the system C++ compiler and run its kernels, checked the way a GPU would fail them.
//
// Model: a launch runs its blocks one after another (order: LPIPS_FAST_EMU_ORDER); each CUDA
// thread of a block is a fiber with its own stack, switched cooperatively on one OS thread.
// A fiber runs until it reaches a block barrier (__syncthreads), a warp operation (shuffle,
// __syncwarp) or its end; the scheduler then releases whatever can proceed:
//  - a warp operation, once every live lane of that warp is blocked: the lanes waiting there
//    must be exactly the lanes named by the mask, all at the same source line, and each must
//    read a lane that takes part; then the values are exchanged;
//  - a block barrier, once every thread of the block waits at it: all at the same line (a
//    divergent barrier is an error), and no thread may have exited before it.
// Anything else is a deadlock. Shared memory (static, through LF_SHARED, and dynamic) is
// NaN-filled per block and framed by guard bytes checked after the block. Errors name the
// kernel, the block and the .cu file and line, and are thrown (as c10::Error) from the launch.
//
// Environment: LPIPS_FAST_EMU_ORDER=forward|reverse|random (threads and blocks; random uses
// LPIPS_FAST_EMU_SEED). What this cannot show: speed, registers, occupancy, races between
// blocks (blocks never overlap here), and the device's own rounding of intrinsics.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>

// ---- the CUDA dialect, as plain C++ -------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) alignas(n)
#define __restrict__

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;

namespace lpips_emu {

// The running fiber's coordinates (one OS thread runs every fiber, so plain globals suffice).
extern dim3 g_thread_idx, g_block_idx, g_block_dim, g_grid_dim;

enum class WarpOp { Sync, ShflXor, ShflIdx, ShflDown };

// Blocks the calling fiber at a warp operation; returns the exchanged bytes (size bytes).
// `where` is "file:line" of the call in the kernel source (errors name it).
void warp_op(WarpOp op, unsigned mask, const void* value, void* result, int size, int arg,
             int width, const char* where);
void syncthreads(const char* where);
void* shared_array(std::size_t bytes, const char* where);  // static __shared__ storage
void* dynamic_shared();                           // extern __shared__ storage of the block

// Runs kernel(args...) over grid x block; throws c10::Error with what went wrong.
void run_grid(const char* kernel, dim3 grid, dim3 block, std::size_t smem,
              const std::function<void()>& body);

template <typename T>
T shfl_at(const char* where, WarpOp op, unsigned mask, T v, int arg, int width = 32) {
  T out;
  warp_op(op, mask, &v, &out, sizeof(T), arg, width, where);
  return out;
}

}  // namespace lpips_emu

#define threadIdx (::lpips_emu::g_thread_idx)
#define blockIdx (::lpips_emu::g_block_idx)
#define blockDim (::lpips_emu::g_block_dim)
#define gridDim (::lpips_emu::g_grid_dim)

#define LF_EMU_STR2(x) #x
#define LF_EMU_STR(x) LF_EMU_STR2(x)
#define LF_EMU_WHERE __FILE__ ":" LF_EMU_STR(__LINE__)
#define __syncthreads() ::lpips_emu::syncthreads(LF_EMU_WHERE)
#define __syncwarp(mask) \
  ::lpips_emu::warp_op(::lpips_emu::WarpOp::Sync, (mask), nullptr, nullptr, 0, 0, 32, LF_EMU_WHERE)
#define __shfl_xor_sync(...) ::lpips_emu::shfl_at(LF_EMU_WHERE, ::lpips_emu::WarpOp::ShflXor, __VA_ARGS__)
#define __shfl_sync(...) ::lpips_emu::shfl_at(LF_EMU_WHERE, ::lpips_emu::WarpOp::ShflIdx, __VA_ARGS__)
#define __shfl_down_sync(...) ::lpips_emu::shfl_at(LF_EMU_WHERE, ::lpips_emu::WarpOp::ShflDown, __VA_ARGS__)

// Device math that CUDA provides under these names (sqrtf, sqrt come from <cmath>).
using std::max;
using std::min;

// Shared memory and launches, as head_cuda.cu spells them (see csrc/cuda/launch.h).
#define LF_SHARED(T, name, count) \
  T* name = static_cast<T*>(::lpips_emu::shared_array(sizeof(T) * (count), LF_EMU_WHERE))
#define LF_DYNAMIC_SHARED(T, name) T* name = static_cast<T*>(::lpips_emu::dynamic_shared())
