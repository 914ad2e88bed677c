// A fault inside a kernel in the middle of a step (here: a KV cache at an
// address that is not mapped) is that step's error, naming the device and
// the CUDA error, within a bounded time; the device stays failed, so the next
// step is an error too, not a hang. Its own binary: the fault poisons the
// process's CUDA context. Skips without a GPU (fails under JOULE_REQUIRE_GPU=1).
#include <chrono>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/kernels/cuda/cuda_test_util.h"
#include "tests/testing/paths.h"
#include "worker/model/model.h"

namespace joule {
namespace {

using ::testing::HasSubstr;

TEST(GpuFaultTest, AFaultInsideAStepIsThatStepsErrorAndTheNextStepsToo) {
  JOULE_SKIP_WITHOUT_CUDA_DEVICE();
  auto model = Model::Load(testing::TinyModelDir("qwen3_moe-tiny"),
                           {.device = {.kind = device::DeviceKind::kCuda, .index = 0},
                            .cuda_graphs = false});
  ASSERT_TRUE(model.ok()) << model.status();
  const ModelConfig& c = (*model)->config();
  KvCacheView unmapped{.block_size = 16, .num_blocks = 1 << 16, .type = kernels::DType::kBF16};
  for (int l = 0; l < c.num_layers; ++l) {
    unmapped.k.push_back(reinterpret_cast<void*>(uintptr_t{1} << 40));
    unmapped.v.push_back(reinterpret_cast<void*>(uintptr_t{1} << 40));
  }
  ForwardBatch b{.tokens = {1, 2}, .positions = {0, 1}, .slots = {4000, 4001},
                 .query_start = {0, 2}, .context_lens = {2}, .block_tables = {250},
                 .max_blocks_per_seq = 1, .logit_rows = {1}};
  std::vector<float> logits(c.vocab_size);
  for (int step = 0; step < 2; ++step) {
    const auto start = std::chrono::steady_clock::now();
    const absl::Status s = (*model)->Forward(b, unmapped, logits.data());
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    ASSERT_FALSE(s.ok()) << "step " << step;
    EXPECT_THAT(std::string(s.message()), HasSubstr("cudaError")) << s;
    EXPECT_LT(seconds, 30) << "step " << step;
    std::printf("step %d: %s (%.3f s)\n", step, std::string(s.message()).c_str(), seconds);
  }
}

}  // namespace
}  // namespace joule
