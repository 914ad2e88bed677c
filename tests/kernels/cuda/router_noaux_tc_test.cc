// noaux_tc routing (DeepSeek-V3: sigmoid scores, a selection bias, the best
// groups by their two best biased scores, top-k within them) on CUDA against
// kernels::cpu on the same logits and bias.
//
// Both sides compute 1 / (1 + exp(-x)) in F32, but the device's expf may be
// an ulp or two off the host's, so two experts whose biased scores are that
// close may come out in the other order (or one chosen instead of the other).
// The comparison accepts exactly that, in few tokens: at every position the
// chosen experts' biased scores agree within 1e-5. Exact ties (equal logits
// and equal bias) are computed alike on both sides and must go to the lower
// expert (and group) id. Weights: 1e-5 relative, as the softmax router's.
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/cpu/moe.h"
#include "kernels/cuda/moe.h"
#include "tests/kernels/cuda/cuda_test_util.h"

namespace joule::kernels::cuda {
namespace {

struct NoauxCase {
  const char* name;
  int experts, groups, topk_groups, top_k;
  bool renormalize;
  float scaling;
  int64_t tokens;
};

// DeepSeek-V3 and worker/tools/make_model.cc's deepseek_v3 presets, then the
// edges: no renormalization, one group (a plain top-k of biased scores), and
// more groups than a warp has lanes with the most experts the kernel takes.
constexpr NoauxCase kCases[] = {
    {"deepseek_v3", 256, 8, 4, 8, true, 2.5f, 300},
    {"tiny", 16, 4, 2, 3, true, 2.5f, 257},
    {"mini", 32, 8, 3, 4, true, 2.5f, 257},
    {"unnormalized", 256, 8, 4, 8, false, 1.0f, 64},
    {"one_group", 64, 1, 1, 6, true, 1.0f, 50},
    {"many_groups", kMaxRouterExperts, 64, 40, 16, true, 1.5f, 40},
};

// Random logits and bias; every 5th token has exact ties: the experts
// e % 7 == 0 share one bias and, in those tokens, one logit, high enough
// that they beat every other expert (and tie whole groups on DeepSeek-V3).
struct RouterInputs {
  std::vector<float> logits;  // [tokens, experts]
  std::vector<float> bias;    // [experts]
};

RouterInputs MakeInputs(const NoauxCase& c) {
  RouterInputs in{RandomFloats(c.tokens * c.experts, 51 + c.experts, -4.f, 4.f),
                  RandomFloats(c.experts, 52 + c.experts, -0.3f, 0.3f)};
  for (int e = 0; e < c.experts; e += 7) in.bias[e] = 0.5f;
  for (int64_t t = 0; t < c.tokens; t += 5) {
    for (int e = 0; e < c.experts; e += 7) in.logits[t * c.experts + e] = 6.f;
  }
  return in;
}

RouterTopKParams Params(const NoauxCase& c) {
  RouterTopKParams p;
  p.tokens = c.tokens;
  p.num_experts = c.experts;
  p.top_k = c.top_k;
  p.renormalize = c.renormalize;
  p.method = RouterMethod::kNoauxTc;
  p.num_groups = c.groups;
  p.topk_groups = c.topk_groups;
  p.scaling = c.scaling;
  return p;
}

struct Routing {
  std::vector<int32_t> ids;
  std::vector<float> weights;
};

Routing RunCpu(RouterTopKParams p, const RouterInputs& in) {
  Routing out{std::vector<int32_t>(p.tokens * p.top_k), std::vector<float>(p.tokens * p.top_k)};
  p.logits = in.logits.data();
  p.selection_bias = in.bias.data();
  p.expert_ids = out.ids.data();
  p.weights = out.weights.data();
  p.valid_tokens = nullptr;
  kernels::cpu::LaunchRouterTopK(p, kernels::cpu::CpuStream{});
  return out;
}

// Token t's routing agrees, or differs only by experts whose biased scores
// are within an ulp-sized distance. Returns whether it differed at all.
bool ExpectSameRouting(const NoauxCase& c, const RouterInputs& in, int64_t t, const Routing& got,
                       const Routing& want) {
  const auto biased = [&](int32_t e) {
    const double logit = in.logits[t * c.experts + e];
    return 1.0 / (1.0 + std::exp(-logit)) + in.bias[e];
  };
  const auto first = [&](const auto& v) { return v.begin() + t * c.top_k; };
  const std::vector<int32_t> got_ids(first(got.ids), first(got.ids) + c.top_k);
  const std::vector<int32_t> want_ids(first(want.ids), first(want.ids) + c.top_k);
  if (got_ids == want_ids) {
    const std::vector<float> got_w(first(got.weights), first(got.weights) + c.top_k);
    const std::vector<float> want_w(first(want.weights), first(want.weights) + c.top_k);
    ExpectNear(got_w, want_w, 1e-5f, 1e-7f, "weights");
    return false;
  }
  for (int j = 0; j < c.top_k; ++j) {
    const int32_t e = got_ids[j];
    if (e < 0 || e >= c.experts || std::fabs(biased(e) - biased(want_ids[j])) > 1e-5) {
      ADD_FAILURE() << "token " << t << " choice " << j << ": got expert " << e << ", want "
                    << want_ids[j] << " (not a near-tie)";
      return true;
    }
  }
  return true;
}

class CudaNoauxTcTest : public CudaKernelTest {
 protected:
  Routing RunGpu(RouterTopKParams p, const RouterInputs& in, const int64_t* valid_tokens) {
    DeviceBuffer<float> d_logits(in.logits), d_bias(in.bias), d_weights(p.tokens * p.top_k);
    DeviceBuffer<int32_t> d_ids(p.tokens * p.top_k);
    DeviceBuffer<int64_t> d_valid(1);
    // Garbage first: every output must be written.
    EXPECT_EQ(cudaMemset(d_ids.get(), 0x7f, sizeof(int32_t) * p.tokens * p.top_k), cudaSuccess);
    EXPECT_EQ(cudaMemset(d_weights.get(), 0x7f, sizeof(float) * p.tokens * p.top_k), cudaSuccess);
    if (valid_tokens != nullptr) {
      EXPECT_EQ(cudaMemcpy(d_valid.get(), valid_tokens, sizeof(int64_t), cudaMemcpyHostToDevice),
                cudaSuccess);
    }
    p.logits = d_logits.get();
    p.selection_bias = d_bias.get();
    p.expert_ids = d_ids.get();
    p.weights = d_weights.get();
    p.valid_tokens = valid_tokens != nullptr ? d_valid.get() : nullptr;
    const absl::Status launched = LaunchRouterTopK(p, stream_);
    EXPECT_TRUE(launched.ok()) << launched;
    Sync();
    return {d_ids.Download(), d_weights.Download()};
  }
};

TEST_F(CudaNoauxTcTest, MatchesCpu) {
  for (const NoauxCase& c : kCases) {
    SCOPED_TRACE(c.name);
    const RouterInputs in = MakeInputs(c);
    const RouterTopKParams p = Params(c);
    const Routing want = RunCpu(p, in);
    const Routing got = RunGpu(p, in, nullptr);
    ASSERT_FALSE(HasFailure());
    int64_t differing = 0;
    for (int64_t t = 0; t < c.tokens; ++t) {
      SCOPED_TRACE(testing::Message() << "token " << t);
      if (ExpectSameRouting(c, in, t, got, want)) ++differing;
      // Tied tokens: bit-identical scores on both sides, so exactly the CPU's choice.
      if (t % 5 == 0) {
        for (int j = 0; j < c.top_k; ++j) {
          ASSERT_EQ(got.ids[t * c.top_k + j], want.ids[t * c.top_k + j]) << "tie, choice " << j;
        }
      }
    }
    EXPECT_LE(differing, 1 + c.tokens / 50) << "near-ties should be rare";
  }
}

TEST_F(CudaNoauxTcTest, PadsTokensPastValidTokens) {
  const NoauxCase& c = kCases[0];
  const RouterInputs in = MakeInputs(c);
  const RouterTopKParams p = Params(c);
  const Routing want = RunCpu(p, in);
  for (int64_t valid : {int64_t{20}, int64_t{0}, c.tokens, int64_t{1000}}) {
    SCOPED_TRACE(testing::Message() << "valid_tokens=" << valid);
    const Routing got = RunGpu(p, in, &valid);
    ASSERT_FALSE(HasFailure());
    for (int64_t t = 0; t < c.tokens; ++t) {
      if (t < valid) {
        ExpectSameRouting(c, in, t, got, want);
        continue;
      }
      for (int j = 0; j < c.top_k; ++j) {
        ASSERT_EQ(got.ids[t * c.top_k + j], -1) << "padding token " << t;
        ASSERT_EQ(got.weights[t * c.top_k + j], 0.f) << "padding token " << t;
      }
    }
  }
}

TEST_F(CudaNoauxTcTest, OnlyTheBestGroupsAreChosenFrom) {
  // One expert far above the rest in a group whose second best is poor: its
  // group loses on the top-2 sum, so that expert is never chosen, though a
  // plain top-k would take it first. 8 groups of 4, 2 kept, top 3.
  const NoauxCase c{"groups", 32, 8, 2, 3, true, 1.0f, 1};
  RouterInputs in{std::vector<float>(32, -6.f), std::vector<float>(32, 0.f)};
  in.logits[0] = 6.f;  // group 0: one star, the rest poor
  for (int e : {8, 9, 20, 21}) in.logits[e] = 2.f;  // groups 2 and 5: two good experts each
  const Routing want = RunCpu(Params(c), in);
  ASSERT_EQ(want.ids, (std::vector<int32_t>{8, 9, 20}));  // the reference itself
  const Routing got = RunGpu(Params(c), in, nullptr);
  EXPECT_EQ(got.ids, want.ids);
  ExpectNear(got.weights, want.weights, 1e-5f, 1e-7f, "weights");
}

// ---------------------------------------------------------------------------
// Validation (no device: every call fails before any launch)
// ---------------------------------------------------------------------------

TEST(CudaNoauxTcValidation, GroupLimitsAreRejectedByName) {
  static float floats[1];
  static int32_t ids[1];
  RouterTopKParams valid = Params(kCases[0]);
  valid.logits = floats;
  valid.selection_bias = floats;
  valid.expert_ids = ids;
  valid.weights = floats;
  const auto expect_invalid = [](const RouterTopKParams& p, const char* field) {
    const absl::Status s = LaunchRouterTopK(p, nullptr);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << field << ": " << s;
    EXPECT_THAT(std::string(s.message()), testing::HasSubstr(field));
  };
  for (int groups : {0, 3, 256, -8}) {  // 0, not a divisor, groups of 1, negative
    RouterTopKParams p = valid;
    p.num_groups = groups;
    expect_invalid(p, "num_groups");
  }
  for (int topk_groups : {0, 9}) {
    RouterTopKParams p = valid;
    p.topk_groups = topk_groups;
    expect_invalid(p, "topk_groups");
  }
  RouterTopKParams p = valid;
  p.topk_groups = 1;  // 32 candidates
  p.top_k = 33;
  expect_invalid(p, "top_k");
  p = valid;
  p.selection_bias = nullptr;
  expect_invalid(p, "selection_bias");
  p = valid;
  p.method = static_cast<RouterMethod>(7);
  expect_invalid(p, "method");
}

}  // namespace
}  // namespace joule::kernels::cuda
