// The CUDA grouped GEMM against kernels::cpu::LaunchGroupedGemm on the same
// inputs. x is drawn as BF16 values (the F32 x holds the same values), so both
// backends multiply identical numbers and differ only in how they sum: F32
// accumulation in different orders, the tensor cores adding blocks of exact
// products with truncation. Tolerance: 2e-6 * max over outputs of
// sum_k |x w| (times |row_scale|), plus 1e-5. At k = 2048 (sum about 512) that
// is 1e-3, several times the error expected from about 256 truncated block adds
// onto a partial sum near 15; a wrong row, column, group or k chunk is off by
// O(0.1..1). Validation tests need no device; the others skip without one.
#include "kernels/cuda/grouped_gemm.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cuda/grouped_tiles.h"
#include "tests/kernels/cuda/cuda_test_util.h"

namespace joule::kernels::cuda {
namespace {

using ::testing::HasSubstr;

// One grouped GEMM: group sizes, shapes and which options are in play.
struct Problem {
  std::vector<int64_t> group_rows;
  int64_t k = 64;
  int64_t n = 64;
  RowType x_type = RowType::kF32;
  int64_t ldx = 0;             // 0: k
  int64_t gather_rows = 0;     // > 0: x has this many rows, read through random x_rows
  bool scatter = false;        // y_rows into a y with 3 more rows than products
  bool row_scale = false;      // with scatter
  int64_t extra_max_rows = 0;  // max_rows = real total + this
  uint32_t seed = 1;
  // F32 x as drawn, not pre-rounded: the kernel must round it to the nearest
  // even BF16, which is what the CPU is given.
  bool unrounded_f32_x = false;
};

std::vector<uint16_t> RandomBf16(size_t count, uint32_t seed) {
  const std::vector<float> values = RandomFloats(count, seed);
  std::vector<uint16_t> bits(count);
  for (size_t i = 0; i < count; ++i) bits[i] = ToBf16(values[i]);
  return bits;
}

std::vector<int64_t> OffsetsOf(const std::vector<int64_t>& group_rows) {
  std::vector<int64_t> offsets(1, 0);
  for (int64_t rows : group_rows) offsets.push_back(offsets.back() + rows);
  return offsets;
}

// A Problem's host data and device copies. Weights of groups that start empty
// are null on both sides; x holds BF16 values (device: as x_type).
class GroupedData {
 public:
  explicit GroupedData(const Problem& pr) : pr_(pr), offsets_(OffsetsOf(pr.group_rows)) {
    const int64_t total = offsets_.back();
    const int groups = static_cast<int>(pr.group_rows.size());
    max_rows_ = total + pr.extra_max_rows;
    ld_ = pr.ldx != 0 ? pr.ldx : pr.k;
    // Without a gather, x has max_rows rows, so new offsets stay readable.
    const int64_t x_rows = pr.gather_rows > 0 ? pr.gather_rows : std::max<int64_t>(max_rows_, 1);
    const std::vector<float> x_drawn = RandomFloats(x_rows * ld_, pr.seed);
    x_bits_.resize(x_drawn.size());
    x_values_.resize(x_drawn.size());
    for (size_t i = 0; i < x_drawn.size(); ++i) {
      x_bits_[i] = ToBf16(x_drawn[i]);
      x_values_[i] = FromBf16(x_bits_[i]);
    }
    std::mt19937 rng(pr.seed + 1);
    if (pr.gather_rows > 0) {  // more products than rows: indices repeat
      std::uniform_int_distribution<int32_t> row(0, static_cast<int32_t>(pr.gather_rows - 1));
      x_rows_.resize(total);
      for (int32_t& r : x_rows_) r = row(rng);
    }
    out_rows_ = pr.scatter ? total + 3 : std::max<int64_t>(max_rows_, 1);
    if (pr.scatter) {  // distinct y rows (CUDA requires it); 3 rows named by none
      std::vector<int32_t> perm(out_rows_);
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), rng);
      y_rows_.assign(perm.begin(), perm.begin() + total);
      if (pr.row_scale) scale_ = RandomFloats(total, pr.seed + 2);
    }
    y_init_ = RandomFloats(out_rows_ * pr.n, pr.seed + 3);
    for (int g = 0; g < groups; ++g) {
      w_bits_.push_back(RandomBf16(pr.n * pr.k, pr.seed + 100 + g));
      d_w_.push_back(std::make_unique<DeviceBuffer<uint16_t>>(w_bits_.back()));
      const bool has_rows = pr.group_rows[g] > 0;
      host_w_.push_back(has_rows ? w_bits_.back().data() : nullptr);
      device_w_.push_back(has_rows ? reinterpret_cast<uintptr_t>(d_w_.back()->get()) : 0);
    }
    d_offsets_ = std::make_unique<DeviceBuffer<int64_t>>(offsets_);
    d_w_ptrs_ = std::make_unique<DeviceBuffer<uintptr_t>>(device_w_);
    if (pr.x_type == RowType::kBF16) {
      d_x_bf16_ = std::make_unique<DeviceBuffer<uint16_t>>(x_bits_);
    } else {
      d_x_f32_ = std::make_unique<DeviceBuffer<float>>(pr.unrounded_f32_x ? x_drawn : x_values_);
    }
    if (!x_rows_.empty()) d_x_rows_ = std::make_unique<DeviceBuffer<int32_t>>(x_rows_);
    if (!y_rows_.empty()) d_y_rows_ = std::make_unique<DeviceBuffer<int32_t>>(y_rows_);
    if (!scale_.empty()) d_scale_ = std::make_unique<DeviceBuffer<float>>(scale_);
  }

  // New group sizes (total <= max_rows), device offsets included; no gather
  // or scatter, whose index arrays are sized for the first total.
  void SetGroupRows(const std::vector<int64_t>& group_rows) {
    ASSERT_EQ(group_rows.size(), pr_.group_rows.size());
    ASSERT_TRUE(x_rows_.empty() && y_rows_.empty());
    for (size_t g = 0; g < group_rows.size(); ++g) {
      ASSERT_TRUE(group_rows[g] == 0 || host_w_[g] != nullptr) << "group " << g << " has no w";
    }
    pr_.group_rows = group_rows;
    offsets_ = OffsetsOf(group_rows);
    ASSERT_LE(offsets_.back(), max_rows_);
    ASSERT_EQ(cudaMemcpy(d_offsets_->get(), offsets_.data(), offsets_.size() * sizeof(int64_t),
                         cudaMemcpyHostToDevice),
              cudaSuccess);
  }

  GroupedGemmParams Params(float* y, bool device) const {
    GroupedGemmParams p;
    p.num_groups = static_cast<int>(pr_.group_rows.size());
    p.k = pr_.k;
    p.n = pr_.n;
    p.ldx = pr_.ldx;
    p.w_type = WeightType::kBF16;
    p.y = y;
    p.max_rows = max_rows_;
    if (!device) {  // the CPU reads the same values as F32
      p.x = x_values_.data();
      p.x_type = RowType::kF32;
      p.row_offsets = offsets_.data();
      p.w = host_w_.data();
      p.x_rows = x_rows_.empty() ? nullptr : x_rows_.data();
      p.y_rows = y_rows_.empty() ? nullptr : y_rows_.data();
      p.row_scale = scale_.empty() ? nullptr : scale_.data();
      return p;
    }
    p.x_type = pr_.x_type;
    p.x = d_x_bf16_ ? static_cast<const void*>(d_x_bf16_->get()) : d_x_f32_->get();
    p.row_offsets = d_offsets_->get();
    p.w = reinterpret_cast<const void* const*>(d_w_ptrs_->get());
    p.x_rows = d_x_rows_ ? d_x_rows_->get() : nullptr;
    p.y_rows = d_y_rows_ ? d_y_rows_->get() : nullptr;
    p.row_scale = d_scale_ ? d_scale_->get() : nullptr;
    return p;
  }

  std::vector<float> CpuResult() const {
    std::vector<float> y = y_init_;
    cpu::LaunchGroupedGemm(Params(y.data(), /*device=*/false), cpu::CpuStream{});
    return y;
  }

  // The CUDA result from y_init with the launch bounded by max_rows.
  std::vector<float> GpuResult(cudaStream_t stream, int64_t max_rows) const {
    DeviceBuffer<float> y(y_init_);
    GroupedGemmParams p = Params(y.get(), /*device=*/true);
    p.max_rows = max_rows;
    const absl::Status launched = LaunchGroupedGemm(p, stream);
    EXPECT_TRUE(launched.ok()) << launched;
    EXPECT_EQ(cudaStreamSynchronize(stream), cudaSuccess) << cudaGetErrorString(cudaGetLastError());
    return y.Download();
  }

  // See the file comment.
  float Tolerance() const {
    double max_mag = 0.0;
    for (size_t g = 0; g < pr_.group_rows.size(); ++g) {
      const std::vector<uint16_t>& w = w_bits_[g];
      for (int64_t r = offsets_[g]; r < offsets_[g + 1]; ++r) {
        const float* x = x_values_.data() + (x_rows_.empty() ? r : x_rows_[r]) * ld_;
        const double scale = scale_.empty() ? 1.0 : std::fabs(scale_[r]);
        for (int64_t j = 0; j < pr_.n; ++j) {
          double mag = 0.0;
          for (int64_t kk = 0; kk < pr_.k; ++kk) {
            mag += std::fabs(static_cast<double>(x[kk]) * FromBf16(w[j * pr_.k + kk]));
          }
          max_mag = std::max(max_mag, mag * scale);
        }
      }
    }
    return static_cast<float>(2e-6 * max_mag + 1e-5);
  }

  int num_groups() const { return static_cast<int>(pr_.group_rows.size()); }
  int64_t max_rows() const { return max_rows_; }
  const std::vector<float>& y_init() const { return y_init_; }

 private:
  Problem pr_;
  std::vector<int64_t> offsets_;
  int64_t max_rows_ = 0;
  int64_t ld_ = 0;
  int64_t out_rows_ = 0;
  std::vector<uint16_t> x_bits_;
  std::vector<float> x_values_;
  std::vector<int32_t> x_rows_, y_rows_;
  std::vector<float> scale_, y_init_;
  std::vector<std::vector<uint16_t>> w_bits_;
  std::vector<const void*> host_w_;
  std::vector<uintptr_t> device_w_;
  std::unique_ptr<DeviceBuffer<int64_t>> d_offsets_;
  std::vector<std::unique_ptr<DeviceBuffer<uint16_t>>> d_w_;
  std::unique_ptr<DeviceBuffer<uintptr_t>> d_w_ptrs_;
  std::unique_ptr<DeviceBuffer<uint16_t>> d_x_bf16_;
  std::unique_ptr<DeviceBuffer<float>> d_x_f32_;
  std::unique_ptr<DeviceBuffer<int32_t>> d_x_rows_, d_y_rows_;
  std::unique_ptr<DeviceBuffer<float>> d_scale_;
};

// A max_rows bound loose enough to select the 64-row (prefill) tiles.
int64_t PrefillBound(const GroupedData& d) {
  const int64_t bound =
      std::max<int64_t>(d.max_rows(), int64_t{kDecodeTileRows} * d.num_groups() + 1);
  EXPECT_EQ(RowTileHeight(bound, d.num_groups()), kPrefillTileRows);
  return bound;
}

std::string Describe(const Problem& pr) {
  std::string s = "k=" + std::to_string(pr.k) + " n=" + std::to_string(pr.n) +
                  " x=" + DTypeName(pr.x_type) + " ldx=" + std::to_string(pr.ldx) + " rows={";
  for (int64_t r : pr.group_rows) s += std::to_string(r) + ",";
  return s + "}";
}

class CudaGroupedGemmTest : public CudaKernelTest {
 protected:
  // The CUDA result equals the CPU one within the tolerance, with the launch
  // bounded by the problem's max_rows and by a bound that picks 64-row tiles.
  void ExpectMatchesCpu(const Problem& pr) {
    SCOPED_TRACE(Describe(pr));
    const GroupedData d(pr);
    const std::vector<float> want = d.CpuResult();
    const float tol = d.Tolerance();
    for (const int64_t max_rows : {d.max_rows(), PrefillBound(d)}) {
      const std::string what = "y with max_rows=" + std::to_string(max_rows) + " (tile rows " +
                               std::to_string(RowTileHeight(max_rows, d.num_groups())) + ")";
      ExpectNear(d.GpuResult(stream_, max_rows), want, /*rel=*/0.f, tol, what.c_str());
    }
  }
};

TEST_F(CudaGroupedGemmTest, DecodeOneRowPerExpert) {
  for (RowType xt : {RowType::kBF16, RowType::kF32}) {
    ExpectMatchesCpu({.group_rows = {1, 1, 0, 1, 1, 0, 0, 1, 2, 1},
                      .k = 768, .n = 96, .x_type = xt, .seed = 11});
  }
}

TEST_F(CudaGroupedGemmTest, PrefillLargeGroups) {
  for (RowType xt : {RowType::kF32, RowType::kBF16}) {
    ExpectMatchesCpu({.group_rows = {300, 0, 129, 64, 1}, .k = 2048, .n = 200, .x_type = xt,
                      .seed = 21});
  }
}

// k = 8: one partial stage; odd k: the element-wise (unaligned) loads;
// 136: a partial last stage of whole 16-byte chunks; n = 72: a partial column tile.
TEST_F(CudaGroupedGemmTest, ShortOddAndLongK) {
  for (const int64_t k : {8, 45, 136, 768}) {
    for (RowType xt : {RowType::kBF16, RowType::kF32}) {
      ExpectMatchesCpu({.group_rows = {5, 0, 17, 1}, .k = k, .n = 72, .x_type = xt,
                        .seed = static_cast<uint32_t>(31 + k)});
    }
  }
}

// Rounding F32 x by truncation instead would be off by about 2^-9 per element,
// far beyond the tolerance at k = 64 (sum |x w| near 16).
TEST_F(CudaGroupedGemmTest, F32XIsRoundedToNearestEven) {
  for (const int64_t ldx : {0, 67}) {  // 16-byte loads, then element-wise ones
    ExpectMatchesCpu({.group_rows = {3, 0, 9}, .k = 64, .n = 64, .x_type = RowType::kF32,
                      .ldx = ldx, .seed = 35, .unrounded_f32_x = true});
  }
}

// One token feeding several experts (x_rows repeat) from a wider buffer:
// ldx = k + 8 keeps rows 16-byte aligned, k + 3 does not.
TEST_F(CudaGroupedGemmTest, GatheredRowsWithStride) {
  const int64_t k = 136;
  for (const int64_t ldx : {k + 8, k + 3}) {
    for (RowType xt : {RowType::kBF16, RowType::kF32}) {
      ExpectMatchesCpu({.group_rows = {4, 0, 7, 1, 9, 2}, .k = k, .n = 80, .x_type = xt,
                        .ldx = ldx, .gather_rows = 7, .seed = 41});
    }
  }
}

// The fused combine: products scaled and added into rows of an initialized y;
// rows named by no product keep their values.
TEST_F(CudaGroupedGemmTest, ScatterAddIntoInitializedY) {
  for (const bool scale : {true, false}) {
    ExpectMatchesCpu({.group_rows = {3, 0, 6, 1, 11, 0, 4}, .k = 96, .n = 130,
                      .x_type = RowType::kBF16, .gather_rows = 9, .scatter = true,
                      .row_scale = scale, .seed = 51});
    ExpectMatchesCpu({.group_rows = {70, 1, 0, 90}, .k = 256, .n = 64,
                      .x_type = RowType::kF32, .scatter = true, .row_scale = scale, .seed = 52});
  }
}

// max_rows is tokens * top_k before some rows went elsewhere: the extra tiles
// do nothing and rows of y past the real total keep their values.
TEST_F(CudaGroupedGemmTest, LooseMaxRowsBound) {
  for (const int64_t extra : {50, 300}) {  // 16-row tiles (58 <= 16 * 4), then 64-row tiles
    ExpectMatchesCpu({.group_rows = {2, 0, 5, 1}, .k = 64, .n = 64, .extra_max_rows = extra,
                      .seed = 61});
  }
}

TEST_F(CudaGroupedGemmTest, ManyExpertsDecode) {
  std::mt19937 rng(71);
  std::uniform_int_distribution<int64_t> rows(0, 3);
  std::vector<int64_t> group_rows(128);
  for (int64_t& r : group_rows) r = rows(rng);
  ExpectMatchesCpu({.group_rows = group_rows, .k = 256, .n = 128, .x_type = RowType::kBF16,
                    .gather_rows = 40, .scatter = true, .row_scale = true, .seed = 72});
  ExpectMatchesCpu({.group_rows = group_rows, .k = 256, .n = 128, .x_type = RowType::kF32,
                    .seed = 73});
}

// More groups than one step of the kernel's block-wide scan (512) covers.
TEST_F(CudaGroupedGemmTest, GroupsBeyondOneScanStep) {
  std::mt19937 rng(75);
  std::uniform_int_distribution<int64_t> rows(0, 2);
  std::vector<int64_t> group_rows(700);
  for (int64_t& r : group_rows) r = rows(rng);
  group_rows.back() = 3;  // the last tile lies in the second step
  ExpectMatchesCpu({.group_rows = group_rows, .k = 64, .n = 64, .x_type = RowType::kBF16,
                    .seed = 76});
}

TEST_F(CudaGroupedGemmTest, NoRowsLeavesYUntouched) {
  const GroupedData d({.group_rows = {0, 0, 0}, .k = 64, .n = 64, .extra_max_rows = 10});
  EXPECT_EQ(d.GpuResult(stream_, d.max_rows()), d.y_init());
}

// Both tile heights sum k in the same order, so a row's result is the same
// bits whichever height the launch bound picks (expert parallelism regroups
// rows and is compared bit for bit with the local executor).
TEST_F(CudaGroupedGemmTest, ResultDoesNotDependOnTileHeight) {
  const GroupedData d({.group_rows = {1, 3, 0, 2, 1, 7}, .k = 200, .n = 100,
                       .x_type = RowType::kF32, .seed = 81});
  ASSERT_EQ(RowTileHeight(d.max_rows(), d.num_groups()), kDecodeTileRows);
  EXPECT_EQ(d.GpuResult(stream_, d.max_rows()), d.GpuResult(stream_, PrefillBound(d)));
}

// The launch reads nothing on the host, so a captured graph replayed after
// the device offsets change computes the new groups.
TEST_F(CudaGroupedGemmTest, GraphReplaysWithNewOffsets) {
  GroupedData d({.group_rows = {3, 1, 4, 1, 5, 9}, .k = 136, .n = 80, .x_type = RowType::kBF16,
                 .extra_max_rows = 20, .seed = 91});
  DeviceBuffer<float> y(d.y_init());
  ASSERT_EQ(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  const absl::Status launched = LaunchGroupedGemm(d.Params(y.get(), /*device=*/true), stream_);
  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamEndCapture(stream_, &graph), cudaSuccess);
  ASSERT_TRUE(launched.ok()) << launched;
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  const std::vector<std::vector<int64_t>> replays = {
      {3, 1, 4, 1, 5, 9}, {0, 12, 0, 2, 7, 20}, {43, 0, 0, 0, 0, 0}, {0, 0, 0, 0, 0, 0}};
  for (const std::vector<int64_t>& rows : replays) {
    d.SetGroupRows(rows);
    ASSERT_EQ(cudaMemcpy(y.get(), d.y_init().data(), d.y_init().size() * sizeof(float),
                         cudaMemcpyHostToDevice),
              cudaSuccess);
    ASSERT_EQ(cudaGraphLaunch(exec, stream_), cudaSuccess);
    Sync();
    const std::string what = "replay with group 0 rows " + std::to_string(rows[0]);
    ExpectNear(y.Download(), d.CpuResult(), 0.f, d.Tolerance(), what.c_str());
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
}

// ---------------------------------------------------------------------------
// Parameter validation (no device needed: nothing is launched)
// ---------------------------------------------------------------------------

// Well-formed shapes with non-null placeholders that the rejected launches
// never dereference.
GroupedGemmParams ValidShape() {
  static int64_t offsets[3];
  static float x[1], y[1];
  static const void* w[2];
  GroupedGemmParams p;
  p.num_groups = 2;
  p.x = x;
  p.row_offsets = offsets;
  p.k = 64;
  p.n = 64;
  p.w = w;
  p.y = y;
  p.max_rows = 8;
  return p;
}

void ExpectInvalid(const GroupedGemmParams& p, const std::string& field) {
  const absl::Status s = LaunchGroupedGemm(p, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr(field));
}

TEST(CudaGroupedGemmValidation, RejectsF32Weights) {
  GroupedGemmParams p = ValidShape();
  p.w_type = WeightType::kF32;
  ExpectInvalid(p, "w_type");
}

TEST(CudaGroupedGemmValidation, RejectsNegativeShapes) {
  GroupedGemmParams p = ValidShape();
  p.n = -1;
  ExpectInvalid(p, "n=-1");
  p = ValidShape();
  p.k = -2;
  ExpectInvalid(p, "k=-2");
  p = ValidShape();
  p.num_groups = -1;
  ExpectInvalid(p, "num_groups=-1");
  p = ValidShape();
  p.max_rows = -5;
  ExpectInvalid(p, "max_rows=-5");
}

TEST(CudaGroupedGemmValidation, RejectsLdxBelowK) {
  GroupedGemmParams p = ValidShape();
  p.ldx = 63;
  ExpectInvalid(p, "ldx=63");
}

TEST(CudaGroupedGemmValidation, RejectsRowScaleWithoutYRows) {
  GroupedGemmParams p = ValidShape();
  static float scale[1];
  p.row_scale = scale;
  ExpectInvalid(p, "row_scale");
}

TEST(CudaGroupedGemmValidation, RejectsNullPointersWhereRowsMayExist) {
  GroupedGemmParams p = ValidShape();
  p.x = nullptr;
  ExpectInvalid(p, "x is null");
  p = ValidShape();
  p.w = nullptr;
  ExpectInvalid(p, "w is null");
  p = ValidShape();
  p.y = nullptr;
  ExpectInvalid(p, "y is null");
  p = ValidShape();
  p.row_offsets = nullptr;
  ExpectInvalid(p, "row_offsets is null");
}

TEST(CudaGroupedGemmValidation, RejectsGridBeyondOneLaunch) {
  GroupedGemmParams p = ValidShape();
  p.max_rows = int64_t{64} * 70000;  // 70000 row tiles of 64 rows
  ExpectInvalid(p, "max_rows=");
}

TEST(CudaGroupedGemmValidation, NothingToComputeNeedsNoPointers) {
  for (const auto& [groups, n, max_rows] : {std::tuple{0, 64, 8}, std::tuple{2, 0, 8},
                                            std::tuple{2, 64, 0}}) {
    GroupedGemmParams p;
    p.num_groups = groups;
    p.n = n;
    p.k = 64;
    p.max_rows = max_rows;
    EXPECT_TRUE(LaunchGroupedGemm(p, nullptr).ok())
        << "groups=" << groups << " n=" << n << " max_rows=" << max_rows;
  }
}

}  // namespace
}  // namespace joule::kernels::cuda
