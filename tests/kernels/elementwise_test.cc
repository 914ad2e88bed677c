#include "kernels/cpu/elementwise.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "tests/kernels/kernel_test_util.h"

namespace joule::kernels::cpu {
namespace {

using testing::IsaThreadsTest;
using testing::RandomFloats;

class ElementwiseTest : public IsaThreadsTest {};

TEST_P(ElementwiseTest, RmsNormMatchesReferenceAndAllowsAliasing) {
  for (int64_t cols : {1, 17, 256, 1001}) {
    const int64_t rows = 9;
    auto x = RandomFloats(rows * cols, 3, -3.0f, 3.0f);
    auto weight = RandomFloats(cols, 4, 0.5f, 1.5f);
    std::vector<float> out(rows * cols);
    RmsNormParams p;
    p.x = x.data();
    p.weight = weight.data();
    p.out = out.data();
    p.rows = rows;
    p.cols = cols;
    p.eps = 1e-5f;
    LaunchRmsNorm(p, stream());
    for (int64_t r = 0; r < rows; ++r) {
      double ss = 0.0;
      for (int64_t c = 0; c < cols; ++c) ss += static_cast<double>(x[r * cols + c]) * x[r * cols + c];
      const double inv = 1.0 / std::sqrt(ss / cols + 1e-5);
      for (int64_t c = 0; c < cols; ++c) {
        // A few F32 roundings on O(1) values (mean, rsqrt, two products).
        const double ref = x[r * cols + c] * inv * weight[c];
        ASSERT_NEAR(out[r * cols + c], ref, 1e-6 * (1.0 + std::fabs(ref))) << r << "," << c;
      }
    }
    // In place gives the same bits.
    p.out = x.data();
    LaunchRmsNorm(p, stream());
    EXPECT_EQ(x, out);
  }
}

TEST_P(ElementwiseTest, SiluMulMatchesReferenceIncludingExtremes) {
  const int64_t n = 40001;
  auto gate = RandomFloats(n, 5, -20.0f, 20.0f);
  gate[0] = -100.0f;  // exp overflow side: silu -> -0
  gate[1] = 100.0f;
  gate[2] = 0.0f;
  auto up = RandomFloats(n, 6, -2.0f, 2.0f);
  std::vector<float> out(n);
  SiluMulParams p;
  p.gate = gate.data();
  p.up = up.data();
  p.out = out.data();
  p.n = n;
  LaunchSiluMul(p, stream());
  for (int64_t i = 0; i < n; ++i) {
    const double g = gate[i];
    const double ref = g / (1.0 + std::exp(-g)) * up[i];
    // expf is within a couple of ulp; the rest is three roundings.
    ASSERT_NEAR(out[i], ref, 1e-6 * (1.0 + std::fabs(ref))) << i;
  }
  // Aliased output (out == gate) gives the same values.
  p.out = gate.data();
  LaunchSiluMul(p, stream());
  EXPECT_EQ(gate, out);
}

TEST(RopeTableTest, MatchesFloat32HuggingFaceFormula) {
  const int head_dim = 128;
  const int64_t max_pos = 40000;
  const float theta = 1000000.0f;
  std::vector<float> cos(max_pos * head_dim / 2), sin(cos.size());
  BuildRopeTable(theta, head_dim, max_pos, cos.data(), sin.data());
  for (int64_t pos : {0, 1, 7, 4095, 32767, 39999}) {
    for (int i = 0; i < head_dim / 2; ++i) {
      // Hugging Face rounds inv_freq and the angle to F32; at pos ~ 4e4 the F32
      // angle differs from the exact one by up to ~2e-3 rad, so matching this
      // (and not the double angle) checks the F32 semantics.
      const float inv_freq = 1.0f / std::pow(theta, static_cast<float>(2 * i) / head_dim);
      const float angle = static_cast<float>(pos) * inv_freq;
      ASSERT_NEAR(cos[pos * 64 + i], std::cos(static_cast<double>(angle)), 2e-7) << pos << " " << i;
      ASSERT_NEAR(sin[pos * 64 + i], std::sin(static_cast<double>(angle)), 2e-7) << pos << " " << i;
    }
  }
  EXPECT_EQ(cos[0], 1.0f);
  EXPECT_EQ(sin[0], 0.0f);
}

TEST_P(ElementwiseTest, RopeRotatesHalvesWithTablePositions) {
  const int head_dim = 64, half = 32, nq = 4, nkv = 2;
  const int64_t tokens = 37, max_pos = 300;
  std::vector<float> cos(max_pos * half), sin(max_pos * half);
  BuildRopeTable(10000.0f, head_dim, max_pos, cos.data(), sin.data());
  auto q = RandomFloats(tokens * nq * head_dim, 8);
  auto k = RandomFloats(tokens * nkv * head_dim, 9);
  std::vector<int32_t> positions(tokens);
  for (int64_t t = 0; t < tokens; ++t) positions[t] = static_cast<int32_t>((t * 37 + 5) % max_pos);
  const auto q0 = q, k0 = k;
  RopeParams p;
  p.q = q.data();
  p.k = k.data();
  p.positions = positions.data();
  p.tokens = tokens;
  p.num_q_heads = nq;
  p.num_kv_heads = nkv;
  p.head_dim = head_dim;
  p.cos = cos.data();
  p.sin = sin.data();
  LaunchRope(p, stream());
  auto check = [&](const std::vector<float>& before, const std::vector<float>& after, int heads) {
    for (int64_t t = 0; t < tokens; ++t) {
      const float* c = cos.data() + positions[t] * half;
      const float* s = sin.data() + positions[t] * half;
      for (int h = 0; h < heads; ++h) {
        const float* x = before.data() + (t * heads + h) * head_dim;
        const float* y = after.data() + (t * heads + h) * head_dim;
        for (int i = 0; i < half; ++i) {
          ASSERT_NEAR(y[i], double(x[i]) * c[i] - double(x[i + half]) * s[i], 2e-7);
          ASSERT_NEAR(y[i + half], double(x[i + half]) * c[i] + double(x[i]) * s[i], 2e-7);
        }
      }
    }
  };
  check(q0, q, nq);
  check(k0, k, nkv);
}

JOULE_INSTANTIATE_ISA_THREADS(ElementwiseTest);

}  // namespace
}  // namespace joule::kernels::cpu
