// Multi-head latent attention's tables (worker/model/mla.h): YaRN's inverse
// frequencies against the reference, and kv_b_proj split into W_UK^T and W_UV.
// The attention itself is checked end to end by golden_test (deepseek_v3-tiny).
#include "worker/model/mla.h"

#include <cmath>
#include <memory>
#include <string>

#include "common/dtype.h"
#include "gtest/gtest.h"
#include "tests/testing/paths.h"
#include "worker/device/cpu_backend.h"

namespace joule {
namespace {

ModelConfig YarnConfigOf(int rope_dim, float factor, int64_t original) {
  ModelConfig c;
  c.family = ModelFamily::kDeepseekV3;
  c.head_dim = rope_dim;
  c.rope_theta = 10000.0f;
  c.yarn = {.enabled = true, .factor = factor, .original_max_position_embeddings = original};
  return c;
}

void ExpectNearRelative(const std::vector<float>& got, const std::vector<double>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(got[i], want[i], 2e-6 * want[i]) << "i=" << i;
}

// Numbers from tests/reference/reference.py (DeepseekV3Model._inv_freq, which
// follows transformers' _compute_yarn_parameters) for the tiny and mini presets.
TEST(MlaTest, YarnInverseFrequenciesMatchTheReference) {
  ExpectNearRelative(RopeInverseFrequencies(YarnConfigOf(16, 4.0f, 128)),
                     {1, 0.237170815, 0.049999997, 0.00790569466, 0.00249999994, 0.000790569466,
                      0.000250000012, 7.90569466e-05});
  ExpectNearRelative(RopeInverseFrequencies(YarnConfigOf(32, 40.0f, 4096)),
                     {1, 0.562341332, 0.316227764, 0.177827939, 0.100000001, 0.0562341288,
                      0.0272181761, 0.0128290169, 0.00582142826, 0.00249036867, 0.000959977158,
                      0.000292145909, 2.49999994e-05, 1.40585325e-05, 7.90569447e-06,
                      4.44569832e-06});
}

TEST(MlaTest, WithoutYarnTheFrequenciesAreTheDefaultOnes) {
  ModelConfig c = YarnConfigOf(16, 4.0f, 128);
  c.yarn.enabled = false;
  const std::vector<float> inv = RopeInverseFrequencies(c);
  ASSERT_EQ(inv.size(), 8u);
  for (int i = 0; i < 8; ++i) EXPECT_FLOAT_EQ(inv[i], 1.0f / std::pow(10000.0f, 2.0f * i / 16.0f));
}

// A tiny model's weights and the absorbed matrices made from them on the CPU.
struct Absorbed {
  explicit Absorbed(const std::string& name) {
    auto w = ModelWeights::Load(testing::TinyModelDir(name));
    EXPECT_TRUE(w.ok()) << w.status();
    if (!w.ok()) return;
    weights = *std::move(w);
    auto m = MlaWeights::Create(*weights, cpu);
    EXPECT_TRUE(m.ok()) << m.status();
    if (m.ok()) mla = *std::move(m);
  }
  bool ok() const { return weights != nullptr && weights->config().num_layers > 0; }
  device::CpuBackend cpu{1};
  std::unique_ptr<ModelWeights> weights;
  MlaWeights mla;
};

// W_UK[h]^T and W_UV[h] are kv_b_proj's rows of head h, widened exactly.
TEST(MlaTest, AbsorbedWeightsAreKvBProjSplitPerHead) {
  Absorbed t("deepseek_v3-tiny");
  ASSERT_TRUE(t.ok());
  const MlaWeights* mla = &t.mla;
  const ModelConfig& c = t.weights->config();
  const int64_t R = c.mla.kv_lora_rank, dn = c.mla.qk_nope_head_dim, dv = c.mla.v_head_dim;
  for (int l = 0; l < c.num_layers; ++l) {
    const Linear& kv_b = t.weights->layers()[l].kv_b_proj;
    ASSERT_EQ(kv_b.type, kernels::DType::kBF16);
    auto w = [&](int64_t row, int64_t col) {
      return Bf16ToF32(static_cast<const uint16_t*>(kv_b.w)[row * R + col]);
    };
    const MlaLayerWeights& a = mla->layer(l);
    ASSERT_EQ(a.type, kernels::DType::kBF16);  // kept as stored: exact
    auto uk_t = [&](int64_t i) { return Bf16ToF32(static_cast<const uint16_t*>(a.uk_t)[i]); };
    auto uv = [&](int64_t i) { return Bf16ToF32(static_cast<const uint16_t*>(a.uv)[i]); };
    for (int h = 0; h < c.num_attention_heads; ++h) {
      for (int64_t r = 0; r < R; ++r) {
        for (int64_t d = 0; d < dn; ++d) {
          ASSERT_EQ(uk_t((h * R + r) * dn + d), w(h * (dn + dv) + d, r)) << l << " " << h;
        }
        for (int64_t j = 0; j < dv; ++j) {
          ASSERT_EQ(uv((h * dv + j) * R + r), w(h * (dn + dv) + dn + j, r)) << l << " " << h;
        }
      }
    }
  }
  EXPECT_EQ(mla->bytes(), static_cast<size_t>(c.num_layers) * c.num_attention_heads *
                              (R * dn + dv * R) * sizeof(uint16_t));
}

// FP8: the codes times their block's scale, in F32 (BF16 would round them).
TEST(MlaTest, Fp8AbsorbedWeightsAreDequantizedToF32) {
  Absorbed t("deepseek_v3_fp8-tiny");
  ASSERT_TRUE(t.ok());
  const MlaWeights* mla = &t.mla;
  const ModelConfig& c = t.weights->config();
  const int64_t R = c.mla.kv_lora_rank, dn = c.mla.qk_nope_head_dim, dv = c.mla.v_head_dim;
  const Linear& kv_b = t.weights->layers()[0].kv_b_proj;
  ASSERT_EQ(kv_b.type, kernels::DType::kF8E4M3);
  const MlaLayerWeights& a = mla->layer(0);
  ASSERT_EQ(a.type, kernels::DType::kF32);
  const int64_t block_cols = (R + 127) / 128;
  const int h = c.num_attention_heads - 1;  // the last head: rows past the first 128-row block
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t d = 0; d < dn; ++d) {
      const int64_t row = h * (dn + dv) + d;
      const float want = E4M3ToF32(static_cast<const uint8_t*>(kv_b.w)[row * R + r]) *
                         kv_b.scale_inv[(row / 128) * block_cols + r / 128];
      ASSERT_EQ(static_cast<const float*>(a.uk_t)[(h * R + r) * dn + d], want) << r << " " << d;
    }
  }
}

TEST(MlaTest, ModelsWithoutMlaGetNoTables) {
  Absorbed t("qwen3_moe-tiny");
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t.mla.bytes(), 0u);
}

}  // namespace
}  // namespace joule
