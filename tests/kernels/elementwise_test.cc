#include "kernels/cpu/elementwise.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
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

TEST_P(ElementwiseTest, RmsNormStridedRowsLeaveTailColumnsUntouched) {
  // MLA normalizes the latent part of rows that also hold the rope key.
  const int64_t rows = 7, cols = 37, stride = 53;
  const auto x0 = RandomFloats(rows * stride, 21, -3.0f, 3.0f);
  const auto weight = RandomFloats(cols, 22, 0.5f, 1.5f);
  const auto out0 = RandomFloats(rows * stride, 23);  // what must stay in the tail
  auto x = x0, out = out0;
  RmsNormParams p;
  p.x = x.data();
  p.weight = weight.data();
  p.out = out.data();
  p.rows = rows;
  p.cols = cols;
  p.eps = 1e-5f;
  p.stride = stride;
  LaunchRmsNorm(p, stream());
  EXPECT_EQ(x, x0);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x0.data() + r * stride;
    double ss = 0.0;
    for (int64_t c = 0; c < cols; ++c) ss += double(xr[c]) * xr[c];
    const double inv = 1.0 / std::sqrt(ss / cols + 1e-5);
    for (int64_t c = 0; c < cols; ++c) {
      const double ref = xr[c] * inv * weight[c];
      ASSERT_NEAR(out[r * stride + c], ref, 1e-6 * (1.0 + std::fabs(ref))) << r << "," << c;
    }
    // The tail bit for bit.
    EXPECT_EQ(0, std::memcmp(out.data() + r * stride + cols, out0.data() + r * stride + cols,
                             sizeof(float) * (stride - cols)))
        << "row " << r;
  }
  // In place: the normalized columns as above, x's own tail kept.
  p.out = x.data();
  LaunchRmsNorm(p, stream());
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < stride; ++c) {
      const float want = c < cols ? out[r * stride + c] : x0[r * stride + c];
      ASSERT_EQ(x[r * stride + c], want) << r << "," << c;
    }
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

TEST(RopeTableTest, FromInverseFrequenciesWithScale) {
  // Arbitrary (YaRN-like) frequencies: the table must use them, not theta's.
  const int half = 5;
  const int64_t max_pos = 1000;
  const std::vector<float> inv_freq = {1.0f, 0.37f, 0.051f, 3e-3f, 1.7e-5f};
  const float scale = 1.2345f;
  std::vector<float> cos(max_pos * half), sin(cos.size());
  BuildRopeTable(inv_freq.data(), half, max_pos, scale, cos.data(), sin.data());
  for (int64_t pos : {0, 1, 2, 77, 999}) {
    for (int i = 0; i < half; ++i) {
      const float angle = static_cast<float>(pos) * inv_freq[i];  // F32, as transformers
      ASSERT_NEAR(cos[pos * half + i], std::cos(double(angle)) * scale, 4e-7) << pos << " " << i;
      ASSERT_NEAR(sin[pos * half + i], std::sin(double(angle)) * scale, 4e-7) << pos << " " << i;
    }
  }
  // Scale 1 with theta's frequencies is the theta overload, bit for bit.
  const int head_dim = 16;
  std::vector<float> theta_freq(head_dim / 2);
  for (int i = 0; i < head_dim / 2; ++i) {
    theta_freq[i] = 1.0f / std::pow(10000.0f, static_cast<float>(2 * i) / head_dim);
  }
  std::vector<float> c1(64 * head_dim / 2), s1(c1.size()), c2(c1.size()), s2(c1.size());
  BuildRopeTable(theta_freq.data(), head_dim / 2, 64, 1.0f, c1.data(), s1.data());
  BuildRopeTable(10000.0f, head_dim, 64, c2.data(), s2.data());
  EXPECT_EQ(c1, c2);
  EXPECT_EQ(s1, s2);
}

// y = x rotated by one position's angles, in double: rotate_half (HF's default)
// or the pairs (x0, x1), (x2, x3), ... (interleaved).
std::vector<double> RotateRef(const float* x, const float* c, const float* s, int head_dim,
                              bool interleaved) {
  const int half = head_dim / 2;
  std::vector<double> y(head_dim);
  for (int i = 0; i < half; ++i) {
    const int a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
    y[a] = double(x[a]) * c[i] - double(x[b]) * s[i];
    y[b] = double(x[b]) * c[i] + double(x[a]) * s[i];
  }
  return y;
}

TEST_P(ElementwiseTest, RopeInterleavedMatchesPairsAndHuggingFaceDotProducts) {
  const int head_dim = 64, half = 32, nq = 3, nkv = 2;
  const int64_t tokens = 13, max_pos = 500;
  std::vector<float> cos(max_pos * half), sin(max_pos * half);
  BuildRopeTable(10000.0f, head_dim, max_pos, cos.data(), sin.data());
  const auto q0 = RandomFloats(tokens * nq * head_dim, 31);
  const auto k0 = RandomFloats(tokens * nkv * head_dim, 32);
  auto q = q0, k = k0;
  std::vector<int32_t> positions(tokens);
  for (int64_t t = 0; t < tokens; ++t) positions[t] = static_cast<int32_t>((t * 131 + 9) % max_pos);
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
  p.interleaved = true;
  LaunchRope(p, stream());

  // 1. The direct pair formula, element by element.
  for (int64_t t = 0; t < tokens; ++t) {
    const float* c = cos.data() + positions[t] * half;
    const float* s = sin.data() + positions[t] * half;
    for (int h = 0; h < nq + nkv; ++h) {
      const bool is_q = h < nq;
      const int64_t off = is_q ? (t * nq + h) * head_dim : (t * nkv + h - nq) * head_dim;
      const auto ref = RotateRef((is_q ? q0 : k0).data() + off, c, s, head_dim, true);
      for (int e = 0; e < head_dim; ++e) {
        ASSERT_NEAR((is_q ? q : k)[off + e], ref[e], 2e-7) << t << " " << h << " " << e;
      }
    }
  }

  // 2. HF's apply_rotary_pos_emb_interleave: reorder each head's pairs into
  // halves (x0, x2, .., x1, x3, ..), then x * cos + rotate_half(x) * sin. The
  // outputs differ by that permutation, so every q.k must agree.
  auto hf = [&](const std::vector<float>& x0, int64_t t, int64_t off) {
    std::vector<float> d(head_dim);
    for (int i = 0; i < half; ++i) {
      d[i] = x0[off + 2 * i];
      d[i + half] = x0[off + 2 * i + 1];
    }
    std::vector<double> y(head_dim);
    const float* c = cos.data() + positions[t] * half;
    const float* s = sin.data() + positions[t] * half;
    for (int e = 0; e < head_dim; ++e) {
      const double rot = e < half ? -double(d[e + half]) : double(d[e - half]);  // rotate_half
      y[e] = d[e] * double(c[e % half]) + rot * s[e % half];  // cos/sin repeated over both halves
    }
    return y;
  };
  for (int64_t tq = 0; tq < tokens; ++tq) {
    for (int64_t tk = 0; tk < tokens; tk += 3) {
      for (int hq = 0; hq < nq; ++hq) {
        const int hk = hq % nkv;
        const int64_t qoff = (tq * nq + hq) * head_dim, koff = (tk * nkv + hk) * head_dim;
        const auto hq_ref = hf(q0, tq, qoff), hk_ref = hf(k0, tk, koff);
        double want = 0.0, got = 0.0;
        for (int e = 0; e < head_dim; ++e) {
          want += hq_ref[e] * hk_ref[e];
          got += double(q[qoff + e]) * k[koff + e];
        }
        ASSERT_NEAR(got, want, 1e-5) << "q token " << tq << " k token " << tk << " head " << hq;
      }
    }
  }
}

TEST_P(ElementwiseTest, RopeStridedHeadsAndSeparateQueryOutput) {
  // DeepSeek-V3's MLA layout: each q head is [nope (dn), rope (hd)] and the
  // rotated rope part goes to the end of a [latent (R), rope (hd)] row of q_out;
  // k's rope parts sit after a latent in rows of k_row_stride (two heads here).
  const int hd = 16, half = 8, nq = 3, nkv = 2, dn = 5, R = 11;
  const int64_t tokens = 6, max_pos = 50, q_head = dn + hd, out_head = R + hd;
  const int64_t k_row = R + nkv * hd + 3;  // 3 floats of padding after the last head
  std::vector<float> cos(max_pos * half), sin(max_pos * half);
  BuildRopeTable(10000.0f, hd, max_pos, cos.data(), sin.data());
  std::vector<int32_t> positions = {3, 0, 49, 17, 17, 8};
  for (bool interleaved : {false, true}) {
    const auto q0 = RandomFloats(tokens * nq * q_head, 41);
    const auto out0 = RandomFloats(tokens * nq * out_head, 42);
    const auto k0 = RandomFloats(tokens * k_row, 43);
    auto q = q0, out = out0, k = k0;
    RopeParams p;
    p.q = q.data() + dn;
    p.k = k.data() + R;
    p.positions = positions.data();
    p.tokens = tokens;
    p.num_q_heads = nq;
    p.num_kv_heads = nkv;
    p.head_dim = hd;
    p.cos = cos.data();
    p.sin = sin.data();
    p.q_head_stride = q_head;
    p.q_out = out.data() + R;
    p.q_out_head_stride = out_head;
    p.k_row_stride = k_row;
    p.interleaved = interleaved;
    LaunchRope(p, stream());

    EXPECT_EQ(q, q0) << "q must stay as it was when q_out is set";
    // Expected: the inputs as they were, with the rotated parts replaced.
    std::vector<double> want_out(out0.begin(), out0.end()), want_k(k0.begin(), k0.end());
    std::vector<bool> out_rotated(out.size()), k_rotated(k.size());
    for (int64_t t = 0; t < tokens; ++t) {
      const float* c = cos.data() + positions[t] * half;
      const float* s = sin.data() + positions[t] * half;
      for (int h = 0; h < nq; ++h) {
        const int64_t at = (t * nq + h) * out_head + R;
        const auto y = RotateRef(q0.data() + (t * nq + h) * q_head + dn, c, s, hd, interleaved);
        std::copy(y.begin(), y.end(), want_out.begin() + at);
        std::fill_n(out_rotated.begin() + at, hd, true);
      }
      for (int h = 0; h < nkv; ++h) {
        const int64_t at = t * k_row + R + h * hd;
        const auto y = RotateRef(k0.data() + at, c, s, hd, interleaved);
        std::copy(y.begin(), y.end(), want_k.begin() + at);
        std::fill_n(k_rotated.begin() + at, hd, true);
      }
    }
    // Rotated values within rounding; everything else (latents, padding) bit for bit.
    for (size_t i = 0; i < out.size(); ++i) {
      if (out_rotated[i]) {
        ASSERT_NEAR(out[i], want_out[i], 2e-7) << "q_out " << i << " interleaved " << interleaved;
      } else {
        ASSERT_EQ(out[i], out0[i]) << "q_out " << i << " interleaved " << interleaved;
      }
    }
    for (size_t i = 0; i < k.size(); ++i) {
      if (k_rotated[i]) {
        ASSERT_NEAR(k[i], want_k[i], 2e-7) << "k " << i << " interleaved " << interleaved;
      } else {
        ASSERT_EQ(k[i], k0[i]) << "k " << i << " interleaved " << interleaved;
      }
    }
  }
}

JOULE_INSTANTIATE_ISA_THREADS(ElementwiseTest);

}  // namespace
}  // namespace joule::kernels::cpu
