#include "kernels/cpu/moe.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iterator>
#include <numeric>
#include <random>
#include <utility>
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

// DeepSeek-V3's noaux_tc routing (RouterMethod::kNoauxTc).
struct NoauxTcCase {
  const char* name;
  int experts, n_group, topk_group, top_k;
  bool renormalize;
  float scaling;
  std::vector<float> logits, bias;
  std::vector<int32_t> ids;   // per token, sorted by id
  std::vector<float> weights;  // in the order of ids
};

Routing RouteNoauxTc(const NoauxTcCase& c, int64_t tokens, CpuStream stream) {
  Routing r{std::vector<int32_t>(tokens * c.top_k, -1), std::vector<float>(tokens * c.top_k, -1.0f)};
  RouterTopKParams p;
  p.method = RouterMethod::kNoauxTc;
  p.logits = c.logits.data();
  p.tokens = tokens;
  p.num_experts = c.experts;
  p.top_k = c.top_k;
  p.renormalize = c.renormalize;
  p.selection_bias = c.bias.data();
  p.num_groups = c.n_group;
  p.topk_groups = c.topk_group;
  p.scaling = c.scaling;
  p.expert_ids = r.ids.data();
  p.weights = r.weights.data();
  LaunchRouterTopK(p, stream);
  return r;
}

// Fixture: tests/reference/deepseek_v3_ffn.py routing (reference.py's
// NoauxTcMoe: HF's DeepseekV3TopkRouter and DeepseekV3MoE weighting).
const std::vector<NoauxTcCase>& NoauxTcFixtures() {
  static const std::vector<NoauxTcCase> cases = {
      // 16 experts, n_group 4, topk_group 2, top_k 3, norm_topk_prob, routed_scaling_factor 2.5;
      // smallest selection margin 0.00125.
      {"GroupsOfFour", 16, 4, 2, 3, true, 2.5f,
       {5.248f, -0.858f, -1.454f, -7.96f, -0.025f, -0.959f, -1.61f, 0.946f, 1.263f, -3.197f, -2.659f,
        -1.427f, 2.069f, 1.684f, -3.917f, -3.358f, 2.211f, 4.724f, -0.093f, -2.05f, 3.287f, -0.929f,
        2.177f, 4.647f, 1.89f, 0.22f, 2.197f, -1.928f, -0.534f, -1.722f, -0.613f, -1.459f, -0.557f,
        -1.142f, 0.267f, 0.191f, 0.889f, 4.208f, -4.641f, 3.887f, -0.712f, -3.697f, -0.517f, 0.276f,
        3.203f, -3.185f, 0.652f, 0.353f, -5.052f, -3.557f, 1.8f, 2.087f, 3.263f, 1.601f, 1.186f,
        0.369f, 3.627f, -2.529f, -0.426f, 1.156f, -4.732f, 3.933f, -2.379f, -0.215f, 6.47f, -2.488f,
        -1.588f, 4.685f, -3.241f, -1.296f, 1.548f, 1.366f, 1.781f, 1.112f, 4.036f, 3.048f, 1.786f,
        -2.048f, -2.141f, -5.725f, 2.062f, -5.469f, 2.637f, 5.539f, -3.185f, -2.053f, -1.429f,
        2.491f, -2.59f, -0.392f, -1.569f, -0.754f, 3.874f, -2.893f, 0.215f, 0.815f, 2.576f, -3.792f,
        3.345f, 1.304f, 2.623f, 0.215f, -4.917f, -1.942f, 2.453f, 0.11f, -0.146f, 5.375f, 6.606f,
        -0.111f, 5.799f, -5.981f, -6.147f, 2.601f, -0.786f, 1.737f, 1.55f, -0.268f, 2.046f, 0.452f,
        -4.596f, 0.657f, 0.557f, 5.498f, -3.387f, 0.051f, -1.273f, -0.399f},
       {0.111f, 0.147f, 0.13f, 0.011f, 0.047f, 0.141f, 0.011f, 0.169f, 0.198f, 0.05f, 0.011f, 0.196f,
        0.153f, 0.091f, 0.096f, 0.183f},
       {0, 12, 13, 0, 1, 7, 5, 7, 12, 4, 5, 8, 0, 8, 11, 2, 3, 12, 8, 11, 12, 1, 3, 11},
       {0.912278891f, 0.814228714f, 0.773492336f, 0.781524539f, 0.859540343f, 0.858935118f,
        0.841828883f, 0.837184131f, 0.820986986f, 0.869449437f, 0.751210988f, 0.879339576f,
        0.888629436f, 0.761685371f, 0.849685311f, 0.802015424f, 0.856055498f, 0.841929078f,
        0.789740324f, 0.853732169f, 0.856527567f, 0.838021696f, 0.76544708f, 0.896531105f}},
      // 8 experts, n_group 2, topk_group 1, top_k 2, no renormalization, routed_scaling_factor 1.5;
      // smallest selection margin 0.0732.
      {"Unnormalized", 8, 2, 1, 2, false, 1.5f,
       {1.419f, -2.044f, 0.727f, -5.102f, 2.259f, -4.604f, 0.015f, -0.361f, -2.421f, 8.615f, -1.793f,
        1.417f, 3.288f, -3.646f, 4.027f, -0.366f, 3.038f, -2.742f, -3.089f, 3.629f, 1.506f, 0.417f,
        1.922f, 1.582f, -3.463f, -6.64f, -5.045f, -5.364f, -6.656f, -1.942f, -1.585f, -0.118f,
        0.645f, -1.153f, -0.762f, 0.22f, -2.992f, -2.142f, 0.106f, -2.034f, -1.716f, -0.318f, 4.007f,
        0.956f, -1.013f, -1.756f, -0.345f, 6.725f, -9.442f, 1.605f, 0.697f, 2.603f, -3.445f, 6.343f,
        3.003f, -0.154f, 0.479f, -2.149f, 0.152f, -0.43f, 2.831f, 1.073f, -0.25f, 2.033f},
       {0.134f, 0.185f, 0.124f, 0.065f, 0.064f, 0.058f, 0.191f, 0.081f},
       {0, 2, 4, 6, 0, 3, 6, 7, 0, 3, 2, 3, 5, 6, 4, 7},
       {1.20777237f, 1.01121986f, 1.44602215f, 1.47372675f, 1.43139243f, 1.4612155f, 0.255132765f,
        0.705801249f, 0.983824253f, 0.832168818f, 1.47320557f, 1.08348036f, 1.49736607f,
        1.42906427f, 1.41649222f, 1.3263278f}},
  };
  return cases;
}

TEST_P(MoeTest, NoauxTcMatchesReferenceFixture) {
  for (const NoauxTcCase& c : NoauxTcFixtures()) {
    SCOPED_TRACE(c.name);
    const int64_t tokens = static_cast<int64_t>(c.logits.size()) / c.experts;
    const int k = c.top_k;
    Routing r = RouteNoauxTc(c, tokens, stream());
    for (int64_t t = 0; t < tokens; ++t) {
      // Ordered by decreasing biased score (sigmoid(logit) + bias).
      for (int j = 1; j < k; ++j) {
        const auto biased = [&](int32_t e) {
          return 1.0 / (1.0 + std::exp(-c.logits[t * c.experts + e])) + c.bias[e];
        };
        ASSERT_GE(biased(r.ids[t * k + j - 1]), biased(r.ids[t * k + j])) << "token " << t;
      }
      std::vector<std::pair<int32_t, float>> got;
      for (int j = 0; j < k; ++j) got.emplace_back(r.ids[t * k + j], r.weights[t * k + j]);
      std::sort(got.begin(), got.end());
      for (int j = 0; j < k; ++j) {
        ASSERT_EQ(got[j].first, c.ids[t * k + j]) << "token " << t << " choice " << j;
        // F32 sigmoid and a sum of k terms: a few ulp of O(1) weights.
        ASSERT_NEAR(got[j].second, c.weights[t * k + j], 2e-6f) << "token " << t << " expert "
                                                                << got[j].first;
      }
    }
  }
}

// The group limit and the selection bias each decide: without them the
// fixture's tokens would route elsewhere (the test above can fail on either).
TEST_P(MoeTest, NoauxTcGroupLimitAndBiasChangeTheChoice) {
  NoauxTcCase c = NoauxTcFixtures()[0];
  const int64_t tokens = static_cast<int64_t>(c.logits.size()) / c.experts;
  const Routing with = RouteNoauxTc(c, tokens, stream());
  NoauxTcCase all_groups = c;
  all_groups.topk_group = all_groups.n_group;
  NoauxTcCase no_bias = c;
  std::fill(no_bias.bias.begin(), no_bias.bias.end(), 0.0f);
  EXPECT_NE(RouteNoauxTc(all_groups, tokens, stream()).ids, with.ids);
  EXPECT_NE(RouteNoauxTc(no_bias, tokens, stream()).ids, with.ids);
}

// Experts outside the kept groups are never chosen, also when every biased
// score is negative (DeepSeek's -inf mask; transformers' 0.0 fill would pick
// the excluded experts instead), and ties go to the lower id.
TEST_P(MoeTest, NoauxTcChoosesWithinKeptGroupsOnly) {
  // Two groups of 4. Scores are sigmoid(logit) in (0, 1); a bias of -2 makes
  // every biased score negative. Group 1 (experts 4-7) has the two best.
  NoauxTcCase c{"Negative", 8, 2, 1, 3, true, 1.0f,
                {0.0f, -1.0f, -2.0f, -3.0f, 3.0f, 2.0f, -4.0f, -4.0f},
                std::vector<float>(8, -2.0f), {}, {}};
  const Routing r = RouteNoauxTc(c, 1, stream());
  EXPECT_EQ(r.ids, (std::vector<int32_t>{4, 5, 6}));  // 6 and 7 tie: the lower id
  const double s4 = 1 / (1 + std::exp(-3.0)), s5 = 1 / (1 + std::exp(-2.0)), s6 = 1 / (1 + std::exp(4.0));
  EXPECT_NEAR(r.weights[0], s4 / (s4 + s5 + s6), 1e-6);
  EXPECT_NEAR(r.weights[2], s6 / (s4 + s5 + s6), 1e-6);
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

// The scalar rule every ISA must reproduce bit for bit.
uint16_t ReferenceBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

float Widen(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Inputs that exercise rounding: ties to even (both directions), values that
// round up into the next binade, infinities, NaNs and signed zeros.
std::vector<float> RoundingCases(int64_t n, uint32_t seed) {
  auto v = RandomFloats(n, seed, -4.0f, 4.0f);
  const uint32_t special[] = {0x3f808000u, 0x3f818000u, 0x3f7fffffu, 0x7f7fffffu, 0x7f800000u,
                              0xff800000u, 0x7fc00000u, 0x7f800001u, 0xffa00000u, 0x80000000u,
                              0x00000000u, 0x00010000u, 0x3f80ffffu};
  for (size_t i = 0; i < std::size(special) && i < v.size(); ++i) {
    std::memcpy(&v[i * 7 % v.size()], &special[i], sizeof(float));
  }
  return v;
}

TEST_P(MoeTest, GatherRowsConvertsAndIndexesLikeTheScalarRule) {
  // Odd hidden so every vector path has a tail; rows carry 4 trailing bytes
  // (an expert id in the dispatch layout) that must survive untouched.
  const int64_t tokens = 29, hidden = 203;
  const int k = 3;
  const auto x = RoundingCases(tokens * hidden, 41);
  std::vector<int32_t> slots(tokens * k);
  std::iota(slots.begin(), slots.end(), 0);
  std::shuffle(slots.begin(), slots.end(), std::mt19937(5));
  const int64_t rows = static_cast<int64_t>(slots.size());
  const int64_t stride = hidden * 2 + 4;
  std::vector<std::byte> packed(rows * stride, std::byte{0x5a});

  // F32 tokens -> BF16 rows, row r = token slots[r] / k.
  GatherRowsParams p;
  p.in = x.data();
  p.in_type = RowType::kF32;
  p.in_stride_bytes = hidden * 4;
  p.index = slots.data();
  p.index_divisor = k;
  p.out = packed.data();
  p.out_type = RowType::kBF16;
  p.out_stride_bytes = stride;
  p.rows = rows;
  p.hidden = hidden;
  LaunchGatherRows(p, stream());
  for (int64_t r = 0; r < rows; ++r) {
    const auto* row = reinterpret_cast<const uint16_t*>(packed.data() + r * stride);
    for (int64_t d = 0; d < hidden; ++d) {
      ASSERT_EQ(row[d], ReferenceBf16(x[(slots[r] / k) * hidden + d])) << r << "," << d;
    }
    for (int b = 0; b < 4; ++b) ASSERT_EQ(packed[r * stride + hidden * 2 + b], std::byte{0x5a});
  }

  // BF16 rows -> F32 in reverse order (identity index absent: explicit reversal).
  std::vector<int32_t> reverse(rows);
  for (int64_t r = 0; r < rows; ++r) reverse[r] = static_cast<int32_t>(rows - 1 - r);
  std::vector<float> widened(rows * hidden, -1.0f);
  GatherRowsParams q;
  q.in = packed.data();
  q.in_type = RowType::kBF16;
  q.in_stride_bytes = stride;
  q.index = reverse.data();
  q.out = widened.data();
  q.out_type = RowType::kF32;
  q.out_stride_bytes = hidden * 4;
  q.rows = rows;
  q.hidden = hidden;
  LaunchGatherRows(q, stream());
  for (int64_t r = 0; r < rows; ++r) {
    const auto* src = reinterpret_cast<const uint16_t*>(packed.data() + (rows - 1 - r) * stride);
    for (int64_t d = 0; d < hidden; ++d) {
      const float want = Widen(src[d]);
      const float got = widened[r * hidden + d];
      if (std::isnan(want)) {
        ASSERT_TRUE(std::isnan(got)) << r << "," << d;
      } else {
        ASSERT_EQ(got, want) << r << "," << d;
      }
    }
  }

  // Same type: a strided copy (no index = identity).
  std::vector<float> copy(tokens * hidden, 0.0f);
  GatherRowsParams c;
  c.in = x.data();
  c.in_stride_bytes = hidden * 4;
  c.out = copy.data();
  c.out_stride_bytes = hidden * 4;
  c.rows = tokens;
  c.hidden = hidden;
  LaunchGatherRows(c, stream());
  ASSERT_EQ(std::memcmp(copy.data(), x.data(), x.size() * sizeof(float)), 0);
}

TEST_P(MoeTest, GatherRowsIntoScatteredRowsConvertsEachTokenOnce) {
  // Dispatch's form: rows land in two buffers (two peers' windows) through
  // out_rows, and a token's later rows copy its first, already converted.
  // Same bits as converting every row; trailing bytes stay untouched.
  const int64_t tokens = 13, hidden = 203;
  const auto x = RoundingCases(tokens * hidden, 43);
  const std::vector<int32_t> token = {0, 3, 3, 7, 12, 0, 5, 3, 12, 9, 0};
  const int64_t rows = static_cast<int64_t>(token.size());
  std::vector<int64_t> copy_of(rows, -1);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t q = 0; q < r; ++q) {
      if (token[q] == token[r]) {
        copy_of[r] = q;
        break;
      }
    }
  }
  for (const RowType out_type : {RowType::kBF16, RowType::kF32}) {
    const int64_t row_bytes = (out_type == RowType::kBF16 ? 2 : 4) * hidden + 4;
    std::vector<std::byte> even(rows * row_bytes, std::byte{0x5a}), odd = even;
    std::vector<std::byte*> out_rows(rows);
    for (int64_t r = 0; r < rows; ++r) {
      out_rows[r] = (r % 2 == 0 ? even.data() : odd.data()) + (r / 2) * row_bytes;
    }
    const GatherRowsParams p{.in = x.data(), .in_stride_bytes = hidden * 4, .index = token.data(),
                             .out_type = out_type, .rows = rows, .hidden = hidden,
                             .out_rows = out_rows.data(), .copy_of = copy_of.data()};
    LaunchGatherRows(p, stream());

    // Reference: every row converted on its own, contiguous.
    std::vector<std::byte> want(rows * row_bytes, std::byte{0x5a});
    GatherRowsParams ref = p;
    ref.out_rows = nullptr;
    ref.copy_of = nullptr;
    ref.out = want.data();
    ref.out_stride_bytes = row_bytes;
    LaunchGatherRows(ref, stream());
    for (int64_t r = 0; r < rows; ++r) {
      ASSERT_EQ(std::memcmp(out_rows[r], want.data() + r * row_bytes, row_bytes), 0)
          << "row " << r << " (token " << token[r] << "), out_type "
          << static_cast<int>(out_type);
    }
  }
}

TEST_P(MoeTest, UnpermuteOfBf16ExpertOutputsEqualsWidenedF32) {
  const int64_t tokens = 23, hidden = 77;
  const int k = 4, experts = 6;
  auto logits = RandomFloats(tokens * experts, 51, -2.0f, 2.0f);
  Routing r = Route(logits, tokens, experts, k, /*renorm=*/false, stream());
  std::vector<int32_t> s2p(tokens * k);
  std::iota(s2p.begin(), s2p.end(), 0);
  std::shuffle(s2p.begin(), s2p.end(), std::mt19937(9));
  const auto f32 = RandomFloats(tokens * k * hidden, 52);
  std::vector<uint16_t> bf16(f32.size());
  std::vector<float> widened(f32.size());
  for (size_t i = 0; i < f32.size(); ++i) {
    bf16[i] = ReferenceBf16(f32[i]);
    widened[i] = Widen(bf16[i]);
  }
  UnpermuteParams up;
  up.slot_to_permuted = s2p.data();
  up.weights = r.weights.data();
  up.tokens = tokens;
  up.top_k = k;
  up.hidden = hidden;
  up.accumulate = true;
  std::vector<float> from_f32(tokens * hidden, 0.5f), from_bf16(tokens * hidden, 0.5f);
  up.expert_out = widened.data();
  up.out = from_f32.data();
  LaunchUnpermute(up, stream());
  up.expert_out = nullptr;
  up.expert_out_bf16 = bf16.data();
  up.out = from_bf16.data();
  LaunchUnpermute(up, stream());
  // Same products added in the same order: identical, not merely close.
  for (size_t i = 0; i < from_f32.size(); ++i) ASSERT_EQ(from_bf16[i], from_f32[i]) << i;
}

TEST_P(MoeTest, ReduceRowsSumsTermsInOrderThenRoundsOnce) {
  // Odd hidden for vector tails; rows with 0..4 terms, repeated input rows,
  // strided rows with 6 trailing bytes that must survive.
  const int64_t in_rows = 13, hidden = 45, rows = 9;
  const auto in = RandomFloats(in_rows * hidden, 61);
  std::mt19937 rng(3);
  std::vector<int64_t> offsets{0};
  std::vector<int32_t> index;
  std::vector<float> weights;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < r % 5; ++j) {
      index.push_back(static_cast<int32_t>(rng() % in_rows));
      weights.push_back(0.1f + 0.2f * static_cast<float>(rng() % 5));
    }
    offsets.push_back(static_cast<int64_t>(index.size()));
  }
  // The reference: F32 multiply, then add, term by term from zero.
  std::vector<float> want(rows * hidden, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = offsets[r]; j < offsets[r + 1]; ++j) {
      for (int64_t d = 0; d < hidden; ++d) {
        const float term = weights[j] * in[index[j] * hidden + d];
        want[r * hidden + d] += term;
      }
    }
  }

  // F32 in -> BF16 out: the F32 sum rounded once.
  const int64_t stride = hidden * 2 + 6;
  std::vector<std::byte> packed(rows * stride, std::byte{0x5a});
  ReduceRowsParams p;
  p.in = in.data();
  p.in_type = RowType::kF32;
  p.in_stride_bytes = hidden * 4;
  p.offsets = offsets.data();
  p.index = index.data();
  p.weights = weights.data();
  p.out = packed.data();
  p.out_type = RowType::kBF16;
  p.out_stride_bytes = stride;
  p.rows = rows;
  p.hidden = hidden;
  LaunchReduceRows(p, stream());
  for (int64_t r = 0; r < rows; ++r) {
    const auto* row = reinterpret_cast<const uint16_t*>(packed.data() + r * stride);
    for (int64_t d = 0; d < hidden; ++d) {
      ASSERT_EQ(row[d], ReferenceBf16(want[r * hidden + d])) << r << "," << d;
    }
    for (int b = 0; b < 6; ++b) ASSERT_EQ(packed[r * stride + hidden * 2 + b], std::byte{0x5a});
  }

  // BF16 in, no weights (every weight 1), accumulated into F32 out.
  std::vector<uint16_t> bf16(in.size());
  for (size_t i = 0; i < in.size(); ++i) bf16[i] = ReferenceBf16(in[i]);
  std::vector<float> out(rows * hidden, 0.25f);
  ReduceRowsParams q;
  q.in = bf16.data();
  q.in_type = RowType::kBF16;
  q.in_stride_bytes = hidden * 2;
  q.offsets = offsets.data();
  q.index = index.data();
  q.out = out.data();
  q.out_type = RowType::kF32;
  q.out_stride_bytes = hidden * 4;
  q.accumulate = true;
  q.rows = rows;
  q.hidden = hidden;
  LaunchReduceRows(q, stream());
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t d = 0; d < hidden; ++d) {
      float acc = 0.25f;
      for (int64_t j = offsets[r]; j < offsets[r + 1]; ++j) acc += Widen(bf16[index[j] * hidden + d]);
      ASSERT_EQ(out[r * hidden + d], acc) << r << "," << d;
    }
  }
}

TEST_P(MoeTest, ReduceRowsIntoScatteredRowsGivesTheContiguousBits) {
  // Combine's form: output rows land in two buffers (two peers' windows)
  // through out_rows, odd rows in one, even rows in the other, each row
  // followed by 4 bytes that must survive. Same bits as the contiguous launch.
  const int64_t in_rows = 11, hidden = 37, rows = 8;
  const auto in = RandomFloats(in_rows * hidden, 71);
  std::mt19937 rng(5);
  std::vector<int64_t> offsets{0};
  std::vector<int32_t> index;
  std::vector<float> weights;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < (r * 3) % 5; ++j) {
      index.push_back(static_cast<int32_t>(rng() % in_rows));
      weights.push_back(0.05f + 0.3f * static_cast<float>(rng() % 7));
    }
    offsets.push_back(static_cast<int64_t>(index.size()));
  }
  for (const RowType out_type : {RowType::kBF16, RowType::kF32}) {
    const bool f32_out = out_type == RowType::kF32;
    const int64_t row_bytes = (f32_out ? 4 : 2) * hidden + 4;
    // F32 out accumulates into what the rows hold; BF16 out overwrites them.
    std::vector<std::byte> start(rows * row_bytes, std::byte{0x5a});
    for (int64_t r = 0; r < rows && f32_out; ++r) {
      const auto prior = RandomFloats(hidden, 72 + static_cast<uint32_t>(r));
      std::memcpy(start.data() + r * row_bytes, prior.data(), sizeof(float) * hidden);
    }
    std::vector<std::byte> even(((rows + 1) / 2) * row_bytes), odd(even.size());
    std::vector<std::byte*> out_rows(rows);
    for (int64_t r = 0; r < rows; ++r) {
      out_rows[r] = (r % 2 == 0 ? even.data() : odd.data()) + (r / 2) * row_bytes;
      std::memcpy(out_rows[r], start.data() + r * row_bytes, row_bytes);
    }
    const ReduceRowsParams p{.in = in.data(), .in_stride_bytes = hidden * 4,
                             .offsets = offsets.data(), .index = index.data(),
                             .weights = weights.data(), .out_type = out_type,
                             .accumulate = f32_out, .rows = rows, .hidden = hidden,
                             .out_rows = out_rows.data()};
    LaunchReduceRows(p, stream());

    std::vector<std::byte> want = start;
    ReduceRowsParams ref = p;
    ref.out_rows = nullptr;
    ref.out = want.data();
    ref.out_stride_bytes = row_bytes;
    LaunchReduceRows(ref, stream());
    ASSERT_NE(want, start);  // the reduce wrote something to compare
    for (int64_t r = 0; r < rows; ++r) {
      ASSERT_EQ(std::memcmp(out_rows[r], want.data() + r * row_bytes, row_bytes), 0)
          << "row " << r << ", out_type " << DTypeName(out_type);
    }
  }
}

JOULE_INSTANTIATE_ISA_THREADS(MoeTest);

}  // namespace
}  // namespace joule::kernels::cpu
