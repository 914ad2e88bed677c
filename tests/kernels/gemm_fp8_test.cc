// The GEMMs over block-scaled FP8 (E4M3) weights, on every ISA: the in-register
// decode of all 256 codes against the format's definition, and products
// against a naive reference that dequantizes first (code value times its
// block's scale, one F32 rounding, as DeepSeek's weight_dequant) and then
// multiplies in double precision.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "kernels/cpu/gemm.h"
#include "tests/kernels/kernel_test_util.h"

namespace joule::kernels::cpu {
namespace {

using testing::FromBf16;
using testing::IsaThreadsTest;
using testing::RandomFloats;
using testing::ToBf16;

// OCP E4M3 ("e4m3fn"), from its definition: sign, 4 exponent bits with bias 7,
// 3 mantissa bits; exponent 0 is subnormal (mantissa * 2^-9); S.1111.111 is NaN.
double E4M3Value(uint8_t code) {
  const int exponent = (code >> 3) & 0xf, mantissa = code & 0x7;
  if (exponent == 0xf && mantissa == 0x7) return std::numeric_limits<double>::quiet_NaN();
  const double magnitude = exponent == 0 ? mantissa * std::ldexp(1.0, -9)
                                         : (1.0 + mantissa / 8.0) * std::ldexp(1.0, exponent - 7);
  return (code & 0x80) ? -magnitude : magnitude;
}

TEST(E4M3Test, DefinitionSpotValues) {
  EXPECT_EQ(E4M3Value(0x00), 0.0);
  EXPECT_EQ(E4M3Value(0x01), std::ldexp(1.0, -9));      // smallest subnormal
  EXPECT_EQ(E4M3Value(0x07), 7 * std::ldexp(1.0, -9));  // largest subnormal
  EXPECT_EQ(E4M3Value(0x08), std::ldexp(1.0, -6));      // smallest normal
  EXPECT_EQ(E4M3Value(0x38), 1.0);
  EXPECT_EQ(E4M3Value(0x40), 2.0);
  EXPECT_EQ(E4M3Value(0x77), 240.0);
  EXPECT_EQ(E4M3Value(0x7e), 448.0);  // largest finite
  EXPECT_EQ(E4M3Value(0xfe), -448.0);
  EXPECT_EQ(E4M3Value(0xb8), -1.0);
  EXPECT_TRUE(std::isnan(E4M3Value(0x7f)));
  EXPECT_TRUE(std::isnan(E4M3Value(0xff)));
  EXPECT_TRUE(std::signbit(E4M3Value(0x80)));
}

// [n, k] E4M3 codes, their [ceil(n/rows), ceil(k/cols)] scales, and the
// dequantized F32 weights the reference multiplies by.
struct Fp8Weights {
  std::vector<uint8_t> codes;
  std::vector<float> scales;
  std::vector<float> dequantized;
  WeightBlocks blocks;
};

Fp8Weights MakeFp8Weights(int64_t n, int64_t k, WeightBlocks blocks, uint32_t seed) {
  Fp8Weights w;
  w.blocks = blocks;
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> code(0, 253);  // every finite magnitude, both signs
  const int64_t grid_rows = (n + blocks.rows - 1) / blocks.rows;
  const int64_t grid_cols = (k + blocks.cols - 1) / blocks.cols;
  w.scales = RandomFloats(grid_rows * grid_cols, seed + 1, 1e-4f, 3e-2f);
  w.codes.resize(n * k);
  w.dequantized.resize(n * k);
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t c = 0; c < k; ++c) {
      int v = code(rng);
      if ((v & 0x7f) == 0x7f) v ^= 1;  // no NaN codes here
      w.codes[r * k + c] = static_cast<uint8_t>(v);
      const float scale = w.scales[(r / blocks.rows) * grid_cols + c / blocks.cols];
      w.dequantized[r * k + c] = static_cast<float>(E4M3Value(static_cast<uint8_t>(v))) * scale;
    }
  }
  return w;
}

// y rows [m0, m1) against x . dequantized^T in double (+ bias, + y_before),
// within the F32 summation-order bound of gemm_test.cc's ExpectGemmMatches.
void ExpectMatchesDequantized(const float* x, int64_t ldx, const std::vector<float>& w,
                              const float* bias, const std::vector<float>& y_before, const float* y,
                              int64_t ldy, int64_t m0, int64_t m1, int64_t n, int64_t k) {
  for (int64_t i = m0; i < m1; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double ref = 0.0, mag = 0.0;
      for (int64_t kk = 0; kk < k; ++kk) {
        const double t = static_cast<double>(x[i * ldx + kk]) * w[j * k + kk];
        ref += t;
        mag += std::fabs(t);
      }
      if (bias != nullptr) {
        ref += bias[j];
        mag += std::fabs(bias[j]);
      }
      if (!y_before.empty()) {
        ref += y_before[i * ldy + j];
        mag += std::fabs(y_before[i * ldy + j]);
      }
      ASSERT_NEAR(y[i * ldy + j], ref, (k + 3) * 6e-8 * mag + 1e-30)
          << "row " << i << " col " << j << " k " << k;
    }
  }
}

class Fp8GemmTest : public IsaThreadsTest {};

// Row r of W holds code r everywhere, scale 1: one-hot rows of x read single
// weights through the vector body (column 5), a vector tail (column k - 1) and,
// at k = 10, the short-row form (weights widened while transposed).
TEST_P(Fp8GemmTest, DecodesEveryCodeExactly) {
  for (int64_t k : {int64_t{67}, int64_t{10}}) {
    SCOPED_TRACE(::testing::Message() << "k=" << k);
    const int64_t n = 256;
    std::vector<uint8_t> codes(n * k);
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t c = 0; c < k; ++c) codes[r * k + c] = static_cast<uint8_t>(r);
    }
    const WeightBlocks blocks{.rows = 128, .cols = 128};
    const std::vector<float> scales((n / 128) * ((k + 127) / 128), 1.0f);
    const std::vector<int64_t> hot = {5, k - 1};
    std::vector<float> x(hot.size() * k, 0.0f);
    for (size_t i = 0; i < hot.size(); ++i) x[i * k + hot[i]] = 1.0f;
    std::vector<float> y(hot.size() * n, -7.0f);
    GemmParams p;
    p.x = x.data();
    p.m = static_cast<int64_t>(hot.size());
    p.k = k;
    p.w = codes.data();
    p.w_type = WeightType::kF8E4M3;
    p.w_scale_inv = scales.data();
    p.w_blocks = blocks;
    p.n = n;
    p.y = y.data();
    LaunchGemm(p, stream());
    for (size_t i = 0; i < hot.size(); ++i) {
      for (int64_t code = 0; code < n; ++code) {
        const double want = E4M3Value(static_cast<uint8_t>(code));
        const float got = y[i * n + code];
        if (std::isnan(want)) {
          EXPECT_TRUE(std::isnan(got)) << "code 0x" << std::hex << code << " column " << hot[i];
        } else {
          EXPECT_EQ(got, want) << "code 0x" << std::hex << code << " column " << std::dec << hot[i];
        }
      }
    }
  }
}

TEST_P(Fp8GemmTest, MatchesDequantizedReference) {
  uint32_t seed = 1;
  for (const WeightBlocks blocks : {WeightBlocks{.rows = 128, .cols = 128},
                                    WeightBlocks{.rows = 32, .cols = 48},
                                    WeightBlocks{.rows = 3, .cols = 5}}) {
    for (int64_t m : {1, 2, 3, 4, 5, 8, 17}) {
      for (int64_t k : {7, 33, 128, 200, 300}) {
        for (int64_t n : {1, 13, 130, 257}) {
          const bool fancy = (m + k + n) % 2 == 1;  // padded strides, bias, accumulate
          SCOPED_TRACE(::testing::Message() << "blocks " << blocks.rows << "x" << blocks.cols
                                            << " m=" << m << " k=" << k << " n=" << n
                                            << " fancy=" << fancy);
          const int64_t ldx = fancy ? k + 3 : k;
          const int64_t ldy = fancy ? n + 5 : n;
          const Fp8Weights w = MakeFp8Weights(n, k, blocks, ++seed);
          const auto x = RandomFloats(m * ldx, ++seed);
          const auto bias = RandomFloats(n, ++seed);
          std::vector<float> y = RandomFloats(m * ldy, ++seed);
          const std::vector<float> y_before = y;
          GemmParams p;
          p.x = x.data();
          p.m = m;
          p.k = k;
          p.ldx = ldx;
          p.w = w.codes.data();
          p.w_type = WeightType::kF8E4M3;
          p.w_scale_inv = w.scales.data();
          p.w_blocks = blocks;
          p.n = n;
          p.bias = fancy ? bias.data() : nullptr;
          p.y = y.data();
          p.ldy = ldy;
          p.accumulate = fancy;
          LaunchGemm(p, stream());
          ExpectMatchesDequantized(x.data(), ldx, w.dequantized, p.bias,
                                   fancy ? y_before : std::vector<float>{}, y.data(), ldy, 0, m, n, k);
          for (int64_t i = 0; i < m; ++i) {
            for (int64_t j = n; j < ldy; ++j) ASSERT_EQ(y[i * ldy + j], y_before[i * ldy + j]);
          }
        }
      }
    }
  }
}

// A column chunk of a weight (rows [first_row, first_row + n) of it, as the
// chunked down projection passes them) keeps its rows' scales: same bits as
// those columns of the whole product.
TEST_P(Fp8GemmTest, ChunkOfRowsKeepsItsBlocksScales) {
  const int64_t m = 5, k = 300, n = 300, first = 64, chunk = 100;
  const WeightBlocks blocks{.rows = 128, .cols = 128};
  const Fp8Weights w = MakeFp8Weights(n, k, blocks, 77);
  const auto x = RandomFloats(m * k, 78);
  std::vector<float> whole(m * n), part(m * chunk);
  GemmParams p;
  p.x = x.data();
  p.m = m;
  p.k = k;
  p.w = w.codes.data();
  p.w_type = WeightType::kF8E4M3;
  p.w_scale_inv = w.scales.data();
  p.w_blocks = blocks;
  p.n = n;
  p.y = whole.data();
  LaunchGemm(p, stream());
  p.w = w.codes.data() + first * k;
  p.w_blocks.first_row = first;
  p.n = chunk;
  p.y = part.data();
  LaunchGemm(p, stream());
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < chunk; ++j) {
      ASSERT_EQ(part[i * chunk + j], whole[i * n + first + j]) << "row " << i << " col " << j;
    }
  }
  ExpectMatchesDequantized(x.data(), k, w.dequantized, nullptr, {}, whole.data(), n, 0, m, n, k);
}

// Experts' FP8 weights, each with its own scales, over BF16 rows gathered in
// place and scatter-added with router weights (the MoE down projection's form).
TEST_P(Fp8GemmTest, GroupedMatchesPerGroupReference) {
  const std::vector<int64_t> rows = {3, 0, 6, 1, 9};
  const WeightBlocks blocks{.rows = 128, .cols = 128};
  for (const int64_t k : {int64_t{8}, int64_t{150}}) {
    for (const bool scatter : {false, true}) {
      SCOPED_TRACE(::testing::Message() << "k=" << k << " scatter=" << scatter);
      const int64_t n = 141;
      std::vector<int64_t> offsets{0};
      std::vector<Fp8Weights> w;
      std::vector<const void*> codes, scales;
      for (size_t g = 0; g < rows.size(); ++g) {
        offsets.push_back(offsets.back() + rows[g]);
        w.push_back(MakeFp8Weights(n, k, blocks, 500 + static_cast<uint32_t>(g)));
        codes.push_back(rows[g] == 0 ? nullptr : w.back().codes.data());
        scales.push_back(rows[g] == 0 ? nullptr : w.back().scales.data());
      }
      const int64_t total = offsets.back();
      const int64_t src_rows = 7, ld = k + 4;
      const auto src = RandomFloats(src_rows * ld, 61);
      std::vector<uint16_t> src_bf16(src.size());
      for (size_t i = 0; i < src.size(); ++i) src_bf16[i] = ToBf16(src[i]);
      std::vector<int32_t> x_rows(total), y_rows(total);
      std::vector<float> dense(total * k);
      for (int64_t r = 0; r < total; ++r) {
        x_rows[r] = static_cast<int32_t>((r * 3 + 1) % src_rows);
        y_rows[r] = static_cast<int32_t>(r % 4);
        for (int64_t kk = 0; kk < k; ++kk) dense[r * k + kk] = FromBf16(src_bf16[x_rows[r] * ld + kk]);
      }
      const auto scale = RandomFloats(total, 62);
      const int64_t out_rows = scatter ? 4 : total;
      std::vector<float> y(out_rows * n, 0.0f);
      GroupedGemmParams p;
      p.num_groups = static_cast<int>(rows.size());
      p.x = src_bf16.data();
      p.x_type = RowType::kBF16;
      p.ldx = ld;
      p.x_rows = x_rows.data();
      p.row_offsets = offsets.data();
      p.k = k;
      p.n = n;
      p.w = codes.data();
      p.w_type = WeightType::kF8E4M3;
      p.w_scale_inv = scales.data();
      p.w_blocks = blocks;
      p.y = y.data();
      if (scatter) {
        p.y_rows = y_rows.data();
        p.row_scale = scale.data();
      }
      LaunchGroupedGemm(p, stream());
      if (!scatter) {
        for (size_t g = 0; g < rows.size(); ++g) {
          ExpectMatchesDequantized(dense.data(), k, w[g].dequantized, nullptr, {}, y.data(), n,
                                   offsets[g], offsets[g + 1], n, k);
        }
        continue;
      }
      for (int64_t o = 0; o < out_rows; ++o) {
        for (int64_t j = 0; j < n; ++j) {
          double ref = 0.0, mag = 0.0;
          for (size_t g = 0; g < rows.size(); ++g) {
            for (int64_t r = offsets[g]; r < offsets[g + 1]; ++r) {
              if (y_rows[r] != o) continue;
              double dot = 0.0, dot_mag = 0.0;
              for (int64_t kk = 0; kk < k; ++kk) {
                const double t = static_cast<double>(dense[r * k + kk]) * w[g].dequantized[j * k + kk];
                dot += t;
                dot_mag += std::fabs(t);
              }
              ref += scale[r] * dot;
              mag += std::fabs(scale[r]) * dot_mag;
            }
          }
          ASSERT_NEAR(y[o * n + j], ref, (k + 3 + total) * 6e-8 * mag + 1e-30)
              << "out row " << o << " col " << j;
        }
      }
    }
  }
}

JOULE_INSTANTIATE_ISA_THREADS(Fp8GemmTest);

}  // namespace
}  // namespace joule::kernels::cpu
