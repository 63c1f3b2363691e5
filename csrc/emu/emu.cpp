// The CPU emulation of the CUDA kernels: the fiber runtime declared in cuda_emu.h, and the
// real csrc/cuda/*.cu (kernels and host code) compiled against it, registered as
// torch.ops.lpips_fast_emu.* on the CPU. Built by the tests (tests/emu.py), not shipped.
#include "cuda_emu.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <vector>

#if defined(__x86_64__) && !defined(LPIPS_FAST_EMU_UCONTEXT)
#define LF_EMU_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

#include "../schemas.h"

namespace lpips_emu {

dim3 g_thread_idx, g_block_idx, g_block_dim, g_grid_dim;

namespace {

// ---- fiber switching: a 6-register x86-64 switch (about 4x faster than swapcontext, which
// also saves the signal mask with a system call), or ucontext elsewhere.
#ifdef LF_EMU_ASM_SWITCH
extern "C" void lpips_emu_switch(void** save_sp, void* load_sp);
asm(R"(
.text
.globl lpips_emu_switch
.type lpips_emu_switch,@function
lpips_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size lpips_emu_switch,.-lpips_emu_switch
.section .note.GNU-stack,"",@progbits
.text
)");
#endif

constexpr std::size_t kStack = 256 * 1024;  // per CUDA thread; kernels keep arrays on it
constexpr std::size_t kGuard = 64;          // guard bytes on each side of a shared array
constexpr unsigned char kGuardByte = 0xA5;

enum class State { Runnable, AtBarrier, AtWarpOp, Done };

struct Fiber {
#ifdef LF_EMU_ASM_SWITCH
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  std::vector<unsigned char> stack;
  State state = State::Runnable;
  const char* where = "";  // file:line where it waits
  // a pending warp operation
  WarpOp op = WarpOp::Sync;
  unsigned mask = 0;
  int arg = 0, width = 32, size = 0;
  unsigned char value[16], result[16];
};

struct SharedBuf {
  std::vector<unsigned char> bytes;  // kGuard | data | kGuard
  std::size_t size = 0;
  unsigned char* data() { return bytes.data() + kGuard; }
};

struct Block {
  std::vector<Fiber> fibers;
  int nthreads = 0;
  int current = -1;
#ifdef LF_EMU_ASM_SWITCH
  void* sched_sp = nullptr;
#else
  ucontext_t sched;
#endif
  const std::function<void()>* body = nullptr;
  std::map<std::string, SharedBuf> shared;  // static shared arrays by declaring file:line
  SharedBuf dynamic;
  std::string error;                // set by a fiber, thrown by the scheduler
};

Block g_block;

Fiber& self() { return g_block.fibers[g_block.current]; }

void to_scheduler() {
  Fiber& f = self();
#ifdef LF_EMU_ASM_SWITCH
  lpips_emu_switch(&f.sp, g_block.sched_sp);
#else
  swapcontext(&f.ctx, &g_block.sched);
#endif
}

void fiber_main() {
  (*g_block.body)();
  self().state = State::Done;
  to_scheduler();  // never resumed
  std::abort();
}

#ifdef LF_EMU_ASM_SWITCH
extern "C" void lpips_emu_entry() { fiber_main(); }
#endif

void start_fiber(Fiber& f) {
  if (f.stack.size() != kStack) f.stack.assign(kStack, 0);
  f.state = State::Runnable;
#ifdef LF_EMU_ASM_SWITCH
  // Top of stack, 16-byte aligned: a zero return address for the entry (so that it starts
  // with rsp % 16 == 8, as after a call), the entry's address for the switch's `ret`, and
  // six zeroed callee-saved registers for its pops.
  auto top = reinterpret_cast<uintptr_t>(f.stack.data() + kStack) & ~uintptr_t(15);
  auto* sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;
  *--sp = reinterpret_cast<void*>(&lpips_emu_entry);
  for (int i = 0; i < 6; ++i) *--sp = nullptr;
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack.data();
  f.ctx.uc_stack.ss_size = kStack;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, &fiber_main, 0);
#endif
}

void resume(int t) {
  g_block.current = t;
  const unsigned x = g_block_dim.x, y = g_block_dim.y;
  g_thread_idx = dim3(t % x, (t / x) % y, t / (x * y));
  Fiber& f = g_block.fibers[t];
#ifdef LF_EMU_ASM_SWITCH
  lpips_emu_switch(&g_block.sched_sp, f.sp);
#else
  swapcontext(&g_block.sched, &f.ctx);
#endif
  g_block.current = -1;
}

std::string order_name() {
  const char* v = std::getenv("LPIPS_FAST_EMU_ORDER");
  return v == nullptr ? "forward" : v;
}

// 0..n-1 in the order LPIPS_FAST_EMU_ORDER asks for.
std::vector<int64_t> ordering(int64_t n, std::mt19937_64& rng) {
  std::vector<int64_t> v(n);
  std::iota(v.begin(), v.end(), 0);
  const std::string o = order_name();
  if (o == "reverse") std::reverse(v.begin(), v.end());
  else if (o == "random") std::shuffle(v.begin(), v.end(), rng);
  else TORCH_CHECK(o == "forward", "LPIPS_FAST_EMU_ORDER must be forward, reverse or random");
  return v;
}

void fill_shared(SharedBuf& b, std::size_t size) {
  b.size = size;
  b.bytes.assign(size + 2 * kGuard, kGuardByte);
  // NaN in every float and double that reads memory nothing wrote (0xFF.. is a NaN pattern)
  std::fill(b.data(), b.data() + size, (unsigned char)0xFF);
}

bool guards_intact(SharedBuf& b) {
  const unsigned char* p = b.bytes.data();
  for (std::size_t i = 0; i < kGuard; ++i)
    if (p[i] != kGuardByte || p[kGuard + b.size + i] != kGuardByte) return false;
  return true;
}

// Release warp operations whose lanes have all arrived; returns whether any was released.
bool release_warp_ops(std::ostringstream& err) {
  bool released = false;
  const int n = g_block.nthreads;
  for (int w0 = 0; w0 < n; w0 += 32) {
    const int w1 = std::min(n, w0 + 32);
    unsigned arrived = 0;
    const char* where = nullptr;
    bool blocked = true, any = false;
    for (int t = w0; t < w1; ++t) {
      const Fiber& f = g_block.fibers[t];
      if (f.state == State::Runnable) blocked = false;
      if (f.state == State::AtWarpOp) {
        any = true;
        arrived |= 1u << (t - w0);
        if (where != nullptr && std::strcmp(f.where, where) != 0)
          err << "lanes of warp " << w0 / 32 << " wait at different warp operations (" << where
              << " and " << f.where << ")";
        where = f.where;
      }
    }
    if (!blocked || !any || !err.str().empty()) continue;
    for (int t = w0; t < w1; ++t) {
      Fiber& f = g_block.fibers[t];
      if (f.state != State::AtWarpOp) continue;
      const int lane = t - w0;
      if (f.mask != arrived) {
        err << f.where << ": lane " << lane << " of warp " << w0 / 32 << " passes mask 0x" << std::hex << f.mask << " but the lanes that arrive are 0x"
            << arrived << std::dec;
        return false;
      }
      int src = lane;
      const int seg = lane & ~(f.width - 1);
      if (f.op == WarpOp::ShflXor) {
        src = lane ^ f.arg;
        if ((src & ~(f.width - 1)) > seg) src = lane;  // later segment: own value (CUDA rule)
      } else if (f.op == WarpOp::ShflIdx) {
        src = seg + (f.arg & (f.width - 1));
      } else if (f.op == WarpOp::ShflDown) {
        src = lane + f.arg;
        if ((src & ~(f.width - 1)) != seg) src = lane;
      }
      if (f.op != WarpOp::Sync) {
        if (src >= w1 - w0 || !(arrived >> src & 1u)) {
          err << f.where << ": lane " << lane << " of warp " << w0 / 32 << " reads lane " << src
              << ", which does not take part";
          return false;
        }
        std::memcpy(f.result, g_block.fibers[w0 + src].value, f.size);
      }
    }
    for (int t = w0; t < w1; ++t)
      if (g_block.fibers[t].state == State::AtWarpOp) g_block.fibers[t].state = State::Runnable;
    released = true;
  }
  return released;
}

// Release the block barrier when every thread waits at it.
bool release_barrier(std::ostringstream& err) {
  const char* where = nullptr;
  int done = 0;
  for (const Fiber& f : g_block.fibers) {
    if (f.state == State::Done) {
      ++done;
      continue;
    }
    if (f.state != State::AtBarrier) return false;
    if (where != nullptr && std::strcmp(f.where, where) != 0) {
      err << "divergent __syncthreads: threads wait at " << where << " and at " << f.where;
      return false;
    }
    where = f.where;
  }
  if (where == nullptr) return false;
  if (done > 0) {
    err << "__syncthreads at " << where << " reached after " << done
        << " thread(s) of the block exited";
    return false;
  }
  for (Fiber& f : g_block.fibers) f.state = State::Runnable;
  return true;
}

std::string describe_states() {
  std::ostringstream s;
  for (int t = 0; t < g_block.nthreads; ++t) {
    const Fiber& f = g_block.fibers[t];
    if (f.state == State::Done) continue;
    s << " thread " << t << (f.state == State::AtBarrier ? " at __syncthreads " : " at warp op ")
      << f.where << ";";
    if (s.tellp() > 400) break;
  }
  return s.str();
}

void run_block(const char* kernel, std::vector<int64_t> order_threads) {
  for (;;) {
    for (int64_t t : order_threads)
      while (g_block.fibers[t].state == State::Runnable) resume((int)t);
    if (!g_block.error.empty()) break;
    bool all_done = true;
    for (const Fiber& f : g_block.fibers) all_done &= f.state == State::Done;
    if (all_done) return;
    std::ostringstream err;
    const bool any = release_warp_ops(err) || (err.str().empty() && release_barrier(err));
    if (!err.str().empty()) {
      g_block.error = err.str();
      break;
    }
    if (!any) {
      g_block.error = "deadlock:" + describe_states();
      break;
    }
  }
  std::ostringstream msg;
  msg << "lpips_fast emulation: " << kernel << " block (" << g_block_idx.x << ", " << g_block_idx.y
      << ", " << g_block_idx.z << "): " << g_block.error;
  g_block.error.clear();
  TORCH_CHECK(false, msg.str());
}

}  // namespace

void warp_op(WarpOp op, unsigned mask, const void* value, void* result, int size, int arg,
             int width, const char* where) {
  Fiber& f = self();
  if (size > 16 || width <= 0 || width > 32 || (width & (width - 1)) != 0) {
    g_block.error = std::string(where) + ": bad warp operation (size " +
                    std::to_string(size) + ", width " + std::to_string(width) + ")";
    f.state = State::Done;
    to_scheduler();
  }
  f.op = op;
  f.mask = mask;
  f.arg = arg;
  f.width = width;
  f.size = size;
  f.where = where;
  if (size > 0) std::memcpy(f.value, value, size);
  f.state = State::AtWarpOp;
  to_scheduler();
  if (size > 0) std::memcpy(result, f.result, size);
}

void syncthreads(const char* where) {
  Fiber& f = self();
  f.where = where;
  f.state = State::AtBarrier;
  to_scheduler();
}

void* shared_array(std::size_t bytes, const char* where) {
  auto it = g_block.shared.find(where);
  if (it == g_block.shared.end()) {
    it = g_block.shared.emplace(where, SharedBuf{}).first;
    fill_shared(it->second, bytes);
  }
  return it->second.data();
}

void* dynamic_shared() { return g_block.dynamic.data(); }

void run_grid(const char* kernel, dim3 grid, dim3 block, std::size_t smem,
              const std::function<void()>& body) {
  const int64_t nthreads = (int64_t)block.x * block.y * block.z;
  // Device limits of compute capability 9.0 (dynamic shared memory: without opting in).
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 2147483647u &&
                  grid.y <= 65535u && grid.z <= 65535u,
              "lpips_fast emulation: ", kernel, " launched with grid (", grid.x, ", ", grid.y,
              ", ", grid.z, "), over the device limits (2^31-1, 65535, 65535)");
  TORCH_CHECK(nthreads >= 1 && nthreads <= 1024 && block.z <= 64, "lpips_fast emulation: ",
              kernel, " launched with block (", block.x, ", ", block.y, ", ", block.z,
              "), over the device limits (1024 threads, z <= 64)");
  TORCH_CHECK(smem <= 48 * 1024, "lpips_fast emulation: ", kernel, " asks for ", smem,
              " bytes of dynamic shared memory (over 48 KiB needs an opt-in)");
  std::mt19937_64 rng(std::getenv("LPIPS_FAST_EMU_SEED") ? std::atoll(std::getenv("LPIPS_FAST_EMU_SEED"))
                                                         : 0);
  g_grid_dim = grid;
  g_block_dim = block;
  g_block.nthreads = (int)nthreads;
  g_block.fibers.resize(nthreads);
  g_block.body = &body;
  const int64_t nblocks = (int64_t)grid.x * grid.y * grid.z;
  for (int64_t b : ordering(nblocks, rng)) {
    g_block_idx = dim3(b % grid.x, (b / grid.x) % grid.y, b / ((int64_t)grid.x * grid.y));
    g_block.shared.clear();
    fill_shared(g_block.dynamic, smem);
    for (Fiber& f : g_block.fibers) start_fiber(f);
    run_block(kernel, ordering(nthreads, rng));
    for (auto& [where, buf] : g_block.shared)
      TORCH_CHECK(guards_intact(buf), "lpips_fast emulation: ", kernel, " block (", g_block_idx.x,
                  ", ", g_block_idx.y, "): the shared array declared at ", where, " (", buf.size,
                  " bytes) was written out of bounds");
    TORCH_CHECK(guards_intact(g_block.dynamic), "lpips_fast emulation: ", kernel,
                " wrote dynamic shared memory out of bounds (", smem, " bytes)");
  }
}

}  // namespace lpips_emu

// The kernels and host code, exactly as the GPU build compiles them.
#include "../cuda/head_cuda.cu"
#include "../cuda/conv_cuda.cu"
#include "../cuda/conv_pool_cuda.cu"
// The fused conv ops' autograd, registered for lpips_fast_emu (LF_OPS_NAMESPACE of launch.h).
#include "../conv_autograd.cpp"

TORCH_LIBRARY(lpips_fast_emu, m) { lpips_fast::define_schemas(m); }
