// DeepSeek-V3's MoE layers through the expert-parallel executor: the noaux_tc
// router's expert ids and weights travel through dispatch and combine as the
// softmax router's do, and the FP8 experts run where the placement puts them.
// With F32 payloads, 2 ranks give the local executor's bits.
#include <cmath>
#include <memory>
#include <vector>

#include "common/placement.h"
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

TEST(NoauxTcExpertParallelTest, Fp8DeepseekV3MatchesLocalExecutor) {
  const std::string dir = joule::testing::TinyModelDir("deepseek_v3_fp8-tiny");
  auto full = ModelWeights::Load(dir);
  ASSERT_TRUE(full.ok()) << full.status();
  const ModelConfig& c = (*full)->config();
  const int world = 2;
  auto placement = ContiguousPlacement(world, c.num_layers, c.num_experts);
  ASSERT_TRUE(placement.ok()) << placement.status();
  std::vector<std::unique_ptr<ModelWeights>> rank_weights;
  for (int r = 0; r < world; ++r) {
    auto w = ModelWeights::Load(dir, OwnedBy(*placement, r));
    ASSERT_TRUE(w.ok()) << w.status();
    rank_weights.push_back(std::move(*w));
  }
  // Each rank's own tokens (a different count per rank), as post-attention-normed states.
  const int64_t H = c.hidden_size;
  const std::vector<int64_t> tokens = {5, 3};
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
    ExpertParallelExecutor ex(rank_weights[rank].get(), transport.get(), *placement, {},
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

}  // namespace
}  // namespace joule::ep
