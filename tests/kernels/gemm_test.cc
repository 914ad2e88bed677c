#include "kernels/cpu/gemm.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "tests/kernels/kernel_test_util.h"

namespace joule::kernels::cpu {
namespace {

using testing::FromBf16;
using testing::IsaThreadsTest;
using testing::RandomFloats;
using testing::ToBf16;

// Weights as the kernel sees them plus their exact F32 values for the reference.
struct Weights {
  std::vector<uint16_t> bf16;
  std::vector<float> f32;  // exact values of the weights (BF16 widens exactly)
  const void* data(WeightType t) const {
    return t == WeightType::kBF16 ? static_cast<const void*>(bf16.data()) : f32.data();
  }
};

Weights MakeWeights(int64_t n, int64_t k, WeightType t, uint32_t seed) {
  Weights w;
  w.f32 = RandomFloats(n * k, seed);
  if (t == WeightType::kBF16) {
    w.bf16.resize(w.f32.size());
    for (size_t i = 0; i < w.f32.size(); ++i) {
      w.bf16[i] = ToBf16(w.f32[i]);
      w.f32[i] = FromBf16(w.bf16[i]);
    }
  }
  return w;
}

// Checks y rows [m0, m1) against a double-precision reference.
// Tolerance: any F32 summation order of k products is within
// gamma_{k+2} * sum|terms| of the exact value, gamma_j ~ j * 2^-24 (Higham);
// the kernel differs from the reference only in accumulation order and
// rounding, so this bound cannot be exceeded by a correct kernel while an
// indexing bug is off by O(sum|terms|).
void ExpectGemmMatches(const float* x, int64_t ldx, const std::vector<float>& w, const float* bias,
                       const std::vector<float>& y_before, const float* y, int64_t ldy,
                       int64_t m0, int64_t m1, int64_t n, int64_t k, bool accumulate) {
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
      if (accumulate) {
        ref += y_before[i * ldy + j];
        mag += std::fabs(y_before[i * ldy + j]);
      }
      const double tol = (k + 3) * 6e-8 * mag + 1e-30;
      ASSERT_NEAR(y[i * ldy + j], ref, tol) << "row " << i << " col " << j << " k " << k;
    }
  }
}

class GemmTest : public IsaThreadsTest {};

TEST_P(GemmTest, MatchesReferenceOnAwkwardShapes) {
  uint32_t seed = 1;
  for (WeightType wt : {WeightType::kBF16, WeightType::kF32}) {
    for (int64_t m : {1, 2, 3, 4, 6, 7, 8, 17, 65}) {
      for (int64_t k : {1, 7, 16, 33, 100, 257}) {
        for (int64_t n : {1, 13, 31, 77}) {
          for (int variant = 0; variant < 2; ++variant) {
            // variant 1: padded strides, bias, accumulate into existing y.
            const bool fancy = variant == 1;
            const int64_t ldx = fancy ? k + 3 : k;
            const int64_t ldy = fancy ? n + 5 : n;
            auto x = RandomFloats(m * ldx, ++seed);
            Weights w = MakeWeights(n, k, wt, ++seed);
            auto bias = RandomFloats(n, ++seed);
            auto y = RandomFloats(m * ldy, ++seed);
            // Padding columns of y must survive untouched.
            for (int64_t i = 0; i < m; ++i)
              for (int64_t j = n; j < ldy; ++j) y[i * ldy + j] = 1234.5f;
            const std::vector<float> y_before = y;

            GemmParams p;
            p.x = x.data();
            p.m = m;
            p.k = k;
            p.ldx = fancy ? ldx : 0;
            p.w = w.data(wt);
            p.w_type = wt;
            p.n = n;
            p.bias = fancy ? bias.data() : nullptr;
            p.y = y.data();
            p.ldy = fancy ? ldy : 0;
            p.accumulate = fancy;
            LaunchGemm(p, stream());

            SCOPED_TRACE(::testing::Message() << "bf16=" << (wt == WeightType::kBF16) << " m=" << m
                                              << " k=" << k << " n=" << n << " fancy=" << fancy);
            ExpectGemmMatches(x.data(), ldx, w.f32, p.bias, y_before, y.data(), ldy, 0, m, n, k,
                              fancy);
            for (int64_t i = 0; i < m; ++i)
              for (int64_t j = n; j < ldy; ++j) ASSERT_EQ(y[i * ldy + j], 1234.5f);
          }
        }
      }
    }
  }
}

// Batch invariance: a row's outputs are the same bits whether it is computed
// alone or among other rows, at any position (expert parallelism regroups
// rows, and serving must not change a request's tokens with its batch).
TEST_P(GemmTest, RowResultDoesNotDependOnItsBatch) {
  const int64_t n = 45, m = 9;
  for (WeightType wt : {WeightType::kBF16, WeightType::kF32}) {
    for (int64_t k : {5, 8, 20, 37, 300}) {  // the short-row form and the dot-product tiles
      SCOPED_TRACE(::testing::Message() << "bf16=" << (wt == WeightType::kBF16) << " k=" << k);
      const auto x = RandomFloats(m * k, 31 + static_cast<uint32_t>(k));
      Weights w = MakeWeights(n, k, wt, 41);
      std::vector<float> batch(m * n);
      GemmParams p;
      p.x = x.data();
      p.m = m;
      p.k = k;
      p.w = w.data(wt);
      p.w_type = wt;
      p.n = n;
      p.y = batch.data();
      LaunchGemm(p, stream());
      for (int64_t r = 0; r < m; ++r) {
        std::vector<float> alone(n);
        p.x = x.data() + r * k;
        p.m = 1;
        p.y = alone.data();
        LaunchGemm(p, stream());
        for (int64_t j = 0; j < n; ++j) {
          ASSERT_EQ(alone[j], batch[r * n + j]) << "row " << r << " col " << j;
        }
      }
    }
  }
}

// A strided batch laid out as MLA's per-head products: head h reads columns
// [h * k, (h + 1) * k) of each x row and writes columns [h * n, (h + 1) * n) of
// each y row. Every member must give the bits of the same GEMM run alone, and
// y's padding columns stay untouched.
TEST_P(GemmTest, BatchedMembersMatchTheirOwnGemmsBitForBit) {
  const int64_t heads = 5, m = 3, k = 40, n = 24;
  for (WeightType wt : {WeightType::kBF16, WeightType::kF32}) {
    SCOPED_TRACE(::testing::Message() << "bf16=" << (wt == WeightType::kBF16));
    const int64_t ldx = heads * k + 3, ldy = heads * n + 2;
    const auto x = RandomFloats(m * ldx, 61);
    Weights w = MakeWeights(heads * n, k, wt, 62);  // heads [n, k] matrices, back to back
    const auto y0 = RandomFloats(m * ldy, 63);
    GemmParams p;
    p.x = x.data();
    p.m = m;
    p.k = k;
    p.ldx = ldx;
    p.w = w.data(wt);
    p.w_type = wt;
    p.n = n;
    p.ldy = ldy;
    p.accumulate = true;
    p.batch = heads;
    p.x_batch_stride = k;
    p.w_batch_stride = n * k;
    p.y_batch_stride = n;
    std::vector<float> batched = y0, alone = y0;
    p.y = batched.data();
    LaunchGemm(p, stream());
    for (int64_t h = 0; h < heads; ++h) {
      GemmParams one = p;
      one.y = alone.data();
      LaunchGemm(GemmBatchMember(one, h), stream());
    }
    ASSERT_EQ(batched, alone);
    for (int64_t h = 0; h < heads; ++h) {  // the members themselves against the reference
      SCOPED_TRACE(::testing::Message() << "head " << h);
      const std::vector<float> w_head(w.f32.begin() + h * n * k, w.f32.begin() + (h + 1) * n * k);
      const std::vector<float> before(y0.begin() + h * n, y0.end());
      ExpectGemmMatches(x.data() + h * k, ldx, w_head, nullptr, before, batched.data() + h * n,
                        ldy, 0, m, n, k, true);
    }
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = heads * n; j < ldy; ++j) ASSERT_EQ(batched[i * ldy + j], y0[i * ldy + j]);
    }
  }
}

// Large enough for many column blocks per thread and the full-width tiles.
TEST_P(GemmTest, MatchesReferenceOnModelSizedShape) {
  const int64_t m = 9, k = 1000, n = 515;
  auto x = RandomFloats(m * k, 7);
  Weights w = MakeWeights(n, k, WeightType::kBF16, 8);
  std::vector<float> y(m * n, std::numeric_limits<float>::quiet_NaN());
  GemmParams p;
  p.x = x.data();
  p.m = m;
  p.k = k;
  p.w = w.bf16.data();
  p.n = n;
  p.y = y.data();
  LaunchGemm(p, stream());
  ExpectGemmMatches(x.data(), k, w.f32, nullptr, {}, y.data(), n, 0, m, n, k, false);
}

// Groups of the given row counts over [n, k] weights (seeded seed + group),
// and LaunchGroupedGemm's parameters for them; an empty group's weights are null.
struct GroupedCase {
  std::vector<int64_t> offsets{0};
  std::vector<Weights> w;
  std::vector<const void*> wptr;
  GroupedGemmParams params;

  GroupedCase(const std::vector<int64_t>& rows, int64_t k, int64_t n, WeightType wt,
              uint32_t seed) {
    for (int64_t r : rows) offsets.push_back(offsets.back() + r);
    for (size_t g = 0; g < rows.size(); ++g) {
      w.push_back(MakeWeights(n, k, wt, seed + g));
      wptr.push_back(rows[g] == 0 ? nullptr : w.back().data(wt));
    }
    params.num_groups = static_cast<int>(rows.size());
    params.row_offsets = offsets.data();
    params.k = k;
    params.n = n;
    params.w = wptr.data();
    params.w_type = wt;
  }
  GroupedCase(const GroupedCase&) = delete;  // params points into the members
  int64_t total() const { return offsets.back(); }
};

TEST_P(GemmTest, GroupedMatchesPerGroupReference) {
  const int64_t k = 45, n = 29;
  // Uneven groups, empty ones included (an empty group's weights may be null).
  const std::vector<int64_t> rows = {0, 5, 0, 17, 1, 40, 0};
  for (WeightType wt : {WeightType::kBF16, WeightType::kF32}) {
    GroupedCase c(rows, k, n, wt, 100);
    const int64_t total = c.total();
    const auto& offsets = c.offsets;
    const auto& w = c.w;
    auto x = RandomFloats(total * k, 11);
    std::vector<float> y(total * n, std::numeric_limits<float>::quiet_NaN());
    GroupedGemmParams p = c.params;
    p.x = x.data();
    p.y = y.data();
    LaunchGroupedGemm(p, stream());
    for (size_t g = 0; g < rows.size(); ++g) {
      SCOPED_TRACE(::testing::Message() << "group " << g);
      ExpectGemmMatches(x.data(), k, w[g].f32, nullptr, {}, y.data(), n, offsets[g],
                        offsets[g + 1], n, k, false);
    }
  }
}

// The fused MoE combine: rows of several groups scatter-add, weighted, into
// shared output rows; output rows nobody names keep their value; the sums do
// not depend on the thread count (each output row adds its terms in group order).
// k = 8 takes the short-row (transposed panel) form, as a tiny model's down
// projection does; k = 37 the dot-product tiles.
TEST_P(GemmTest, GroupedScatterAddMatchesWeightedReference) {
  const int64_t n = 141, out_rows = 9;  // past one 128-column panel, with a tail
  const std::vector<int64_t> rows = {3, 0, 6, 1, 11, 0, 4};
  for (const auto& [k, wt] : {std::pair{int64_t{37}, WeightType::kBF16},
                              std::pair{int64_t{37}, WeightType::kF32},
                              std::pair{int64_t{8}, WeightType::kBF16},
                              std::pair{int64_t{8}, WeightType::kF32}}) {
    SCOPED_TRACE(::testing::Message() << "bf16=" << (wt == WeightType::kBF16) << " k=" << k);
    GroupedCase c(rows, k, n, wt, 200);
    const int64_t total = c.total();
    const auto& offsets = c.offsets;
    const auto& w = c.w;
    std::vector<int32_t> y_rows(total);
    for (int64_t r = 0; r < total; ++r) y_rows[r] = static_cast<int32_t>((r * 5) % (out_rows - 1));
    const auto scale = RandomFloats(total, 21);
    const auto x = RandomFloats(total * k, 22);
    const auto y_before = RandomFloats(out_rows * n, 23);
    std::vector<float> y = y_before;
    GroupedGemmParams p = c.params;
    p.x = x.data();
    p.y = y.data();
    p.y_rows = y_rows.data();
    p.row_scale = scale.data();
    LaunchGroupedGemm(p, stream());

    std::vector<double> ref(y_before.begin(), y_before.end()), mag(out_rows * n);
    for (int64_t i = 0; i < out_rows * n; ++i) mag[i] = std::fabs(y_before[i]);
    for (size_t g = 0; g < rows.size(); ++g) {
      for (int64_t r = offsets[g]; r < offsets[g + 1]; ++r) {
        for (int64_t j = 0; j < n; ++j) {
          double dot = 0.0, dot_mag = 0.0;
          for (int64_t kk = 0; kk < k; ++kk) {
            const double t = static_cast<double>(x[r * k + kk]) * w[g].f32[j * k + kk];
            dot += t;
            dot_mag += std::fabs(t);
          }
          ref[y_rows[r] * n + j] += scale[r] * dot;
          mag[y_rows[r] * n + j] += std::fabs(scale[r]) * dot_mag;
        }
      }
    }
    for (int64_t i = 0; i < out_rows; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        if (i == out_rows - 1) {
          ASSERT_EQ(y[i * n + j], y_before[i * n + j]) << "row " << i << " is named by no row";
          continue;
        }
        // A dot product's bound (see ExpectGemmMatches) plus one rounding per added term.
        const double tol = (k + 3 + total) * 6e-8 * mag[i * n + j] + 1e-30;
        ASSERT_NEAR(y[i * n + j], ref[i * n + j], tol) << "row " << i << " col " << j;
      }
    }
    // Bit for bit the same on one thread, whatever this instantiation's pool.
    std::vector<float> y1 = y_before;
    p.y = y1.data();
    LaunchGroupedGemm(p, CpuStream{});
    EXPECT_EQ(y1, y);
  }
}

// Rows read in place: BF16 (or F32) rows of a wider buffer, named by x_rows
// (one source row may feed several groups), give the same bits as the same
// values gathered into a dense F32 copy first.
TEST_P(GemmTest, GroupedReadsGatheredRowsInPlace) {
  const int64_t n = 29, src_rows = 11;
  const std::vector<int64_t> rows = {4, 0, 7, 1, 9};
  for (const int64_t k : {8, 37}) {  // the short-row form and the dot-product tiles
    for (RowType xt : {RowType::kBF16, RowType::kF32}) {
      for (WeightType wt : {WeightType::kBF16, WeightType::kF32}) {
        SCOPED_TRACE(::testing::Message() << "k=" << k << " x_bf16=" << (xt == RowType::kBF16)
                                          << " w_bf16=" << (wt == WeightType::kBF16));
        GroupedCase c(rows, k, n, wt, 300);
        const int64_t total = c.total();
        const int64_t ld = k + 5;  // source rows carry more than k elements
        const auto src_f32 = RandomFloats(src_rows * ld, 51);
        std::vector<uint16_t> src_bf16(src_f32.size());
        std::vector<float> src_exact(src_f32.size());  // the values the kernel sees
        for (size_t i = 0; i < src_f32.size(); ++i) {
          src_bf16[i] = ToBf16(src_f32[i]);
          src_exact[i] = xt == RowType::kBF16 ? FromBf16(src_bf16[i]) : src_f32[i];
        }
        std::vector<int32_t> x_rows(total);
        for (int64_t r = 0; r < total; ++r) x_rows[r] = static_cast<int32_t>((r * 7 + 3) % src_rows);
        std::vector<float> dense(total * k);
        for (int64_t r = 0; r < total; ++r) {
          for (int64_t kk = 0; kk < k; ++kk) dense[r * k + kk] = src_exact[x_rows[r] * ld + kk];
        }

        std::vector<float> want(total * n), got(total * n);
        GroupedGemmParams p = c.params;
        p.x = dense.data();
        p.y = want.data();
        LaunchGroupedGemm(p, stream());
        p.x = xt == RowType::kBF16 ? static_cast<const void*>(src_bf16.data()) : src_f32.data();
        p.x_type = xt;
        p.ldx = ld;
        p.x_rows = x_rows.data();
        p.y = got.data();
        LaunchGroupedGemm(p, stream());
        EXPECT_EQ(got, want);
        // And the dense path is right to begin with.
        for (size_t g = 0; g < rows.size(); ++g) {
          if (rows[g] == 0) continue;
          ExpectGemmMatches(dense.data(), k, c.w[g].f32, nullptr, {}, want.data(), n,
                            c.offsets[g], c.offsets[g + 1], n, k, false);
        }
      }
    }
  }
}

TEST_P(GemmTest, GroupedWithAllGroupsEmptyWritesNothing) {
  const std::vector<int64_t> offsets = {0, 0, 0};
  const void* w[2] = {nullptr, nullptr};
  float sentinel = 3.0f;
  GroupedGemmParams p;
  p.num_groups = 2;
  p.row_offsets = offsets.data();
  p.k = 8;
  p.n = 4;
  p.w = w;
  p.y = &sentinel;
  LaunchGroupedGemm(p, stream());
  EXPECT_EQ(sentinel, 3.0f);
}

JOULE_INSTANTIATE_ISA_THREADS(GemmTest);

}  // namespace
}  // namespace joule::kernels::cpu
