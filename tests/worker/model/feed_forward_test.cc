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
#include <cstring>
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

// The bytes of an FP8 matrix and its scale grid, as placed on a device
// whose memory is host memory (the fake), equal the checkpoint's.
void ExpectSameFp8(const Linear& host, const void* w, const float* scale_inv,
                   const kernels::WeightBlocks& blocks, const std::string& what) {
  SCOPED_TRACE(what);
  ASSERT_EQ(host.type, kernels::DType::kF8E4M3);
  ASSERT_NE(w, nullptr);
  ASSERT_NE(scale_inv, nullptr);
  EXPECT_NE(w, host.w) << "uploaded, not viewed";
  EXPECT_EQ(std::memcmp(w, host.w, static_cast<size_t>(host.out_features * host.in_features)), 0);
  const int64_t grid = ((host.out_features + host.blocks.rows - 1) / host.blocks.rows) *
                       ((host.in_features + host.blocks.cols - 1) / host.blocks.cols);
  EXPECT_EQ(std::memcmp(scale_inv, host.scale_inv, static_cast<size_t>(grid) * sizeof(float)), 0);
  EXPECT_EQ(blocks.rows, host.blocks.rows);
  EXPECT_EQ(blocks.cols, host.blocks.cols);
  EXPECT_EQ(blocks.first_row, host.blocks.first_row);
}

void ExpectSameFp8(const Linear& host, const LinearView& view, const std::string& what) {
  EXPECT_EQ(view.type, kernels::DType::kF8E4M3) << what;
  ExpectSameFp8(host, view.w, view.scale_inv, view.blocks, what);
}

// A device that uploads weights (the GPU path; here the fake that runs the
// CPU's kernels on its own copy) keeps FP8 matrices as FP8: the codes byte
// for byte and their F32 scale grids, never widened to BF16, so the layers
// give the CPU backend's bits.
TEST(FeedForwardTest, Fp8WeightsOnAnUploadingDeviceStayFp8AndGiveTheCpuBits) {
  const int64_t T = 5;
  CpuLayers cpu("deepseek_v3_fp8-tiny", T);
  ASSERT_NE(cpu.weights, nullptr);
  const ModelConfig& c = cpu.config();
  device::FakeDeviceBackend device(2);
  auto placed = DeviceWeights::Create(*cpu.weights, device);
  ASSERT_TRUE(placed.ok()) << placed.status();
  const DeviceWeights& dw = **placed;

  for (int l = 0; l < c.num_layers; ++l) {
    const LayerWeights& L = cpu.weights->layers()[l];
    const LayerView& v = dw.layers()[l];
    const std::string layer = "layer " + std::to_string(l) + " ";
    ExpectSameFp8(L.o_proj, v.o_proj, layer + "o_proj");
    ExpectSameFp8(L.q_a_proj, v.q_a_proj, layer + "q_a_proj");
    ExpectSameFp8(L.q_b_proj, v.q_b_proj, layer + "q_b_proj");
    ExpectSameFp8(L.kv_a_proj, v.kv_a_proj, layer + "kv_a_proj");
    ExpectSameFp8(L.kv_b_proj, v.kv_b_proj, layer + "kv_b_proj");
    if (!L.is_moe) {
      ExpectSameFp8(L.dense.gate, v.dense.gate, layer + "dense gate");
      ExpectSameFp8(L.dense.up, v.dense.up, layer + "dense up");
      ExpectSameFp8(L.dense.down, v.dense.down, layer + "dense down");
      continue;
    }
    EXPECT_EQ(v.router.type, kernels::DType::kBF16);  // DeepSeek-V3 keeps the router BF16
    ExpectSameFp8(L.shared_expert.gate, v.shared_expert.gate, layer + "shared gate");
    ExpectSameFp8(L.shared_expert.up, v.shared_expert.up, layer + "shared up");
    ExpectSameFp8(L.shared_expert.down, v.shared_expert.down, layer + "shared down");
    const ExpertsView& ex = v.experts;
    ASSERT_EQ(ex.type, kernels::DType::kF8E4M3);
    ASSERT_NE(ex.gate_scale_inv, nullptr);
    ASSERT_EQ(ex.held, c.num_experts);
    for (int e = 0; e < ex.num_experts; ++e) {
      const MlpWeights& m = L.experts[e];
      const std::string expert = layer + "expert " + std::to_string(e);
      ExpectSameFp8(m.gate, ex.gate[e], static_cast<const float*>(ex.gate_scale_inv[e]),
                    ex.blocks, expert + " gate");
      ExpectSameFp8(m.up, ex.up[e], static_cast<const float*>(ex.up_scale_inv[e]), ex.blocks,
                    expert + " up");
      ExpectSameFp8(m.down, ex.down[e], static_cast<const float*>(ex.down_scale_inv[e]),
                    ex.blocks, expert + " down");
    }
  }
  // One byte per FP8 weight: less than the same model in BF16 needs.
  auto bf16 = ModelWeights::Load(testing::TinyModelDir("deepseek_v3-tiny"));
  ASSERT_TRUE(bf16.ok()) << bf16.status();
  auto bf16_placed = DeviceWeights::Create(**bf16, device);
  ASSERT_TRUE(bf16_placed.ok()) << bf16_placed.status();
  EXPECT_GT(dw.uploaded_bytes(), 0u);
  EXPECT_LT(dw.uploaded_bytes(), (*bf16_placed)->uploaded_bytes());

  // Every layer on the device gives the CPU backend's bits.
  LocalExpertExecutor experts(&device, &dw, c);
  std::vector<float> x(T * c.hidden_size);
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.53 * i + 0.2);
  CpuLayers on_device("deepseek_v3_fp8-tiny", T);  // only its buffers
  for (int l = 0; l < c.num_layers; ++l) {
    SCOPED_TRACE(::testing::Message() << "layer " << l);
    std::vector<float> want(x.size(), std::nanf("")), got(x.size(), std::nanf(""));
    ASSERT_TRUE(RunFeedForward(cpu.cpu, c, cpu.device_weights->layers()[l], l, *cpu.local,
                               x.data(), T, cpu.buffers(), want.data()).ok());
    ASSERT_TRUE(RunFeedForward(device, c, dw.layers()[l], l, experts, x.data(), T,
                               on_device.buffers(), got.data()).ok());
    ASSERT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0);
  }
}

}  // namespace
}  // namespace joule
