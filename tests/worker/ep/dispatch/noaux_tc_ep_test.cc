// DeepSeek-V3's MoE layers through the expert-parallel executor: the noaux_tc
// router's expert ids and weights travel through dispatch and combine as the
// softmax router's do, and the FP8 experts run where the placement puts them.
// With F32 payloads, 2 ranks give the local executor's bits.
#include <cmath>
#include <memory>
#include <vector>

#include "common/placement.h"
#include "coordinator/placement/eplb.h"
#include "gtest/gtest.h"
#include "tests/testing/paths.h"
#include "tests/worker/ep/dispatch/ep_test_util.h"
#include "worker/device/cpu_backend.h"
#include "worker/ep/ep_executor.h"
#include "worker/ep/inproc_transport.h"
#include "worker/model/device_weights.h"
#include "worker/model/experts.h"
#include "worker/model/feed_forward.h"

namespace joule::ep {
namespace {

using testing::OwnedBy;
using testing::RunRanks;

// RunFeedForward's buffers for `tokens` tokens of `c`.
struct Buffers {
  Buffers(const ModelConfig& c, int64_t tokens)
      : scratch(2 * tokens * std::max(c.intermediate_size, c.shared_expert_intermediate_size)),
        shared(tokens * c.hidden_size), router(tokens * c.num_experts),
        weights(tokens * c.num_experts_per_tok), gate(tokens), ids(tokens * c.num_experts_per_tok) {}
  FeedForwardBuffers view() {
    return {.mlp_scratch = scratch.data(), .shared = shared.data(), .router_logits = router.data(),
            .topk_ids = ids.data(), .topk_weights = weights.data(), .gate_logit = gate.data()};
  }
  std::vector<float> scratch, shared, router, weights, gate;
  std::vector<int32_t> ids;
};

// Every MoE layer of the checkpoint in `dir`, on `world` ranks placed by
// `placement`, each with its own tokens, gives the local executor's bits.
void ExpectExpertParallelMatchesLocal(const std::string& dir, const Placement& placement,
                                      const std::vector<int64_t>& tokens) {
  auto full = ModelWeights::Load(dir);
  ASSERT_TRUE(full.ok()) << full.status();
  const ModelConfig& c = (*full)->config();
  const int world = placement.num_ranks;
  std::vector<std::unique_ptr<ModelWeights>> rank_weights;
  for (int r = 0; r < world; ++r) {
    auto w = ModelWeights::Load(dir, OwnedBy(placement, r));
    ASSERT_TRUE(w.ok()) << w.status();
    rank_weights.push_back(std::move(*w));
  }
  // Each rank's own tokens, as post-attention-normed states.
  const int64_t H = c.hidden_size;
  std::vector<std::vector<float>> h(world);
  for (int r = 0; r < world; ++r) {
    h[r].resize(tokens[r] * H);
    for (int64_t i = 0; i < tokens[r] * H; ++i) h[r][i] = std::sin(0.73 * i + r);
  }

  // Reference: every expert in this process.
  device::CpuBackend cpu(kernels::cpu::CpuStream{});
  auto full_device = DeviceWeights::Create(**full, cpu);
  ASSERT_TRUE(full_device.ok());
  LocalExpertExecutor local(&cpu, full_device->get(), c);
  std::vector<std::vector<std::vector<float>>> want(world);  // [rank][layer]
  for (int r = 0; r < world; ++r) {
    Buffers b(c, tokens[r]);
    for (int l = 0; l < c.num_layers; ++l) {
      std::vector<float> out(tokens[r] * H);
      ASSERT_TRUE(RunFeedForward(cpu, c, (*full_device)->layers()[l], l, local, h[r].data(),
                                 tokens[r], b.view(), out.data()).ok());
      want[r].push_back(std::move(out));
    }
  }

  InProcessGroup group(world);
  std::vector<std::vector<std::vector<float>>> got(world);
  RunRanks(world, [&](int rank) {
    auto transport = group.Rank(rank);
    device::CpuBackend rank_cpu(kernels::cpu::CpuStream{});
    auto device_weights = DeviceWeights::Create(*rank_weights[rank], rank_cpu);
    ASSERT_TRUE(device_weights.ok());
    ExpertParallelExecutor ex(rank_weights[rank].get(), transport.get(), placement, {},
                              {.payload = PayloadType::kF32});
    Buffers b(c, tokens[rank]);
    for (int l = 0; l < c.num_layers; ++l) {
      std::vector<float> out(tokens[rank] * H);
      absl::Status s = RunFeedForward(rank_cpu, c, (*device_weights)->layers()[l], l, ex,
                                      h[rank].data(), tokens[rank], b.view(), out.data());
      EXPECT_TRUE(s.ok()) << "rank " << rank << " layer " << l << ": " << s;
      got[rank].push_back(std::move(out));
    }
  });
  for (int r = 0; r < world; ++r) {
    for (int l = 0; l < c.num_layers; ++l) {
      EXPECT_EQ(got[r][l], want[r][l]) << "rank " << r << " layer " << l;
    }
  }
}

TEST(NoauxTcExpertParallelTest, Fp8DeepseekV3MatchesLocalExecutor) {
  auto placement = ContiguousPlacement(2, 3, 16);  // deepseek_v3_fp8-tiny: 3 layers, 16 experts
  ASSERT_TRUE(placement.ok()) << placement.status();
  ExpectExpertParallelMatchesLocal(joule::testing::TinyModelDir("deepseek_v3_fp8-tiny"), *placement,
                                   {5, 3});
}

// DeepSeek-V3's routing shape (256 experts in 8 groups, 4 kept, top-8) on 4
// ranks, with EPLB's redundant replicas of the hottest experts: a token whose
// expert has a replica on its own rank is served there, others round-robin
// over the replicas; group-limited routing chooses logical experts, so the
// replicas change where an expert runs, never what the layer computes. The
// shared expert runs where the token lives (RunFeedForward), never dispatched.
TEST(NoauxTcExpertParallelTest, WideLayoutWithEplbReplicasMatchesLocalExecutor) {
  const int world = 4, layers = 2, experts = 256;
  auto base = ContiguousPlacement(world, layers, experts);
  ASSERT_TRUE(base.ok()) << base.status();
  // A skewed load: low-numbered experts hot, so that their replicas land on other ranks.
  std::vector<std::vector<int64_t>> load(layers, std::vector<int64_t>(experts));
  for (int l = 0; l < layers; ++l) {
    for (int e = 0; e < experts; ++e) load[l][e] = 100000 / (e + 1);
  }
  auto placement = RebalancePlacement(*base, load, /*redundant_experts=*/16);
  ASSERT_TRUE(placement.ok()) << placement.status();
  int replicated = 0;
  for (const auto& holders : placement->replicas[1]) replicated += holders.size() > 1;
  ASSERT_GE(replicated, 8);
  ExpectExpertParallelMatchesLocal(joule::testing::TinyModelDir("deepseek_v3_fp8-wide"), *placement,
                                   {7, 1, 12, 4});
}

}  // namespace
}  // namespace joule::ep
