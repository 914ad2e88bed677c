// DeepSeek-V3's feed-forward layers through the engine's CPU path (dense MLP
// below first_k_dense_replace; noaux_tc router, routed experts and ungated
// shared experts above), on the tiny checkpoints in BF16 and block FP8:
// - against reference.py on the same inputs (tests/data/deepseek_v3/ffn-tiny.json,
//   written by tests/reference/deepseek_v3_ffn.py), the chosen experts included;
// - the dense MLP and the shared experts against a direct double-precision
//   computation over the dequantized weights.
#include "worker/model/feed_forward.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/paths.h"
#include "worker/device/cpu_backend.h"
#include "worker/device/fake_device_backend.h"
#include "worker/model/device_weights.h"
#include "worker/model/experts.h"
#include "worker/model/weights.h"

namespace joule {
namespace {

// One model's weights on a CPU backend, and the buffers RunFeedForward needs
// for `tokens` tokens.
struct CpuLayers {
  CpuLayers(const std::string& name, int64_t tokens) : cpu(2) {
    auto w = ModelWeights::Load(testing::TinyModelDir(name));
    EXPECT_TRUE(w.ok()) << w.status();
    if (!w.ok()) return;
    weights = std::move(*w);
    device_weights = *DeviceWeights::Create(*weights, cpu);
    local = std::make_unique<LocalExpertExecutor>(&cpu, device_weights.get(), config());
    const ModelConfig& c = config();
    const int64_t widest = std::max(c.intermediate_size, c.shared_expert_intermediate_size);
    scratch.resize(2 * tokens * widest);
    shared.resize(tokens * c.hidden_size);
    router.resize(tokens * c.num_experts);
    ids.resize(tokens * c.num_experts_per_tok);
    expert_weights.resize(tokens * c.num_experts_per_tok);
    gate.resize(tokens);
  }
  const ModelConfig& config() const { return weights->config(); }
  FeedForwardBuffers buffers() {
    return {.mlp_scratch = scratch.data(), .shared = shared.data(), .router_logits = router.data(),
            .topk_ids = ids.data(), .topk_weights = expert_weights.data(), .gate_logit = gate.data()};
  }
  // The experts each token chose in the last MoE layer run, sorted.
  std::vector<int> Chosen(int64_t token) const {
    const int k = config().num_experts_per_tok;
    std::vector<int> e(ids.begin() + token * k, ids.begin() + (token + 1) * k);
    std::sort(e.begin(), e.end());
    return e;
  }

  device::CpuBackend cpu;
  std::unique_ptr<ModelWeights> weights;
  std::unique_ptr<DeviceWeights> device_weights;
  std::unique_ptr<LocalExpertExecutor> local;
  std::vector<float> scratch, shared, router, expert_weights, gate;
  std::vector<int32_t> ids;
};

nlohmann::json ReadFixture() {
  std::ifstream in(testing::SourceDir() + "/tests/data/deepseek_v3/ffn-tiny.json");
  return nlohmann::json::parse(in);
}

TEST(FeedForwardTest, DeepseekV3LayersMatchReference) {
  const nlohmann::json fixture = ReadFixture();
  const int64_t T = fixture["tokens"].get<int64_t>();
  const std::vector<float> x = fixture["input"].get<std::vector<float>>();
  ASSERT_EQ(fixture["models"].size(), 2u);
  for (const nlohmann::json& model : fixture["models"]) {
    const std::string name = model["model"].get<std::string>();
    SCOPED_TRACE(name);
    CpuLayers m(name, T);
    ASSERT_NE(m.weights, nullptr);
    const int64_t H = m.config().hidden_size;
    ASSERT_EQ(static_cast<int64_t>(x.size()), T * H);
    ASSERT_EQ(model["layers"].size(), static_cast<size_t>(m.config().num_layers));
    for (const nlohmann::json& layer : model["layers"]) {
      const int l = layer["layer"].get<int>();
      SCOPED_TRACE(::testing::Message() << "layer " << l);
      const LayerView& L = m.device_weights->layers()[l];
      ASSERT_EQ(L.is_moe, layer["moe"].get<bool>());
      std::vector<float> out(T * H, std::nanf(""));
      ASSERT_TRUE(RunFeedForward(m.cpu, m.config(), L, l, *m.local, x.data(), T, m.buffers(),
                                 out.data()).ok());
      const std::vector<float> want = layer["output"].get<std::vector<float>>();
      if (L.is_moe) {
        // A margin this wide cannot flip on F32 rounding: a different choice is a bug.
        ASSERT_GT(layer["min_router_gap"].get<double>(), 1e-4);
        for (int64_t t = 0; t < T; ++t) {
          EXPECT_EQ(m.Chosen(t), layer["experts"][t].get<std::vector<int>>()) << "token " << t;
        }
      }
      // F32 throughout on both sides; they differ in summation order only.
      for (int64_t i = 0; i < T * H; ++i) {
        ASSERT_NEAR(out[i], want[i], 2e-5 + 2e-5 * std::fabs(want[i]))
            << "token " << i / H << " feature " << i % H;
      }
    }
  }
}

// The matrix as the reference dequantizes it: BF16 widened, FP8 codes times
// their block's scale (one F32 rounding, as DeepSeek's weight_dequant).
std::vector<double> Dequantized(const Linear& l) {
  std::vector<double> w(l.out_features * l.in_features);
  const int64_t scale_cols = (l.in_features + l.blocks.cols - 1) / l.blocks.cols;
  for (int64_t r = 0; r < l.out_features; ++r) {
    for (int64_t c = 0; c < l.in_features; ++c) {
      const int64_t i = r * l.in_features + c;
      switch (l.type) {
        case kernels::DType::kBF16:
          w[i] = Bf16ToF32(static_cast<const uint16_t*>(l.w)[i]);
          break;
        case kernels::DType::kF32:
          w[i] = static_cast<const float*>(l.w)[i];
          break;
        case kernels::DType::kF8E4M3:
          w[i] = E4M3ToF32(static_cast<const uint8_t*>(l.w)[i]) *
                 l.scale_inv[(r / l.blocks.rows) * scale_cols + c / l.blocks.cols];
          break;
      }
    }
  }
  return w;
}

// down(silu(gate(x)) * up(x)) for one row, in double.
std::vector<double> DirectMlp(const MlpWeights& mlp, const float* x) {
  const auto gate = Dequantized(mlp.gate), up = Dequantized(mlp.up), down = Dequantized(mlp.down);
  const int64_t H = mlp.gate.in_features, I = mlp.gate.out_features;
  std::vector<double> act(I), out(H, 0.0);
  for (int64_t i = 0; i < I; ++i) {
    double g = 0, u = 0;
    for (int64_t h = 0; h < H; ++h) {
      g += gate[i * H + h] * x[h];
      u += up[i * H + h] * x[h];
    }
    act[i] = g / (1.0 + std::exp(-g)) * u;
  }
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t i = 0; i < I; ++i) out[h] += down[h * I + i] * act[i];
  }
  return out;
}

// Routed experts that add nothing: what is left of a MoE layer's output is
// the shared experts'. Keeps what the router handed over.
class SilentExperts : public ExpertExecutor {
 public:
  absl::Status Run(int, const float*, int64_t tokens, const int32_t*, const float* weights,
                   float*) override {
    calls++;
    last_tokens = tokens;
    last_weights = weights;
    return absl::OkStatus();
  }
  int calls = 0;
  int64_t last_tokens = -1;
  const float* last_weights = nullptr;
};

TEST(FeedForwardTest, DeepseekV3DenseAndSharedExpertsMatchDirectComputation) {
  const int64_t T = 3;
  for (const char* name : {"deepseek_v3-tiny", "deepseek_v3_fp8-tiny"}) {
    SCOPED_TRACE(name);
    CpuLayers m(name, T);
    ASSERT_NE(m.weights, nullptr);
    const ModelConfig& c = m.config();
    const int64_t H = c.hidden_size;
    std::vector<float> x(T * H);
    for (int64_t i = 0; i < T * H; ++i) x[i] = std::sin(0.37 * i + 0.1);
    SilentExperts silent;
    for (int l = 0; l < c.num_layers; ++l) {
      SCOPED_TRACE(::testing::Message() << "layer " << l);
      const LayerWeights& L = m.weights->layers()[l];
      std::vector<float> out(T * H, std::nanf(""));
      ASSERT_TRUE(RunFeedForward(m.cpu, c, m.device_weights->layers()[l], l, silent, x.data(), T,
                                 m.buffers(), out.data()).ok());
      const MlpWeights& mlp = L.is_moe ? L.shared_expert : L.dense;
      for (int64_t t = 0; t < T; ++t) {
        const std::vector<double> want = DirectMlp(mlp, x.data() + t * H);
        for (int64_t h = 0; h < H; ++h) {
          ASSERT_NEAR(out[t * H + h], want[h], 1e-5 + 1e-5 * std::fabs(want[h])) << "token " << t;
        }
      }
      if (L.is_moe) {
        EXPECT_EQ(silent.last_tokens, T);
        // noaux_tc weights: normalized, times routed_scaling_factor (2.5).
        for (int64_t t = 0; t < T; ++t) {
          double sum = 0;
          for (int j = 0; j < c.num_experts_per_tok; ++j) sum += silent.last_weights[t * c.num_experts_per_tok + j];
          EXPECT_NEAR(sum, c.routed_scaling_factor, 1e-5);
        }
      }
    }
    // Also with no tokens, a MoE layer calls the executor (expert parallelism's lockstep).
    const int before = silent.calls;
    ASSERT_TRUE(RunFeedForward(m.cpu, c, m.device_weights->layers()[1], 1, silent, x.data(), 0,
                               m.buffers(), nullptr).ok());
    EXPECT_EQ(silent.calls, before + 1);
  }
}

// A device that uploads weights (the GPU path; here the fake that runs on the
// CPU) has no FP8 kernels yet: a clear Unimplemented, not BF16 made of FP8 bytes.
TEST(FeedForwardTest, Fp8WeightsOnAnUploadingDeviceAreUnimplemented) {
  auto fp8 = ModelWeights::Load(testing::TinyModelDir("deepseek_v3_fp8-tiny"));
  ASSERT_TRUE(fp8.ok()) << fp8.status();
  device::FakeDeviceBackend device(1);
  auto placed = DeviceWeights::Create(**fp8, device);
  ASSERT_FALSE(placed.ok());
  EXPECT_EQ(placed.status().code(), absl::StatusCode::kUnimplemented) << placed.status();
  EXPECT_THAT(std::string(placed.status().message()), ::testing::HasSubstr("FP8"));
  auto bf16 = ModelWeights::Load(testing::TinyModelDir("deepseek_v3-tiny"));
  ASSERT_TRUE(bf16.ok()) << bf16.status();
  EXPECT_TRUE(DeviceWeights::Create(**bf16, device).ok());
}

}  // namespace
}  // namespace joule
