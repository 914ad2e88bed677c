// The host side of the GPU path, on a machine without a GPU: the model on
// FakeDeviceBackend (the CPU's kernels behind a backend whose memory the model
// must upload to, stage into and copy out of, which records and replays
// graphs, and honours padded batches as the CUDA kernels do). What runs on a
// GPU differs only in the kernels, which tests/kernels/cuda checks against the
// CPU's.
//
// Every row's result has the CPU backend's bits, so the golden tolerance is
// the CPU one, and a replayed decode graph must give exactly the logits of
// eager launches: padding a batch to its bucket changes no real row (each
// row's GEMM result does not depend on its batch; GemmTest checks that).
#include <cmath>
#include <cstring>
#include <map>

#include "gtest/gtest.h"
#include "tests/testing/paths.h"
#include "tests/worker/model/golden_harness.h"
#include "worker/device/fake_device_backend.h"
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

const testing::LogitTolerance kCpuTolerance = [](float want, float) {
  return 2e-4f + 2e-4f * std::abs(want);
};

std::unique_ptr<Model> OnFakeDevice(const std::string& name, bool graphs,
                                    device::FakeDeviceBackend** backend = nullptr) {
  auto weights = ModelWeights::Load(testing::TinyModelDir(name));
  EXPECT_TRUE(weights.ok()) << weights.status();
  // Asynchronous: launches run on the fake device's thread, as on a GPU's stream.
  auto fake = std::make_unique<device::FakeDeviceBackend>(2, /*asynchronous=*/true);
  if (backend != nullptr) *backend = fake.get();
  auto model = Model::Create(*std::move(weights), std::move(fake), graphs);
  EXPECT_TRUE(model.ok()) << model.status();
  return model.ok() ? *std::move(model) : nullptr;
}

class DevicePathGoldenTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    prompts_ = LoadFixture(GetParam());
    ASSERT_FALSE(prompts_.empty());
    model_ = OnFakeDevice(GetParam(), /*graphs=*/true);
    ASSERT_NE(model_, nullptr);
    // The weights were uploaded (copied into the device arena), not viewed.
    ASSERT_GT(model_->device_weights().uploaded_bytes(), 0u);
  }
  std::vector<Prompt> prompts_;
  std::unique_ptr<Model> model_;
};

TEST_P(DevicePathGoldenTest, BatchedPrefillLogitsMatchReference) {
  ExpectLogitsNear(prompts_, RunPrompts(*model_, prompts_, 16, 1 << 20, 1), "device_batched",
                   kCpuTolerance);
}

TEST_P(DevicePathGoldenTest, ChunkedPagedPrefillLogitsMatchReference) {
  ExpectLogitsNear(prompts_, RunPrompts(*model_, prompts_, 4, 5, 7), "device_chunked", kCpuTolerance);
}

TEST_P(DevicePathGoldenTest, TokenByTokenLogitsMatchReference) {
  ExpectLogitsNear(prompts_, RunPrompts(*model_, prompts_, 1, 1, 3), "device_token_by_token",
                   kCpuTolerance);
}

TEST_P(DevicePathGoldenTest, GreedyThroughDecodeGraphsMatchesReference) {
  const auto got = RunGreedy(*model_, prompts_,
                             {.block_size = 4, .max_batch_tokens = 16, .max_running = 8});
  ExpectGreedyMatches(prompts_, got, 1e-3f);
  EXPECT_GT(model_->graph_replays(), 0) << "no decode step replayed a graph";
}

TEST_P(DevicePathGoldenTest, LogprobsMatchReference) {
  const auto got = testing::RunLogprobs(*model_, prompts_,
                                        {.block_size = 4, .max_batch_tokens = 24, .max_running = 8,
                                         .prompt_logprob_rows = 16},
                                        5);
  testing::ExpectLogprobsNear(prompts_, got, 1e-4f);
}

INSTANTIATE_TEST_SUITE_P(Families, DevicePathGoldenTest,
                         ::testing::Values("qwen3_moe-tiny", "qwen2_moe-tiny", "mixtral-tiny",
                                           "deepseek_v3-tiny", "deepseek_v3_fp8-tiny"),
                         [](const auto& info) {
                           std::string n = info.param;
                           std::replace(n.begin(), n.end(), '-', '_');
                           return n;
                         });

struct LoadRun {
  std::map<std::pair<uint64_t, int>, std::vector<float>> logits;  // (request, step) -> row
  std::map<uint64_t, std::vector<int32_t>> tokens;                 // request -> its tokens
  std::vector<std::vector<int64_t>> expert_load;
  std::map<uint64_t, std::vector<float>> logprobs;  // request -> its tokens' and prompt's
};

// Requests of different lengths and arrival steps, sampled (every third one
// greedy), so decode steps run at several batch sizes (buckets 1 to 8,
// padded) and sequences retire mid-run. With `observe` the engine hands over
// every row's logits, so every token is picked on the host; without, the
// device picks them and no logits come back. With `logprobs` every other
// request asks for logprobs and one for prompt logprobs: their rows come back
// among the device-sampled ones.
LoadRun RunMixedLoad(Model& model, bool observe = true, bool logprobs = false) {
  LoadRun run;
  std::map<uint64_t, int> steps;
  auto engine = Engine::Create(&model, {.block_size = 4, .max_batch_tokens = 64, .max_running = 8});
  EXPECT_TRUE(engine.ok()) << engine.status();
  if (!engine.ok()) return run;
  if (observe) {
    (*engine)->set_logits_observer([&](uint64_t id, const float* logits, int64_t vocab) {
      run.logits[{id, steps[id]++}] = std::vector<float>(logits, logits + vocab);
    });
  }
  uint64_t next = 0;
  for (int step = 0; step < 200 && (next < 7 || (*engine)->HasWork()); ++step) {
    if (next < 7 && step % 3 == 0) {
      SamplingParams sp;
      sp.temperature = next % 3 == 2 ? 0.0f : 0.8f;
      sp.seed = 100 + next;
      sp.max_tokens = 5 + 3 * static_cast<int>(next);
      sp.ignore_eos = true;
      sp.logprobs = logprobs && next % 2 == 1;
      sp.top_logprobs = sp.logprobs ? 3 : 0;
      sp.prompt_logprobs = logprobs && next == 3;
      std::vector<int32_t> prompt;
      for (uint64_t i = 0; i < 3 + 2 * next; ++i) prompt.push_back(static_cast<int32_t>((7 * i + next) % 200));
      EXPECT_TRUE((*engine)->Add({.id = next++, .prompt = prompt, .sampling = sp}).ok());
    }
    auto r = (*engine)->Step();
    EXPECT_TRUE(r.ok()) << r.status();
    if (!r.ok()) break;
    for (const TokenOutput& t : r->tokens) {
      run.tokens[t.id].push_back(t.token);
      std::vector<float>& lp = run.logprobs[t.id];
      std::vector<TokenLogprob> entries = t.prompt_logprobs;
      if (t.logprob.has_value()) entries.push_back(*t.logprob);
      for (const TokenLogprob& p : entries) {
        lp.push_back(p.logprob);
        for (const TopLogprob& alt : p.top) lp.push_back(alt.logprob);
      }
    }
  }
  auto load = model.local_experts().ExpertLoad();
  EXPECT_TRUE(load.ok());
  if (load.ok()) run.expert_load = *load;
  return run;
}

// Stands in for the expert-parallel executor: experts run elsewhere.
class ElsewhereExperts : public ExpertExecutor {
 public:
  absl::Status Run(int, const float*, int64_t, const int32_t*, const float*, float*) override {
    return absl::OkStatus();
  }
};

// An expert-parallel rank's engine reserves nothing for the local expert
// executor (for a large model, GBs the KV cache would lose); a model running
// its experts itself reserves them for the largest step, so no step allocates.
TEST(DevicePathTest, ExpertsRunningElsewhereReserveNoLocalExpertBuffers) {
  const EngineOptions options{.block_size = 4, .max_batch_tokens = 64, .max_running = 8};
  auto local = OnFakeDevice("qwen3_moe-tiny", /*graphs=*/false);
  auto elsewhere = OnFakeDevice("qwen3_moe-tiny", /*graphs=*/false);
  ASSERT_NE(local, nullptr);
  ASSERT_NE(elsewhere, nullptr);
  ElsewhereExperts stub;
  elsewhere->set_expert_executor(&stub);
  ASSERT_TRUE(Engine::Create(local.get(), options).ok());
  ASSERT_TRUE(Engine::Create(elsewhere.get(), options).ok());
  EXPECT_EQ(local->local_experts().reserved_tokens(), 64);
  EXPECT_EQ(elsewhere->local_experts().reserved_tokens(), 0);
}

TEST(DevicePathTest, ReplayedDecodeGraphsGiveTheBitsOfEagerLaunches) {
  device::FakeDeviceBackend* fake = nullptr;
  auto graphed = OnFakeDevice("qwen3_moe-tiny", /*graphs=*/true, &fake);
  auto eager = OnFakeDevice("qwen3_moe-tiny", /*graphs=*/false);
  ASSERT_NE(graphed, nullptr);
  ASSERT_NE(eager, nullptr);
  const LoadRun a = RunMixedLoad(*graphed);
  const LoadRun b = RunMixedLoad(*eager);
  EXPECT_GT(graphed->graph_replays(), 10);
  EXPECT_GT(fake->recorded(), 0);
  EXPECT_EQ(eager->graph_replays(), 0);
  ASSERT_EQ(a.logits.size(), b.logits.size());
  ASSERT_GT(a.logits.size(), 40u);
  for (const auto& [key, row] : a.logits) {
    const std::vector<float>& other = b.logits.at(key);
    ASSERT_EQ(std::memcmp(row.data(), other.data(), row.size() * sizeof(float)), 0)
        << "request " << key.first << " step " << key.second;
  }
  // Padding tokens route to no expert: the load is the real tokens' alone.
  EXPECT_EQ(a.expert_load, b.expert_load);
}

// The same steps on the CPU backend (weights viewed in place, no staging)
// and on the fake device (weights uploaded, metadata staged, logits copied
// back, decode graphs): the same bits.
TEST(DevicePathTest, TheDevicePathGivesTheCpuBackendsBits) {
  auto cpu = Model::Load(testing::TinyModelDir("qwen2_moe-tiny"), {.num_threads = 2});
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  auto device = OnFakeDevice("qwen2_moe-tiny", /*graphs=*/true);
  ASSERT_NE(device, nullptr);
  const LoadRun a = RunMixedLoad(**cpu);
  const LoadRun b = RunMixedLoad(*device);
  ASSERT_EQ(a.logits.size(), b.logits.size());
  for (const auto& [key, row] : a.logits) {
    const std::vector<float>& other = b.logits.at(key);
    ASSERT_EQ(std::memcmp(row.data(), other.data(), row.size() * sizeof(float)), 0)
        << "request " << key.first << " step " << key.second;
  }
  EXPECT_EQ(a.expert_load, b.expert_load);
}

// Greedy and temperature draws picked where the logits are (the device
// sampler, kernels/params/sampling.h) are the tokens the host sampler picks
// from the same logits and the same seeded streams; on the fake device only
// the tokens come back.
TEST(DevicePathTest, TokensPickedOnTheDeviceAreTheHostSamplersTokens) {
  auto device = OnFakeDevice("qwen3_moe-tiny", /*graphs=*/true);
  ASSERT_NE(device, nullptr);
  const LoadRun on_device = RunMixedLoad(*device, /*observe=*/false);
  const LoadRun on_host = RunMixedLoad(*device, /*observe=*/true);
  auto cpu = Model::Load(testing::TinyModelDir("qwen3_moe-tiny"), {.num_threads = 2});
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  const LoadRun cpu_device = RunMixedLoad(**cpu, /*observe=*/false);
  ASSERT_EQ(on_device.tokens.size(), 7u);
  EXPECT_EQ(on_device.tokens, on_host.tokens);
  EXPECT_EQ(on_device.tokens, cpu_device.tokens);
}

// Requests that want logprobs are sampled on the host among requests the
// device samples: nobody's tokens change, and the logprobs are the CPU
// backend's bits.
TEST(DevicePathTest, LogprobRequestsAmongDevicePickedOnesChangeNoToken) {
  auto device = OnFakeDevice("qwen3_moe-tiny", /*graphs=*/true);
  ASSERT_NE(device, nullptr);
  const LoadRun plain = RunMixedLoad(*device, /*observe=*/false);
  const LoadRun with = RunMixedLoad(*device, /*observe=*/false, /*logprobs=*/true);
  auto cpu = Model::Load(testing::TinyModelDir("qwen3_moe-tiny"), {.num_threads = 2});
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  const LoadRun cpu_with = RunMixedLoad(**cpu, /*observe=*/false, /*logprobs=*/true);
  EXPECT_EQ(with.tokens, plain.tokens);
  EXPECT_EQ(with.tokens, cpu_with.tokens);
  // Request 3: its 9 prompt tokens (the first NaN, no alternatives) and 14
  // generated ones, each with 3 alternatives.
  ASSERT_EQ(with.logprobs.at(3).size(), 1u + 8u * 4u + 14u * 4u);
  EXPECT_TRUE(std::isnan(with.logprobs.at(3)[0]));
  EXPECT_EQ(with.logprobs.at(1).size(), 8u * 4u);
  EXPECT_TRUE(with.logprobs.at(0).empty());
  for (const auto& [id, lp] : with.logprobs) {
    const std::vector<float>& other = cpu_with.logprobs.at(id);
    ASSERT_EQ(lp.size(), other.size()) << "request " << id;
    for (size_t i = 0; i < lp.size(); ++i) {
      if (std::isnan(lp[i]) && std::isnan(other[i])) continue;
      EXPECT_EQ(lp[i], other[i]) << "request " << id << " entry " << i;
    }
  }
}

}  // namespace
}  // namespace joule
