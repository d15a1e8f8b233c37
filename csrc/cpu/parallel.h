// The one way CPU kernels run in parallel: at::parallel_for, with failures reported in order.
//
// A kernel that validates its arguments as it goes (TORCH_CHECK inside the loop) would, under
// at::parallel_for, report whichever thread failed first: a different batch row from run to run
// and from one thread count to another. Here each chunk runs to its first failure and the failure
// of the lowest chunk is rethrown. Chunks are disjoint ascending ranges, each run in ascending
// order, so that is the failure a serial loop would report, on any thread count.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>
#include <exception>
#include <limits>
#include <mutex>

namespace tokred {

template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  std::mutex mutex;
  int64_t failed_chunk = std::numeric_limits<int64_t>::max();
  std::exception_ptr failure;
  at::parallel_for(begin, end, grain, [&](int64_t chunk_begin, int64_t chunk_end) {
    try {
      f(chunk_begin, chunk_end);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex);
      if (chunk_begin < failed_chunk) {
        failed_chunk = chunk_begin;
        failure = std::current_exception();
      }
    }
  });
  if (failure) std::rethrow_exception(failure);
}

}  // namespace tokred
