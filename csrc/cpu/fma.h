// Fused multiply-add variants of CPU kernels: the target they are compiled for, and whether this
// process runs them. A variant marked TOKRED_FMA_TARGET computes the same sums in the same order
// as its unfused twin but rounds once per multiply-add (every multiply that feeds an add, as the
// compiler finds them): about 10% faster in routing, and different last bits. Each variant gives
// the same bits on every thread count.
#pragma once

#include <cstdlib>

// x86-64: AVX2 with FMA (every x86-64 CPU since 2013 but some low-end ones), contraction on.
#if defined(__x86_64__) && !defined(__clang__)
#define TOKRED_FMA_TARGET __attribute__((target("avx2,fma"), optimize("fp-contract=fast")))
#elif !defined(__clang__)
#define TOKRED_FMA_TARGET __attribute__((optimize("fp-contract=fast")))
#else
#define TOKRED_FMA_TARGET  // Clang has no per-function contraction: no fused variant runs
#endif

namespace tokred {

// Whether kernels with a fused variant run it: a GCC build, the CPU has FMA (on x86-64 also the
// AVX2 that TOKRED_FMA_TARGET asks for), and the environment variable TOKRED_CPU_FMA is not "0"
// (the tests set it to run the unfused variant on a CPU with FMA). Decided once per process.
inline bool fused_multiply_add() {
  static const bool fused = [] {
    const char* env = std::getenv("TOKRED_CPU_FMA");
    if (env != nullptr && env[0] == '0' && env[1] == '\0') return false;
#if defined(__clang__)
    return false;
#elif defined(__x86_64__)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#elif defined(__aarch64__) || defined(__FMA__)
    return true;
#else
    return false;
#endif
  }();
  return fused;
}

}  // namespace tokred
