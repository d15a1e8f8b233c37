#include "cpu/segment.h"

#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "cpu/parallel.h"

namespace tokred {

at::Tensor scatter_sum_rows_cpu(const at::Tensor& src_in, const at::Tensor& index_in, int64_t n,
                                const char* op, const char* arg) {
  const at::Tensor src = src_in.contiguous();
  const at::Tensor index = as_int64(index_in);
  const int64_t B = src.size(0), K = src.size(1), C = src.size(2);
  at::Tensor out = at::empty({B, n, C}, src.options());
  TOKRED_DISPATCH_FLOATS(src.scalar_type(), "scatter_sum_rows_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* s = src.data_ptr<scalar_t>();
    const int64_t* idx = index.data_ptr<int64_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> acc;
      for (int64_t b = b0; b < b1; ++b) {
        acc.assign(n * C, acc_t(0));
        for (int64_t k = 0; k < K; ++k) {
          const int64_t i = idx[b * K + k];
          TORCH_CHECK(i >= -1 && i < n, "tokred::", op, ": argument '", arg, "' holds ", i, " at [",
                      b, ", ", k, "], expected values in [-1, ", n, ")");
          if (i < 0) continue;
          const scalar_t* row = s + (b * K + k) * C;
          acc_t* dst = acc.data() + i * C;
          for (int64_t c = 0; c < C; ++c) dst[c] += static_cast<acc_t>(row[c]);
        }
        scalar_t* ob = o + b * n * C;
        for (int64_t j = 0; j < n * C; ++j) ob[j] = static_cast<scalar_t>(acc[j]);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> build_segments_cpu(const at::Tensor& index_in, int64_t n,
                                                      const char* op, const char* arg) {
  const at::Tensor index = as_int64(index_in);
  const int64_t B = index.size(0), K = index.size(1);
  at::Tensor order = at::empty({B, K}, index.options());
  at::Tensor offsets = at::empty({B, n + 1}, index.options());
  const int64_t* idx = index.data_ptr<int64_t>();
  int64_t* ord = order.data_ptr<int64_t>();
  int64_t* offp = offsets.data_ptr<int64_t>();
  parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> next(n);  // per target: its count, then its next slot in order
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t* row = idx + b * K;
      int64_t* off = offp + b * (n + 1);
      std::fill(next.begin(), next.end(), int64_t(0));
      int64_t padding = 0;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t i = row[k];
        TORCH_CHECK(i >= -1 && i < n, "tokred::", op, ": argument '", arg, "' holds ", i, " at [",
                    b, ", ", k, "], expected values in [-1, ", n, ")");
        ++(i < 0 ? padding : next[i]);
      }
      off[0] = padding;  // offsets[i] = #{k : index_k < i}
      for (int64_t i = 0; i < n; ++i) {
        off[i + 1] = off[i] + next[i];
        next[i] = off[i];
      }
      int64_t* ob = ord + b * K;
      int64_t pad_slot = 0;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t i = row[k];
        ob[i < 0 ? pad_slot++ : next[i]++] = k;
      }
    }
  });
  return {order, offsets};
}

}  // namespace tokred
