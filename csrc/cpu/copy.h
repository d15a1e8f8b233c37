// Row copies for CPU kernels that gather rows into a new output.
//
// A store to a cache line that is not in cache first reads that line from memory (read for
// ownership). Once a gather's output is larger than the cache, that read is a third of the memory
// traffic, and a row-by-row memcpy (rows of ~1.5 KB are below the sizes where glibc switches to
// `rep movsb` or non-temporal stores) runs at about half the speed of one large memcpy.
// Non-temporal stores skip the read and the cache: about 2x on DeiT-S rows at batch 64
// (benchmarks/RESULTS.md). Small outputs keep ordinary stores, so the next op finds them in cache.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace tokred {

// Outputs of at least this many bytes are written with non-temporal stores.
constexpr int64_t kStreamingOutputBytes = int64_t(4) << 20;

inline bool use_streaming_stores(int64_t output_bytes) {
  return output_bytes >= kStreamingOutputBytes;
}

// memcpy(dst, src, bytes), with non-temporal stores where `streaming` and the target has them.
// The bytes are the same either way; only the cache sees a difference.
inline void copy_bytes(void* dst, const void* src, int64_t bytes, bool streaming) {
  if (bytes == 0) return;  // rows of zero channels may have null data (memcpy forbids null)
#if defined(__SSE2__)
  if (streaming) {
    char* d = static_cast<char*>(dst);
    const char* s = static_cast<const char*>(src);
    const int64_t head = std::min<int64_t>(bytes, (16 - reinterpret_cast<uintptr_t>(d) % 16) % 16);
    std::memcpy(d, s, head);
    int64_t i = head;
    for (; i + 16 <= bytes; i += 16) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i),
                       _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
    }
    std::memcpy(d + i, s + i, bytes - i);
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

// C elements from src (channel stride `stride`) to the contiguous row dst.
template <typename T>
void copy_row(T* dst, const T* src, int64_t C, int64_t stride, bool streaming) {
  if (stride == 1) {
    copy_bytes(dst, src, C * int64_t(sizeof(T)), streaming);
  } else {
    for (int64_t c = 0; c < C; ++c) dst[c] = src[c * stride];
  }
}

// Orders this thread's non-temporal stores before what follows (end of a parallel chunk).
inline void finish_streaming_stores() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

}  // namespace tokred
