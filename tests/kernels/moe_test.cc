#include "kernels/cpu/moe.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "tests/kernels/kernel_test_util.h"

namespace joule::kernels::cpu {
namespace {

using testing::IsaThreadsTest;
using testing::RandomFloats;

class MoeTest : public IsaThreadsTest {};

struct Routing {
  std::vector<int32_t> ids;
  std::vector<float> weights;
};

Routing Route(const std::vector<float>& logits, int64_t tokens, int experts, int k, bool renorm,
              CpuStream stream) {
  Routing r{std::vector<int32_t>(tokens * k, -1), std::vector<float>(tokens * k, -1.0f)};
  RouterTopKParams p;
  p.logits = logits.data();
  p.tokens = tokens;
  p.num_experts = experts;
  p.top_k = k;
  p.renormalize = renorm;
  p.expert_ids = r.ids.data();
  p.weights = r.weights.data();
  LaunchRouterTopK(p, stream);
  return r;
}

TEST_P(MoeTest, RouterTopKMatchesReference) {
  const int64_t tokens = 130;
  const int experts = 60, k = 4;
  auto logits = RandomFloats(tokens * experts, 21, -4.0f, 4.0f);
  for (bool renorm : {false, true}) {
    Routing r = Route(logits, tokens, experts, k, renorm, stream());
    for (int64_t t = 0; t < tokens; ++t) {
      std::vector<double> prob(experts);
      const float* l = logits.data() + t * experts;
      const double mx = *std::max_element(l, l + experts);
      double sum = 0.0;
      for (int e = 0; e < experts; ++e) sum += (prob[e] = std::exp(l[e] - mx));
      std::vector<int> order(experts);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return prob[a] > prob[b]; });
      double top_sum = 0.0;
      for (int j = 0; j < k; ++j) top_sum += prob[order[j]];
      for (int j = 0; j < k; ++j) {
        ASSERT_EQ(r.ids[t * k + j], order[j]) << "token " << t << " choice " << j;
        const double ref = prob[order[j]] / (renorm ? top_sum : sum);
        // F32 exp and sums over 60 experts: a few ulp of O(1) values.
        ASSERT_NEAR(r.weights[t * k + j], ref, 1e-6) << "token " << t << " choice " << j;
      }
    }
  }
}

TEST_P(MoeTest, RouterTiesPickLowerExpertIdAndOrderByWeight) {
  // Experts 1, 2 and 4 tie for the top; 3 is next.
  const std::vector<float> logits = {1.0f, 3.0f, 3.0f, 2.0f, 3.0f, 0.5f};
  Routing r = Route(logits, 1, 6, 4, /*renorm=*/true, stream());
  EXPECT_EQ(r.ids, (std::vector<int32_t>{1, 2, 4, 3}));
  EXPECT_EQ(r.weights[0], r.weights[1]);
  EXPECT_EQ(r.weights[1], r.weights[2]);
  EXPECT_GT(r.weights[2], r.weights[3]);
  EXPECT_NEAR(r.weights[0] + r.weights[1] + r.weights[2] + r.weights[3], 1.0f, 1e-6f);
  // All equal: the first k ids.
  Routing flat = Route(std::vector<float>(8, 0.25f), 1, 8, 3, false, stream());
  EXPECT_EQ(flat.ids, (std::vector<int32_t>{0, 1, 2}));
  EXPECT_NEAR(flat.weights[0], 1.0f / 8, 1e-7f);
}

TEST(MoeLayoutTest, StableCountingSortWithEmptyExperts) {
  const int64_t tokens = 57;
  const int k = 3, experts = 9;
  std::mt19937 rng(5);
  std::vector<int32_t> ids(tokens * k);
  // Experts 0, 4 and 8 get nothing; expert 2 gets most.
  const int32_t pool[] = {1, 2, 2, 2, 3, 5, 6, 7};
  for (auto& id : ids) id = pool[rng() % 8];
  std::vector<int64_t> offsets(experts + 1, -1);
  std::vector<int32_t> p2s(ids.size(), -1), s2p(ids.size(), -1);
  MoeLayoutParams p;
  p.expert_ids = ids.data();
  p.tokens = tokens;
  p.top_k = k;
  p.num_experts = experts;
  p.expert_offsets = offsets.data();
  p.permuted_to_slot = p2s.data();
  p.slot_to_permuted = s2p.data();
  ComputeMoeLayout(p);

  EXPECT_EQ(offsets[0], 0);
  EXPECT_EQ(offsets[experts], tokens * k);
  for (int e = 0; e < experts; ++e) {
    EXPECT_EQ(offsets[e + 1] - offsets[e], std::count(ids.begin(), ids.end(), e)) << "expert " << e;
    for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r) {
      EXPECT_EQ(ids[p2s[r]], e);
      if (r > offsets[e]) {
        EXPECT_LT(p2s[r - 1], p2s[r]) << "not stable";
      }
    }
  }
  EXPECT_EQ(offsets[1] - offsets[0], 0);
  EXPECT_EQ(offsets[5] - offsets[4], 0);
  for (size_t s = 0; s < ids.size(); ++s) EXPECT_EQ(p2s[s2p[s]], static_cast<int32_t>(s));
}

TEST_P(MoeTest, PermuteThenWeightedUnpermuteRoundTrips) {
  const int64_t tokens = 41, hidden = 67;
  const int k = 2, experts = 5;
  auto x = RandomFloats(tokens * hidden, 31);
  auto logits = RandomFloats(tokens * experts, 32, -2.0f, 2.0f);
  Routing r = Route(logits, tokens, experts, k, /*renorm=*/true, stream());

  std::vector<int64_t> offsets(experts + 1);
  std::vector<int32_t> p2s(tokens * k), s2p(tokens * k);
  MoeLayoutParams lp;
  lp.expert_ids = r.ids.data();
  lp.tokens = tokens;
  lp.top_k = k;
  lp.num_experts = experts;
  lp.expert_offsets = offsets.data();
  lp.permuted_to_slot = p2s.data();
  lp.slot_to_permuted = s2p.data();
  ComputeMoeLayout(lp);

  std::vector<float> permuted(tokens * k * hidden, std::nanf(""));
  PermuteParams pp;
  pp.x = x.data();
  pp.hidden = hidden;
  pp.rows = tokens * k;
  pp.permuted_to_slot = p2s.data();
  pp.top_k = k;
  pp.out = permuted.data();
  LaunchPermute(pp, stream());
  for (int64_t row = 0; row < tokens * k; ++row)
    for (int64_t d = 0; d < hidden; ++d)
      ASSERT_EQ(permuted[row * hidden + d], x[(p2s[row] / k) * hidden + d]);

  // "Experts" scale their rows by (1 + expert id): out[t] = sum_j w_j (1 + e_j) x[t].
  for (int e = 0; e < experts; ++e)
    for (int64_t row = offsets[e]; row < offsets[e + 1]; ++row)
      for (int64_t d = 0; d < hidden; ++d) permuted[row * hidden + d] *= 1.0f + e;

  std::vector<float> out(tokens * hidden, std::nanf(""));
  UnpermuteParams up;
  up.expert_out = permuted.data();
  up.slot_to_permuted = s2p.data();
  up.weights = r.weights.data();
  up.tokens = tokens;
  up.top_k = k;
  up.hidden = hidden;
  up.out = out.data();
  LaunchUnpermute(up, stream());
  auto expected = [&](int64_t t, int64_t d) {
    double f = 0.0;
    for (int j = 0; j < k; ++j) f += r.weights[t * k + j] * (1.0 + r.ids[t * k + j]);
    return f * x[t * hidden + d];
  };
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t d = 0; d < hidden; ++d)
      ASSERT_NEAR(out[t * hidden + d], expected(t, d), 1e-6 * 6) << t << "," << d;

  // accumulate adds onto what is there (a residual stream, say).
  std::vector<float> acc(tokens * hidden, 1.0f);
  up.out = acc.data();
  up.accumulate = true;
  LaunchUnpermute(up, stream());
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t d = 0; d < hidden; ++d)
      ASSERT_NEAR(acc[t * hidden + d], 1.0 + expected(t, d), 1e-6 * 7) << t << "," << d;
}

JOULE_INSTANTIATE_ISA_THREADS(MoeTest);

}  // namespace
}  // namespace joule::kernels::cpu
