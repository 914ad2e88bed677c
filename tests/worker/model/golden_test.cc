// Engine logits and greedy continuations against the PyTorch reference
// (tests/reference/reference.py, which follows Hugging Face's modeling code),
// on the built-in tiny models of every family, on the CPU.
//
// Tolerance: both sides compute in F32 from the same BF16 weights, so only the
// order of F32 summations differs (blocked GEMM and attention vs. PyTorch's).
// Over a few layers that is ~1e-6 relative; fixtures are stored with 6
// significant digits (5e-7 relative). |engine - reference| <= 2e-4 + 2e-4*|ref|
// leaves an order of magnitude of headroom while catching any real mistake
// (a wrong norm, rope or routing choice moves logits by > 1e-2).
#include <algorithm>

#include "gtest/gtest.h"
#include "tests/testing/paths.h"
#include "tests/worker/model/golden_harness.h"
#include "worker/engine/engine.h"
#include "worker/model/model.h"

namespace joule {
namespace {

using testing::ExpectGreedyMatches;
using testing::ExpectLogitsNear;
using testing::LoadFixture;
using testing::Prompt;
using testing::RunGreedy;
using testing::RunPrompts;

const testing::LogitTolerance kTolerance = [](float want, float) {
  return 2e-4f + 2e-4f * std::abs(want);
};

class GoldenTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    prompts_ = LoadFixture(GetParam());
    ASSERT_FALSE(prompts_.empty());
    auto m = Model::Load(testing::TinyModelDir(GetParam()), {.num_threads = 2});
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = std::move(*m);
  }
  std::vector<Prompt> prompts_;
  std::unique_ptr<Model> model_;
};

TEST_P(GoldenTest, BatchedPrefillLogitsMatchReference) {
  // Every prompt in one step, each in one chunk.
  ExpectLogitsNear(prompts_, RunPrompts(*model_, prompts_, 16, 1 << 20, 1), "batched_prefill", kTolerance);
}

TEST_P(GoldenTest, ChunkedPagedPrefillLogitsMatchReference) {
  // Chunks of 5 tokens per step across blocks of 4 slots in scrambled order:
  // every step mixes sequences at different depths and attends across blocks.
  ExpectLogitsNear(prompts_, RunPrompts(*model_, prompts_, 4, 5, 7), "chunked_paged", kTolerance);
}

TEST_P(GoldenTest, TokenByTokenLogitsMatchReference) {
  // Pure decode steps (one token per sequence per step), block size 1.
  ExpectLogitsNear(prompts_, RunPrompts(*model_, prompts_, 1, 1, 3), "token_by_token", kTolerance);
}

TEST_P(GoldenTest, SingleSequenceEqualsBatched) {
  auto batched = RunPrompts(*model_, prompts_, 16, 1 << 20, 1);
  for (size_t s = 0; s < prompts_.size(); ++s) {
    auto single = RunPrompts(*model_, {prompts_[s]}, 16, 1 << 20, 1);
    for (size_t pos = 0; pos < prompts_[s].ids.size(); ++pos) {
      for (size_t v = 0; v < single[0][pos].size(); ++v) {
        ASSERT_NEAR(single[0][pos][v], batched[s][pos][v], 1e-5f) << "prompt " << s << " pos " << pos;
      }
    }
  }
}

// Prompt logprobs and the first token's through the engine (prefill in
// chunks of 16 rows, interleaved across prompts): log_softmax of the
// reference's logits. Measured within 1e-6; 1e-4 leaves headroom and still
// catches a row off by one position or a stray temperature (> 1e-2).
TEST_P(GoldenTest, LogprobsMatchReference) {
  const auto got = testing::RunLogprobs(*model_, prompts_,
                                        {.block_size = 4, .max_batch_tokens = 24,
                                         .prompt_logprob_rows = 16},
                                        5);
  testing::ExpectLogprobsNear(prompts_, got, 1e-4f);
}

TEST_P(GoldenTest, GreedyContinuationMatchesReference) {
  // max_batch_tokens 16 forces chunked prefill interleaved with decodes.
  const auto got = RunGreedy(*model_, prompts_, {.block_size = 4, .max_batch_tokens = 16});
  // Only a near tie in the reference may flip argmax.
  ExpectGreedyMatches(prompts_, got, 1e-3f);
}

INSTANTIATE_TEST_SUITE_P(Families, GoldenTest,
                         ::testing::Values("qwen3_moe-tiny", "qwen2_moe-tiny", "mixtral-tiny",
                                           "deepseek_v3-tiny", "deepseek_v3_fp8-tiny"),
                         [](const auto& info) {
                           std::string n = info.param;
                           std::replace(n.begin(), n.end(), '-', '_');
                           return n;
                         });

// The same numbers stored differently must give the same logits.
struct Variant {
  std::string base, variant;
  float tol;
  friend void PrintTo(const Variant& v, std::ostream* os) { *os << v.variant; }
};
class CheckpointVariantTest : public ::testing::TestWithParam<Variant> {};

TEST_P(CheckpointVariantTest, SameLogitsAsBf16SingleFile) {
  const Variant& v = GetParam();
  auto prompts = LoadFixture(v.base);
  ASSERT_FALSE(prompts.empty());
  auto base = Model::Load(testing::TinyModelDir(v.base), {.num_threads = 2});
  auto other = Model::Load(testing::TinyModelDir(v.variant), {.num_threads = 2});
  ASSERT_TRUE(base.ok()) << base.status();
  ASSERT_TRUE(other.ok()) << other.status();
  auto a = RunPrompts(**base, prompts, 8, 1 << 20, 1);
  auto b = RunPrompts(**other, prompts, 8, 1 << 20, 1);
  for (size_t s = 0; s < prompts.size(); ++s) {
    for (size_t pos = 0; pos < a[s].size(); ++pos) {
      for (size_t i = 0; i < a[s][pos].size(); ++i) {
        ASSERT_NEAR(a[s][pos][i], b[s][pos][i], v.tol) << v.variant << " prompt " << s << " pos " << pos;
      }
    }
  }
}

// Sharded: bit-identical data, so identical logits. F16: every BF16 value is
// exact in F16 except tiny subnormals. F32: same values through the F32 GEMM.
INSTANTIATE_TEST_SUITE_P(Containers, CheckpointVariantTest,
                         ::testing::Values(Variant{"qwen3_moe-tiny", "qwen3_moe-tiny-sharded", 0.0f},
                                           Variant{"qwen2_moe-tiny", "qwen2_moe-tiny-f16", 1e-4f},
                                           Variant{"mixtral-tiny", "mixtral-tiny-f32", 1e-4f}),
                         [](const auto& info) {
                           std::string n = info.param.variant;
                           std::replace(n.begin(), n.end(), '-', '_');
                           return n;
                         });

}  // namespace
}  // namespace joule
