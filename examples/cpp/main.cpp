// Calls every tokred op through tokred.h on real data and checks the results. Exits non-zero on
// the first mismatch, so ctest fails.
#include <tokred.h>

#include <cmath>
#include <cstdlib>
#include <iostream>
#include <vector>

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  std::cout << (ok ? "ok    " : "FAIL  ") << what << "\n";
  if (!ok) ++failures;
}

at::Tensor longs(std::vector<int64_t> values, std::vector<int64_t> shape) {
  return at::tensor(values, at::kLong).view(shape);
}

at::Tensor floats(std::vector<float> values, std::vector<int64_t> shape) {
  return at::tensor(values, at::kFloat).view(shape);
}

void selection() {
  // Ties go to the lower index: the two 3s come out as 0 then 2.
  const at::Tensor scores = floats({3, 1, 3, 0, 2}, {1, 5});
  auto [values, indices] = tokred::topk(scores, 3);
  expect(indices.equal(longs({0, 2, 4}, {1, 3})), "topk: ties to the lower index");
  expect(values.equal(floats({3, 3, 2}, {1, 3})), "topk: values");

  auto [rv, ri] = tokred::topk(floats({5, 4, 9, 1, 7, 2}, {2, 3}), 2, true, longs({1, 3}, {2}));
  expect(ri.equal(longs({0, -1, 1, 2}, {2, 2})), "topk: ragged lengths pad with -1");

  const at::Tensor grad = tokred::topk_backward(floats({1, 1, 1}, {1, 3}), indices, 5);
  expect(grad.equal(floats({1, 0, 1, 0, 1}, {1, 5})), "topk_backward: scatter to kept entries");

  const at::Tensor x = at::arange(12, at::kFloat).view({1, 4, 3});
  const at::Tensor gathered = tokred::gather_tokens(x, longs({3, 0}, {1, 2}));
  expect(gathered.equal(at::cat({x.select(1, 3), x.select(1, 0)}).view({1, 2, 3})),
         "gather_tokens");
  const at::Tensor summed =
      tokred::gather_tokens_backward(at::ones({1, 3, 3}), longs({1, 1, 2}, {1, 3}), 4);
  expect(summed.select(1, 1).equal(at::full({1, 3}, 2.0f)),
         "gather_tokens_backward: duplicates sum");

  expect(tokred::complement(longs({5, 0, 3, 1, 2, 7}, {2, 3}), 8)
             .equal(longs({1, 2, 4, 6, 7, 0, 3, 4, 5, 6}, {2, 5})),
         "complement: ascending");

  // EViT on [cls, t0, t1, t2]: keep the best 2 of 3, fuse the dropped one weighted by its score.
  const at::Tensor tokens = at::arange(8, at::kFloat).view({1, 4, 2});
  const at::Tensor s = floats({0.5f, 0.2f, 0.3f}, {1, 3});
  auto [out, kept] = tokred::prune_tokens(tokens, s, 2, /*fuse=*/true);
  expect(kept.equal(longs({0, 2}, {1, 2})), "prune_tokens: kept by score");
  expect(out.equal(floats({0, 1, 2, 3, 6, 7, 0.2f * 4, 0.2f * 5}, {1, 4, 2})),
         "prune_tokens: [cls | kept | fused]");
  auto [gx, gs] = tokred::prune_tokens_backward(at::ones({1, 4, 2}), tokens, s, kept, true, 1);
  expect(gs.equal(floats({0, 9, 0}, {1, 3})), "prune_tokens_backward: score gradient");
  expect(gx.select(1, 2).equal(floats({0.2f, 0.2f}, {1, 2})), "prune_tokens_backward: x gradient");
}

void merging() {
  // ToMe on [cls, t1, t2, t3]: A = {cls, t2}, B = {t1, t3}. t2 and t3 point the same way, so
  // with r = 1, t2 merges into t3 and the class token stays unmerged.
  const at::Tensor metric = floats({1, 0, 0, 1, 1, 1, 1, 1}, {1, 4, 2});
  auto [unm, src, dst] = tokred::bipartite_match(metric, 1);
  expect(unm.equal(longs({0}, {1, 1})) && src.equal(longs({1}, {1, 1})) &&
             dst.equal(longs({1}, {1, 1})),
         "bipartite_match: the most similar pair");
  const at::Tensor x = floats({0, 0, 1, 1, 2, 4, 4, 8}, {1, 4, 2});
  auto [merged, size] = tokred::merge(x, std::nullopt, unm, src, dst, "wavg");
  expect(merged.equal(floats({0, 0, 1, 1, 3, 6}, {1, 3, 2})), "merge: size-weighted average");
  expect(size.equal(floats({1, 1, 2}, {1, 3, 1})), "merge: sizes");
  expect(
      tokred::unmerge(merged, unm, src, dst, 4).equal(floats({0, 0, 1, 1, 3, 6, 3, 6}, {1, 4, 2})),
      "unmerge: sources get their destination");
  expect(tokred::merge_source(std::nullopt, unm, src, dst, 4).equal(longs({0, 1, 2, 2}, {1, 4})),
         "merge_source: patch 2 now lives in token 2");
}

void routing() {
  // BiFormer: 2 windows of 2 tokens; window 0 routes to window 1 and window 1 to window 0.
  at::manual_seed(0);
  const at::Tensor q = at::randn({1, 2, 2, 4}), k = at::randn({1, 2, 2, 4}),
                   v = at::randn({1, 2, 2, 4});
  const at::Tensor r_idx = longs({1, 0}, {1, 2, 1});
  const at::Tensor kg = tokred::routed_gather(k, r_idx);
  expect(kg.select(1, 0).select(1, 0).equal(k.select(1, 1)), "routed_gather: routed window");
  // Dense attention over the gathered keys, 2 heads of 2 channels.
  const double scale = 0.5;
  const at::Tensor vg = tokred::routed_gather(v, r_idx).view({1, 2, 2, 4});
  auto heads = [](const at::Tensor& t) { return t.view({2, 2, 2, 2}).permute({0, 2, 1, 3}); };
  const at::Tensor attn =
      at::softmax(at::matmul(heads(q) * scale, heads(kg.view({1, 2, 2, 4})).transpose(-1, -2)), -1);
  const at::Tensor dense = at::matmul(attn, heads(vg)).permute({0, 2, 1, 3}).reshape({1, 2, 2, 4});
  auto [out, lse] = tokred::routed_attention(q, k, v, r_idx, 2, scale);
  expect(at::allclose(out, dense, 1e-5, 1e-6), "routed_attention: equals gather + dense attention");
  auto [dq, dk, dv] =
      tokred::routed_attention_backward(at::ones_like(out), q, k, v, r_idx, out, lse, 2, scale);
  // Every query's probabilities sum to 1, so with grad_out = 1, dv sums to queries x channels.
  expect(std::abs(dv.sum().item<double>() - 16.0) < 1e-4, "routed_attention_backward: dv mass");
}

}  // namespace

int main() {
  try {
    selection();
    merging();
    routing();
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return EXIT_FAILURE;
  }
  if (failures) {
    std::cerr << failures << " check(s) failed\n";
    return EXIT_FAILURE;
  }
  std::cout << "all tokred C++ checks passed\n";
  return EXIT_SUCCESS;
}
