// simt: runs CUDA __global__ functions on the CPU, for correctness tests of tokred's kernels.
//
// A launch runs its blocks one after another on the calling OS thread. A block's threads are
// fibers (ucontext): each runs until it reaches __syncthreads, __syncwarp or a __shfl_*_sync, and
// the scheduler releases a barrier only when every thread that must take part has arrived. So a
// barrier in divergent code, a shuffle that names an exited or absent lane, and a deadlock are
// reported (with the block, and the file and line of the barrier) instead of hanging or passing.
// Between barriers the threads run in the order SIMT_SCHEDULE names (forward, reverse, random),
// which exposes a missing barrier as a changed result.
//
// Shared memory starts poisoned (bytes 0xFF: NaN floats, -1 integers) in every block, so a read
// before a write shows up. Dynamic shared memory is bounded by guard bytes on both sides: a write
// into them fails the launch, and under AddressSanitizer any access to them is reported.
//
// Nothing here models GPU numerics, timing, occupancy or the memory model: see
// tests/simt/README.md.
#pragma once

// Torch headers first, so the CUDA keyword macros below cannot touch them.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/core/SymBool.h>
#include <c10/util/Exception.h>
#include <sys/mman.h>
#include <torch/library.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <source_location>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define SIMT_ASAN 1
#else
#define SIMT_ASAN 0
#endif

// ------------------------------------------------------------------ CUDA's host-side vocabulary
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorAssert = 710,
  cudaErrorLaunchFailure = 719,
};
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
constexpr int warpSize = 32;

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};

namespace simt {

// Limits of the device we stand in for (an H100).
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 64;
constexpr size_t kDefaultDynamicSmem = 48 * 1024;
constexpr size_t kOptinDynamicSmem = 232448;  // 227 KiB per block with cudaFuncSetAttribute
constexpr unsigned char kPoison = 0xFF;

enum class State { kRunning, kAtBlockBarrier, kAtWarpOp, kExited };
enum class WarpOp { kSync, kIdx, kDown, kUp, kXor };

struct Fiber {
  ucontext_t context;
  State state = State::kRunning;
  unsigned tid = 0;  // linear thread id in the block
  uint3 idx{0, 0, 0};
  // The barrier or warp op the fiber waits at.
  const char* file = "";
  unsigned line = 0;
  WarpOp op = WarpOp::kSync;
  unsigned mask = 0;
  int param = 0, width = 32;
  uint64_t value_in = 0, value_out = 0;
};

// Everything of the running launch. thread_local: launches on different OS threads are
// independent (torch may call ops from several threads).
struct Runtime {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  std::vector<char*> stacks;  // one per thread slot, kept across launches
  Fiber* current = nullptr;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  std::string error;  // first failure of the running launch
  unsigned char* dynamic_smem = nullptr;
  std::vector<const void*> poisoned_static_smem;  // __shared__ arrays poisoned in this block
  size_t static_smem_bytes = 0;                   // their sizes, added up
  size_t dynamic_smem_bytes = 0;                  // of the running launch
  const void* kernel = nullptr;                   // the running launch's entry
  cudaError_t last_error = cudaSuccess;
  std::string last_message;
  std::map<const void*, size_t> max_dynamic_smem;  // set by cudaFuncSetAttribute
#if SIMT_ASAN
  void* fake_stack = nullptr;
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
#endif
};
inline thread_local Runtime rt;

// ------------------------------------------------------------------ test hooks

// Mutation testing (tests/simt/mutants.py): SIMT_MUTANT=k switches on the bug numbered k that
// the mutant script injected, so one build carries every mutant.
inline bool mutant(int k) {
  static const int active = std::getenv("SIMT_MUTANT") ? std::atoi(std::getenv("SIMT_MUTANT")) : 0;
  return active == k;
}

// How often each kernel ran (one count per block), for the suite's coverage test.
struct KernelRuns {
  std::mutex mutex;
  std::map<std::string, long> runs;  // "file:kernel" -> blocks run
};
inline KernelRuns& kernel_runs() {
  static KernelRuns k;
  return k;
}

inline std::string where() {
  std::ostringstream o;
  o << "block (" << blockIdx.x << "," << blockIdx.y << "," << blockIdx.z << ") thread ("
    << threadIdx.x << "," << threadIdx.y << "," << threadIdx.z << ")";
  return o.str();
}

// ------------------------------------------------------------------ fibers

#if SIMT_ASAN
// AddressSanitizer must be told about every stack switch, or it reports false stack overflows.
inline void switch_to_fiber(Fiber& f) {
  __sanitizer_start_switch_fiber(&rt.fake_stack, f.context.uc_stack.ss_sp,
                                 f.context.uc_stack.ss_size);
  swapcontext(&rt.scheduler, &f.context);
  __sanitizer_finish_switch_fiber(rt.fake_stack, nullptr, nullptr);
}
inline void enter_fiber() {
  __sanitizer_finish_switch_fiber(nullptr, &rt.scheduler_stack_bottom, &rt.scheduler_stack_size);
}
inline void switch_to_scheduler(bool exiting) {
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(exiting ? nullptr : &fake, rt.scheduler_stack_bottom,
                                 rt.scheduler_stack_size);
  if (exiting) {
    setcontext(&rt.scheduler);
  } else {
    swapcontext(&rt.current->context, &rt.scheduler);
    __sanitizer_finish_switch_fiber(fake, &rt.scheduler_stack_bottom, &rt.scheduler_stack_size);
  }
}
#else
inline void switch_to_fiber(Fiber& f) { swapcontext(&rt.scheduler, &f.context); }
inline void enter_fiber() {}
inline void switch_to_scheduler(bool exiting) {
  if (exiting) {
    setcontext(&rt.scheduler);
  } else {
    swapcontext(&rt.current->context, &rt.scheduler);
  }
}
#endif

// Ends the calling device thread with an error; the rest of the launch is abandoned.
[[noreturn]] inline void fail(const std::string& message) {
  if (rt.error.empty()) rt.error = message;
  rt.current->state = State::kExited;
  switch_to_scheduler(/*exiting=*/true);
  std::abort();
}

inline void device_assert_fail(const char* cond, const char* file, int line) {
  std::ostringstream o;
  o << "device-side assert triggered: " << file << ":" << line << ": " << where() << ": Assertion `"
    << cond << "` failed.";
  fail(o.str());
}

inline void fiber_main() {
  enter_fiber();
  try {
    rt.body(rt.body_arg);
  } catch (const std::exception& e) {
    if (rt.error.empty()) rt.error = std::string("exception in device code: ") + e.what();
  }
  rt.current->state = State::kExited;
  switch_to_scheduler(/*exiting=*/true);
}

inline void wait_at_block_barrier(const char* file, unsigned line) {
  rt.current->state = State::kAtBlockBarrier;
  rt.current->file = file;
  rt.current->line = line;
  switch_to_scheduler(false);
}

inline uint64_t wait_at_warp_op(WarpOp op, unsigned mask, uint64_t value, int param, int width) {
  Fiber* f = rt.current;
  if (width <= 0 || width > 32 || (width & (width - 1)))
    fail("shuffle width " + std::to_string(width) + " is not a power of two in [1, 32] at " +
         where());
  if (!((mask >> (f->tid % 32)) & 1u))
    fail("a warp op whose mask leaves out the calling lane at " + where());
  f->state = State::kAtWarpOp;
  f->op = op;
  f->mask = mask;
  f->value_in = value;
  f->param = param;
  f->width = width;
  switch_to_scheduler(false);
  return f->value_out;
}

inline const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kSync:
      return "__syncwarp";
    case WarpOp::kIdx:
      return "__shfl_sync";
    case WarpOp::kDown:
      return "__shfl_down_sync";
    case WarpOp::kUp:
      return "__shfl_up_sync";
    default:
      return "__shfl_xor_sync";
  }
}

// The lane a shuffle reads, by CUDA's rules for sub-warp widths: a lane whose source falls
// outside its own segment (later segments for xor) reads its own value.
inline int shuffle_source(WarpOp op, int lane, int param, int width) {
  const int base = lane & ~(width - 1);
  switch (op) {
    case WarpOp::kIdx:
      return base + (param & (width - 1));
    case WarpOp::kDown:
      return (lane - base) + param < width ? lane + param : lane;
    case WarpOp::kUp:
      return (lane - base) >= param ? lane - param : lane;
    case WarpOp::kXor:
      return ((lane ^ param) & ~(width - 1)) <= base ? (lane ^ param) : lane;
    default:
      return lane;
  }
}

// Schedule order within a block between barriers: forward, reverse or random (seeded by
// SIMT_SEED, default 12345, so a failure reproduces).
enum class Schedule { kForward, kReverse, kRandom };
inline Schedule schedule() {
  static const Schedule s = [] {
    const char* e = std::getenv("SIMT_SCHEDULE");
    if (e && !std::strcmp(e, "reverse")) return Schedule::kReverse;
    if (e && !std::strcmp(e, "random")) return Schedule::kRandom;
    return Schedule::kForward;
  }();
  return s;
}
inline std::mt19937& schedule_rng() {
  static thread_local std::mt19937 rng(
      std::getenv("SIMT_SEED") ? std::atoi(std::getenv("SIMT_SEED")) : 12345);
  return rng;
}

// Releases each warp whose lanes named in the mask all wait at the same warp op. Returns true if
// a warp moved; sets rt.error on a mismatch that can never resolve.
inline bool release_warps(unsigned nthreads) {
  bool moved = false;
  for (unsigned w0 = 0; w0 < nthreads; w0 += 32) {
    const unsigned lanes = std::min(32u, nthreads - w0);
    const std::string warp = "warp " + std::to_string(w0 / 32);
    Fiber* first = nullptr;
    for (unsigned l = 0; l < lanes && !first; ++l) {
      if (rt.fibers[w0 + l].state == State::kAtWarpOp) first = &rt.fibers[w0 + l];
    }
    if (!first) continue;
    const unsigned mask = first->mask;
    const char* name = op_name(first->op);
    bool ready = true;
    for (unsigned l = 0; l < 32; ++l) {
      if (!((mask >> l) & 1u)) continue;
      if (l >= lanes) {
        rt.error = std::string(name) + " in " + warp + ": the mask names lane " +
                   std::to_string(l) + ", which does not exist in a block of " +
                   std::to_string(nthreads) + " threads";
        return false;
      }
      const Fiber& f = rt.fibers[w0 + l];
      switch (f.state) {
        case State::kAtWarpOp:
          if (f.mask != mask || (f.op == WarpOp::kSync) != (first->op == WarpOp::kSync)) {
            rt.error = "divergent warp ops in " + warp + ": lane " +
                       std::to_string(first->tid % 32) + " at " + name + ", lane " +
                       std::to_string(l) + " at " + op_name(f.op);
            return false;
          }
          break;
        case State::kExited:
          rt.error = std::string(name) + " in " + warp + ": the mask names lane " +
                     std::to_string(l) + ", which has exited";
          return false;
        case State::kAtBlockBarrier:
          rt.error = std::string(name) + " in " + warp + " while lane " + std::to_string(l) +
                     " waits at __syncthreads (" + f.file + ":" + std::to_string(f.line) + ")";
          return false;
        default:
          ready = false;
      }
    }
    if (!ready) continue;
    for (unsigned l = 0; l < 32; ++l) {
      if (!((mask >> l) & 1u)) continue;
      Fiber& f = rt.fibers[w0 + l];
      if (f.op != WarpOp::kSync) {
        const int src = shuffle_source(f.op, static_cast<int>(l), f.param, f.width);
        if (src < 0 || src >= 32 || !((mask >> src) & 1u)) {
          rt.error = std::string(op_name(f.op)) + " in " + warp + ": lane " + std::to_string(l) +
                     " reads lane " + std::to_string(src) + ", which is not in the mask";
          return false;
        }
        f.value_out = rt.fibers[w0 + src].value_in;
      }
    }
    for (unsigned l = 0; l < 32; ++l) {
      if ((mask >> l) & 1u) rt.fibers[w0 + l].state = State::kRunning;
    }
    moved = true;
  }
  return moved;
}

// Every thread must wait at the same __syncthreads, and none may have exited (CUDA C++
// Programming Guide: __syncthreads in conditional code only if the condition is uniform).
inline bool release_block_barrier(unsigned nthreads) {
  unsigned exited = 0, at_block = 0, at_warp = 0;
  for (unsigned t = 0; t < nthreads; ++t) {
    exited += rt.fibers[t].state == State::kExited;
    at_block += rt.fibers[t].state == State::kAtBlockBarrier;
    at_warp += rt.fibers[t].state == State::kAtWarpOp;
  }
  std::ostringstream o;
  o << "block (" << blockIdx.x << "," << blockIdx.y << "," << blockIdx.z << ")";
  if (at_block == nthreads) {
    const Fiber& a = rt.fibers[0];
    for (unsigned t = 1; t < nthreads; ++t) {
      const Fiber& b = rt.fibers[t];
      if (a.line != b.line || std::strcmp(a.file, b.file) != 0) {
        o << ": divergent __syncthreads: thread 0 waits at " << a.file << ":" << a.line
          << ", thread " << t << " at " << b.file << ":" << b.line;
        rt.error = o.str();
        return false;
      }
    }
    for (unsigned t = 0; t < nthreads; ++t) rt.fibers[t].state = State::kRunning;
    return true;
  }
  o << ": deadlock: " << at_block << " threads wait at __syncthreads, " << at_warp
    << " at warp ops, " << exited << " have exited (a barrier in divergent code, or after some "
    << "threads returned)";
  for (unsigned t = 0; t < nthreads; ++t) {
    if (rt.fibers[t].state == State::kAtBlockBarrier) {
      o << "; thread " << t << " waits at " << rt.fibers[t].file << ":" << rt.fibers[t].line;
      break;
    }
  }
  rt.error = o.str();
  return false;
}

inline void run_block(unsigned nthreads, const dim3& bdim) {
  static thread_local std::vector<unsigned> order;
  for (unsigned t = 0; t < nthreads; ++t) {
    Fiber& f = rt.fibers[t];
    f.state = State::kRunning;
    f.tid = t;
    f.idx = {t % bdim.x, (t / bdim.x) % bdim.y, t / (bdim.x * bdim.y)};
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = rt.stacks[t];
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, &fiber_main, 0);
  }
  order.resize(nthreads);
  for (unsigned t = 0; t < nthreads; ++t) order[t] = t;
  if (schedule() == Schedule::kReverse) std::reverse(order.begin(), order.end());
  for (;;) {
    if (schedule() == Schedule::kRandom) std::shuffle(order.begin(), order.end(), schedule_rng());
    bool ran = false;
    for (unsigned t : order) {
      Fiber& f = rt.fibers[t];
      if (f.state != State::kRunning) continue;
      rt.current = &f;
      threadIdx = f.idx;
      switch_to_fiber(f);
      rt.current = nullptr;
      ran = true;
      if (!rt.error.empty()) return;
    }
    if (ran) continue;
    if (release_warps(nthreads)) continue;
    if (!rt.error.empty()) return;
    bool all_exited = true;
    for (unsigned t = 0; t < nthreads; ++t) all_exited &= rt.fibers[t].state == State::kExited;
    if (all_exited) return;
    if (!release_block_barrier(nthreads)) return;
  }
}

// ------------------------------------------------------------------ shared memory

inline void* dynamic_smem() { return rt.dynamic_smem; }

// A GPU counts static __shared__ arrays against the same per-block budget as dynamic shared
// memory: 48 KiB in all by default; with cudaFuncSetAttribute's opt-in, the attribute's dynamic
// bytes plus the static ones up to the device's limit (a larger attribute makes the real call
// fail). The emulator learns the static bytes as the block declares them, so it checks here.
inline void check_static_smem() {
  const size_t static_bytes = rt.static_smem_bytes;
  auto it = rt.max_dynamic_smem.find(rt.kernel);
  std::ostringstream o;
  if (it == rt.max_dynamic_smem.end()) {
    if (static_bytes + rt.dynamic_smem_bytes <= kDefaultDynamicSmem) return;
    o << "static shared memory of " << static_bytes << " B plus dynamic of "
      << rt.dynamic_smem_bytes << " B is over the " << kDefaultDynamicSmem
      << " B a block has without cudaFuncSetAttribute";
  } else {
    if (static_bytes + it->second <= kOptinDynamicSmem) return;
    o << "cudaFuncSetAttribute allowed " << it->second << " B of dynamic shared memory beside "
      << static_bytes << " B of static: over the " << kOptinDynamicSmem
      << " B a block may have (the real call fails)";
  }
  fail(o.str());
}

// Called by the statement cu2cpp adds after each static __shared__ array: the first thread of a
// block to reach it poisons it, so no block sees the previous block's (or launch's) values.
inline void poison_static_smem(void* p, size_t bytes) {
  auto& seen = rt.poisoned_static_smem;
  if (std::find(seen.begin(), seen.end(), p) != seen.end()) return;
  seen.push_back(p);
  std::memset(p, kPoison, bytes);
  rt.static_smem_bytes += bytes;
  check_static_smem();
}

// Dynamic shared memory of one launch: [guard | smem | guard], smem 16-byte aligned.
class DynamicSmem {
 public:
  explicit DynamicSmem(size_t bytes) : bytes_(bytes), buffer_(bytes + 2 * kGuardBytes + 16) {
    unsigned char* p = buffer_.data();
    p += (16 - reinterpret_cast<uintptr_t>(p) % 16) % 16;
    base_ = p + kGuardBytes;
  }
  ~DynamicSmem() { unpoison_guards(); }
  unsigned char* data() const { return base_; }

  void start_block() {
    unpoison_guards();
    std::memset(base_ - kGuardBytes, kPoison, bytes_ + 2 * kGuardBytes);
#if SIMT_ASAN
    ASAN_POISON_MEMORY_REGION(base_ - kGuardBytes, kGuardBytes);
    ASAN_POISON_MEMORY_REGION(base_ + bytes_, kGuardBytes);
#endif
  }

  // Empty if the guards are intact, else what was written where.
  std::string check_guards() {
    unpoison_guards();
    for (size_t i = kGuardBytes; i > 0; --i) {  // the farthest byte first
      if (base_[-static_cast<ptrdiff_t>(i)] != kPoison)
        return "a write " + std::to_string(i) + " B before the start of dynamic shared memory";
    }
    for (size_t i = 0; i < kGuardBytes; ++i) {
      if (base_[bytes_ + i] != kPoison)
        return "a write past the " + std::to_string(bytes_) + " B of dynamic shared memory (byte " +
               std::to_string(bytes_ + i) + ")";
    }
    return "";
  }

 private:
  void unpoison_guards() {
#if SIMT_ASAN
    ASAN_UNPOISON_MEMORY_REGION(base_ - kGuardBytes, kGuardBytes);
    ASAN_UNPOISON_MEMORY_REGION(base_ + bytes_, kGuardBytes);
#endif
  }
  size_t bytes_;
  std::vector<unsigned char> buffer_;
  unsigned char* base_;
};

// ------------------------------------------------------------------ launches

inline std::string launch_config_error(const dim3& grid, const dim3& block, size_t smem,
                                       const void* fn) {
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  size_t cap = kDefaultDynamicSmem;
  auto it = rt.max_dynamic_smem.find(fn);
  if (it != rt.max_dynamic_smem.end()) cap = it->second;
  std::ostringstream o;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 ||
      grid.z > 65535) {
    o << "invalid grid (" << grid.x << "," << grid.y << "," << grid.z << ")";
  } else if (threads == 0 || threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64) {
    o << "invalid block (" << block.x << "," << block.y << "," << block.z << ")";
  } else if (smem > cap) {
    o << "dynamic shared memory of " << smem << " B is over the " << cap
      << " B allowed (cudaFuncSetAttribute raises the limit up to " << kOptinDynamicSmem << ")";
  }
  return o.str();
}

template <typename F, typename Tuple>
struct Call {
  F f;
  Tuple args;
  static void run(void* p) {
    auto* c = static_cast<Call*>(p);
    std::apply(c->f, c->args);
  }
};

inline void ensure_thread_slots(unsigned nthreads) {
  while (rt.stacks.size() < nthreads) {
    void* s = mmap(nullptr, kStackBytes + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
    if (s == MAP_FAILED) throw std::bad_alloc();
    mprotect(s, 4096, PROT_NONE);  // a stack overflow faults instead of corrupting memory
    rt.stacks.push_back(static_cast<char*>(s) + 4096);
  }
  if (rt.fibers.size() < nthreads) rt.fibers.resize(nthreads);
}

template <typename R, typename... P>
struct Launcher {
  R (*f)(P...);
  dim3 grid, block;
  size_t smem;

  template <typename... A>
  void operator()(A&&... a) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel argument count");
    const std::string bad =
        launch_config_error(grid, block, smem, reinterpret_cast<const void*>(f));
    if (!bad.empty()) {
      rt.last_error = cudaErrorInvalidConfiguration;
      rt.last_message = bad;
      return;
    }
    // Arguments are copied into the parameter types once, as a real launch does.
    using Tuple = std::tuple<std::decay_t<P>...>;
    Call<R (*)(P...), Tuple> call{f, Tuple(std::forward<A>(a)...)};
    const unsigned nthreads = block.x * block.y * block.z;
    ensure_thread_slots(nthreads);
    DynamicSmem shared(smem);
    rt.dynamic_smem = shared.data();
    rt.dynamic_smem_bytes = smem;
    rt.kernel = reinterpret_cast<const void*>(f);
    rt.body = &Call<R (*)(P...), Tuple>::run;
    rt.body_arg = &call;
    rt.error.clear();
    blockDim = block;
    gridDim = grid;
    for (unsigned z = 0; z < grid.z && rt.error.empty(); ++z)
      for (unsigned y = 0; y < grid.y && rt.error.empty(); ++y)
        for (unsigned x = 0; x < grid.x && rt.error.empty(); ++x) {
          blockIdx = {x, y, z};
          shared.start_block();
          rt.poisoned_static_smem.clear();
          rt.static_smem_bytes = 0;
          run_block(nthreads, block);
          if (rt.error.empty()) {
            const std::string guards = shared.check_guards();
            if (!guards.empty()) {
              rt.error = guards + " in block (" + std::to_string(x) + "," + std::to_string(y) +
                         "," + std::to_string(z) + ")";
            }
          }
        }
    rt.dynamic_smem = nullptr;
    if (!rt.error.empty()) {
      rt.last_error =
          rt.error.rfind("device-side assert", 0) == 0 ? cudaErrorAssert : cudaErrorLaunchFailure;
      rt.last_message = rt.error;
    }
  }
};

template <typename R, typename... P>
Launcher<R, P...> launch(R (*f)(P...), dim3 grid, dim3 block, size_t smem = 0,
                         cudaStream_t = nullptr) {
  return {f, grid, block, smem};
}

// First statement of every kernel (added by cu2cpp): counts the block's run once, and enforces
// __launch_bounds__, which a real launch fails when more threads are asked for.
inline void kernel_entry(const char* name, const char* file, long max_threads) {
  const long threads = long(blockDim.x) * blockDim.y * blockDim.z;
  if (threads > max_threads) {
    fail(std::string(name) + " launched with " + std::to_string(threads) +
         " threads per block, over its __launch_bounds__ of " + std::to_string(max_threads));
  }
  if (rt.current->tid != 0) return;
  KernelRuns& k = kernel_runs();
  std::lock_guard<std::mutex> lock(k.mutex);
  ++k.runs[std::string(file) + ":" + name];
}

inline cudaError_t take_last_error() {
  const cudaError_t e = rt.last_error;
  rt.last_error = cudaSuccess;
  return e;
}

inline void check(cudaError_t e, const char* expr, const char* file, int line) {
  if (e == cudaSuccess) return;
  std::string message = rt.last_message;
  rt.last_message.clear();
  TORCH_CHECK(false, "CUDA error (simt emulator) ", static_cast<int>(e), " from ", expr, " at ",
              file, ":", line, ": ", message);
}

}  // namespace simt

#define SIMT_KERNEL_RAN(name, file, max_threads) ::simt::kernel_entry(name, file, max_threads)

// ------------------------------------------------------------------ CUDA's device-side vocabulary
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static thread_local
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

inline void __syncthreads(std::source_location loc = std::source_location::current()) {
  ::simt::wait_at_block_barrier(loc.file_name(), loc.line());
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::simt::wait_at_warp_op(::simt::WarpOp::kSync, mask, 0, 0, 32);
}

namespace simt {
template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>,
                "shuffle of a type wider than 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}
template <typename T>
T shuffle(WarpOp op, unsigned mask, T v, int param, int width) {
  return from_bits<T>(wait_at_warp_op(op, mask, to_bits(v), param, width));
}
}  // namespace simt

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = warpSize) {
  return ::simt::shuffle(::simt::WarpOp::kIdx, mask, v, src_lane, width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  return ::simt::shuffle(::simt::WarpOp::kDown, mask, v, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  return ::simt::shuffle(::simt::WarpOp::kUp, mask, v, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize) {
  return ::simt::shuffle(::simt::WarpOp::kXor, mask, v, lane_mask, width);
}

// ------------------------------------------------------------------ CUDA runtime API on the host
inline cudaError_t cudaGetLastError() { return ::simt::take_last_error(); }
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  *value = attr == cudaDevAttrMaxSharedMemoryPerBlockOptin
               ? static_cast<int>(simt::kOptinDynamicSmem)
               : 0;
  return cudaSuccess;
}
template <typename T>
cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<size_t>(value) > simt::kOptinDynamicSmem)
      return cudaErrorInvalidValue;
    simt::rt.max_dynamic_smem[reinterpret_cast<const void*>(entry)] = static_cast<size_t>(value);
  }
  return cudaSuccess;
}

// A .cu file's TORCH_LIBRARY_IMPL(ns, CUDA, m) registers its kernels as the CPU kernels of the
// op library ns_simt (build.py declares tokred_simt's schemas), so tests call the emulated CUDA
// code on CPU tensors beside the real CPU kernels of ns.
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) SIMT_LIBRARY_IMPL_##k(ns, m)
#define SIMT_LIBRARY_IMPL_CUDA(ns, m) _TORCH_LIBRARY_IMPL(ns##_simt, CPU, m, C10_UID)

// The kernels' run counts as "file:kernel blocks" lines, for tests (runtime.cpp; read through
// ctypes).
extern "C" const char* simt_kernel_runs();
