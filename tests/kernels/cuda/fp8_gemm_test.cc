// The CUDA dense and grouped GEMMs over block-scaled FP8 weights (E4M3 codes,
// an F32 scale per block, kernels/params/gemm.h) against the CPU kernels on
// the same codes and scales: shapes with partial blocks (n and k not multiples
// of the 128x128 blocks), a column chunk of a bigger matrix (first_row != 0,
// aligned to a block or not), decode (m = 1) and prefill (m = 64) rows.
//
// Both sides multiply the same dequantized weights (one F32 rounding of code
// times scale) with the same activations: the dense kernel reads F32 x as it
// is, and the grouped one rounds x to BF16, so its CPU reference is given the
// rounded values. They differ only in the order of F32 sums: tolerance
// 1e-5 * (sum_k |x w| + 1) per output, far below what a wrong scale block
// (a factor of up to 10 between neighbouring scales here), a wrong code or a
// dropped k chunk moves. Elements the GEMM must not write (y's padding, rows
// no product names) must come back bit for bit. Validation tests need no
// device; the others skip without one.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cuda/blas.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/grouped_gemm.h"
#include "kernels/cuda/grouped_tiles.h"
#include "tests/kernels/cuda/cuda_test_util.h"

namespace joule::kernels::cuda {
namespace {

using ::testing::HasSubstr;

// E4M3 codes, NaN (0x7f, 0xff) left out: the whole range, subnormals included.
std::vector<uint8_t> RandomCodes(size_t count, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> code(0, 253);
  std::vector<uint8_t> codes(count);
  for (uint8_t& c : codes) {
    const int v = code(rng);
    c = static_cast<uint8_t>(v >= 0x7f ? v + 1 : v);  // 0..0xfe without 0x7f
  }
  return codes;
}

// Scales as DeepSeek's quantizer makes them (amax / 448): small, and
// different enough between blocks that a wrong block shows.
std::vector<float> RandomScales(size_t count, uint32_t seed) {
  return RandomFloats(count, seed, 2e-4f, 2e-3f);
}

float E4M3(uint8_t v) {  // common/dtype.h's E4M3ToF32, restated
  const int exponent = (v >> 3) & 0xf;
  const int mantissa = v & 0x7;
  const float magnitude = exponent == 0 ? std::ldexp(static_cast<float>(mantissa), -9)
                                        : std::ldexp(static_cast<float>(8 + mantissa), exponent - 10);
  return (v & 0x80) ? -magnitude : magnitude;
}

// A [total_rows, k] FP8 matrix with its scale grid; the GEMM reads rows
// [first_row, first_row + n) of it.
struct Fp8Matrix {
  Fp8Matrix(int64_t total_rows, int64_t k, WeightBlocks blocks, uint32_t seed)
      : k(k), blocks(blocks) {
    codes = RandomCodes(static_cast<size_t>(total_rows * k), seed);
    scale_ld = (k + blocks.cols - 1) / blocks.cols;
    scales = RandomScales(static_cast<size_t>((total_rows + blocks.rows - 1) / blocks.rows * scale_ld),
                          seed + 7);
  }
  // The dequantized weight of chunk row r (matrix row first_row + r), as both kernels form it.
  float Weight(int64_t r, int64_t c) const {
    const int64_t row = blocks.first_row + r;
    return E4M3(codes[row * k + c]) * scales[row / blocks.rows * scale_ld + c / blocks.cols];
  }
  const uint8_t* Chunk() const { return codes.data() + blocks.first_row * k; }

  int64_t k;
  WeightBlocks blocks;
  int64_t scale_ld;
  std::vector<uint8_t> codes;
  std::vector<float> scales;
};

// ---------------------------------------------------------------------------
// Dense GEMM
// ---------------------------------------------------------------------------

struct DenseCase {
  int64_t m, n, k;
  int64_t total_rows;  // rows of the whole matrix; the GEMM uses [first_row, first_row + n)
  WeightBlocks blocks;
  int64_t ldx = 0, ldy = 0;
  bool bias = false, accumulate = false;
  // XRounding::kBf16 (as CudaBackend launches it): the CPU is given x rounded to BF16.
  bool round_x = false;
};

std::string Describe(const DenseCase& c) {
  return "m=" + std::to_string(c.m) + " n=" + std::to_string(c.n) + " k=" + std::to_string(c.k) +
         " blocks " + std::to_string(c.blocks.rows) + "x" + std::to_string(c.blocks.cols) +
         " first_row=" + std::to_string(c.blocks.first_row) + " ldx=" + std::to_string(c.ldx) +
         " ldy=" + std::to_string(c.ldy) + (c.round_x ? " x rounded to bf16" : "");
}

float RoundedToBf16(float v) { return FromBf16(ToBf16(v)); }

class CudaFp8GemmTest : public CudaKernelTest {
 protected:
  void ExpectMatchesCpu(const DenseCase& c, uint32_t seed) {
    SCOPED_TRACE(Describe(c));
    ASSERT_LE(c.blocks.first_row + c.n, c.total_rows);
    const int64_t ldx = c.ldx ? c.ldx : c.k, ldy = c.ldy ? c.ldy : c.n;
    const Fp8Matrix w(c.total_rows, c.k, c.blocks, seed);
    std::vector<float> x = RandomFloats(c.m * ldx, seed + 1);
    for (size_t i = 0; i < x.size(); ++i) {
      if (static_cast<int64_t>(i % ldx) >= c.k) x[i] = std::nanf("");  // padding: never read
    }
    const std::vector<float> bias = RandomFloats(c.n, seed + 2);
    const std::vector<float> y0 = RandomFloats(c.m * ldy, seed + 3);

    GemmParams p;
    p.m = c.m;
    p.k = c.k;
    p.ldx = c.ldx;
    p.w_type = WeightType::kF8E4M3;
    p.n = c.n;
    p.ldy = c.ldy;
    p.accumulate = c.accumulate;
    p.w_blocks = c.blocks;

    std::vector<float> x_cpu = x;  // the values the GPU multiplies
    if (c.round_x) {
      for (float& v : x_cpu) v = RoundedToBf16(v);
    }
    std::vector<float> want = y0;
    GemmParams host = p;
    host.x = x_cpu.data();
    host.w = w.Chunk();
    host.w_scale_inv = w.scales.data();
    host.bias = c.bias ? bias.data() : nullptr;
    host.y = want.data();
    cpu::LaunchGemm(host, cpu::CpuStream{});

    std::vector<double> tol(want.size(), 0.0);  // 0 outside [m, n]: bit for bit
    for (int64_t i = 0; i < c.m; ++i) {
      for (int64_t j = 0; j < c.n; ++j) {
        double mag = 0;
        for (int64_t kk = 0; kk < c.k; ++kk) {
          mag += std::fabs(double(x_cpu[i * ldx + kk]) * w.Weight(j, kk));
        }
        tol[i * ldy + j] = 1e-5 * (mag + 1.0);
      }
    }

    DeviceBuffer<float> dx(x), dbias(bias), dy(y0), dscales(w.scales);
    DeviceBuffer<uint8_t> dcodes(w.codes);
    GemmParams dev = p;
    dev.x = dx.get();
    dev.w = dcodes.get() + c.blocks.first_row * c.k;
    dev.w_scale_inv = dscales.get();
    dev.bias = c.bias ? dbias.get() : nullptr;
    dev.y = dy.get();
    const absl::Status launched =
        LaunchGemm(dev, stream_, c.round_x ? XRounding::kBf16 : XRounding::kNone);
    ASSERT_TRUE(launched.ok()) << launched;
    Sync();
    ExpectWithinTolerance(dy.Download(), want, tol, ldy);
  }

  static void ExpectWithinTolerance(const std::vector<float>& got, const std::vector<float>& want,
                                    const std::vector<double>& tol, int64_t ldy) {
    ASSERT_EQ(got.size(), want.size());
    int reported = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      if (!(std::fabs(double(got[i]) - double(want[i])) <= tol[i]) && reported++ < 10) {
        ADD_FAILURE() << "y[" << i / ldy << ", " << i % ldy << "]: got " << got[i] << ", want "
                      << want[i] << " (tol " << tol[i] << ")";
      }
    }
  }
};

TEST_F(CudaFp8GemmTest, DecodeAndPrefillWithPartialBlocks) {
  const WeightBlocks b128{.rows = 128, .cols = 128, .first_row = 0};
  for (const int64_t m : {1, 64}) {
    // n = 200, k = 300: a full and a partial block each way.
    ExpectMatchesCpu({.m = m, .n = 200, .k = 300, .total_rows = 200, .blocks = b128}, 11);
    ExpectMatchesCpu({.m = m, .n = 200, .k = 300, .total_rows = 200, .blocks = b128,
                      .bias = true, .accumulate = true}, 12);
  }
  ExpectMatchesCpu({.m = 37, .n = 129, .k = 1000, .total_rows = 129, .blocks = b128, .ldx = 1003,
                    .ldy = 131, .bias = true}, 13);
  ExpectMatchesCpu({.m = 3, .n = 1000, .k = 2048, .total_rows = 1000, .blocks = b128}, 14);
  ExpectMatchesCpu({.m = 1, .n = 5, .k = 8, .total_rows = 5, .blocks = b128}, 15);
}

// A column chunk of a bigger matrix: w starts at row first_row, whose scales
// are those of its blocks in the whole matrix's grid (aligned to a block or not).
TEST_F(CudaFp8GemmTest, ColumnChunkOfABiggerMatrix) {
  for (const int64_t first_row : {72, 128, 200}) {
    for (const int64_t m : {1, 64}) {
      ExpectMatchesCpu({.m = m, .n = 200, .k = 300, .total_rows = 456,
                        .blocks = {.rows = 128, .cols = 128, .first_row = first_row}},
                       static_cast<uint32_t>(21 + first_row + m));
    }
  }
}

// As CudaBackend launches it: x rounded to BF16 (nearest even) as it is
// staged. Unrounded x differs from the CPU's by about 2^-9 per element,
// beyond the tolerance at these k.
TEST_F(CudaFp8GemmTest, XRoundedToBf16) {
  const WeightBlocks b128{.rows = 128, .cols = 128, .first_row = 0};
  for (const int64_t m : {1, 64}) {
    ExpectMatchesCpu({.m = m, .n = 200, .k = 300, .total_rows = 328,
                      .blocks = {.rows = 128, .cols = 128, .first_row = 128}, .round_x = true},
                     static_cast<uint32_t>(41 + m));
  }
  ExpectMatchesCpu({.m = 7, .n = 64, .k = 33, .total_rows = 64, .blocks = b128, .ldx = 40,
                    .ldy = 70, .bias = true, .accumulate = true, .round_x = true}, 43);
}

// F32 weights (MLA's absorbed matrices of FP8 checkpoints) as CudaBackend
// launches them: x rounded to BF16, the weights as they are.
TEST_F(CudaFp8GemmTest, F32WeightsWithBf16RoundedX) {
  const int64_t m = 5, n = 96, k = 130;
  const std::vector<float> x = RandomFloats(m * k, 51);
  const std::vector<float> w = RandomFloats(n * k, 52);
  const std::vector<float> y0 = RandomFloats(m * n, 53);
  std::vector<float> x_cpu = x;
  for (float& v : x_cpu) v = RoundedToBf16(v);
  std::vector<float> want = y0;
  cpu::LaunchGemm({.x = x_cpu.data(), .m = m, .k = k, .w = w.data(), .w_type = WeightType::kF32,
                   .n = n, .y = want.data()},
                  cpu::CpuStream{});
  std::vector<double> tol(want.size());
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double mag = 0;
      for (int64_t kk = 0; kk < k; ++kk) mag += std::fabs(double(x_cpu[i * k + kk]) * w[j * k + kk]);
      tol[i * n + j] = 1e-5 * (mag + 1.0);
    }
  }
  DeviceBuffer<float> dx(x), dw(w), dy(y0);
  const absl::Status launched =
      LaunchGemm({.x = dx.get(), .m = m, .k = k, .w = dw.get(), .w_type = WeightType::kF32,
                  .n = n, .y = dy.get()},
                 stream_, XRounding::kBf16);
  ASSERT_TRUE(launched.ok()) << launched;
  Sync();
  ExpectWithinTolerance(dy.Download(), want, tol, n);
}

// Another block geometry (the format allows any): 32-row, 48-column blocks.
TEST_F(CudaFp8GemmTest, OtherBlockSizes) {
  ExpectMatchesCpu({.m = 5, .n = 64, .k = 100, .total_rows = 300,
                    .blocks = {.rows = 32, .cols = 48, .first_row = 100}, .bias = true}, 31);
}

// ---------------------------------------------------------------------------
// Grouped GEMM
// ---------------------------------------------------------------------------

struct GroupedCase {
  std::vector<int64_t> group_rows;
  int64_t k = 300;
  int64_t n = 200;
  int64_t total_rows = 0;      // rows of each expert's whole matrix; 0: n
  WeightBlocks blocks;
  RowType x_type = RowType::kBF16;
  int64_t ldx = 0;
  int64_t gather_rows = 0;     // > 0: x has this many rows, read through random x_rows
  bool scatter = false;        // y_rows (distinct) into a y with 3 more rows than products
  bool row_scale = false;      // with scatter
  int64_t extra_max_rows = 0;
  bool unrounded_f32_x = false;  // F32 x as drawn: the kernel rounds it to BF16
  uint32_t seed = 1;
};

std::string Describe(const GroupedCase& c) {
  std::string s = "k=" + std::to_string(c.k) + " n=" + std::to_string(c.n) +
                  " first_row=" + std::to_string(c.blocks.first_row) +
                  " x=" + DTypeName(c.x_type) + " ldx=" + std::to_string(c.ldx) + " rows={";
  for (int64_t r : c.group_rows) s += std::to_string(r) + ",";
  return s + "}";
}

class Fp8GroupedData {
 public:
  explicit Fp8GroupedData(const GroupedCase& c) : c_(c) {
    offsets_.assign(1, 0);
    for (int64_t r : c.group_rows) offsets_.push_back(offsets_.back() + r);
    const int64_t total = offsets_.back();
    const int groups = static_cast<int>(c.group_rows.size());
    max_rows_ = total + c.extra_max_rows;
    ld_ = c.ldx != 0 ? c.ldx : c.k;
    const int64_t x_rows = c.gather_rows > 0 ? c.gather_rows : std::max<int64_t>(max_rows_, 1);
    x_drawn_ = RandomFloats(x_rows * ld_, c.seed);
    x_bits_.resize(x_drawn_.size());
    x_values_.resize(x_drawn_.size());
    for (size_t i = 0; i < x_drawn_.size(); ++i) {
      x_bits_[i] = ToBf16(x_drawn_[i]);
      x_values_[i] = FromBf16(x_bits_[i]);
    }
    std::mt19937 rng(c.seed + 1);
    if (c.gather_rows > 0) {
      std::uniform_int_distribution<int32_t> row(0, static_cast<int32_t>(c.gather_rows - 1));
      x_rows_.resize(total);
      for (int32_t& r : x_rows_) r = row(rng);
    }
    out_rows_ = c.scatter ? total + 3 : std::max<int64_t>(max_rows_, 1);
    if (c.scatter) {
      std::vector<int32_t> perm(out_rows_);
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), rng);
      y_rows_.assign(perm.begin(), perm.begin() + total);
      if (c.row_scale) scale_ = RandomFloats(total, c.seed + 2);
    }
    y_init_ = RandomFloats(out_rows_ * c.n, c.seed + 3);
    const int64_t total_rows = c.total_rows > 0 ? c.total_rows : c.n;
    for (int g = 0; g < groups; ++g) {
      w_.push_back(std::make_unique<Fp8Matrix>(total_rows, c.k, c.blocks, c.seed + 100 + g));
      d_codes_.push_back(std::make_unique<DeviceBuffer<uint8_t>>(w_.back()->codes));
      d_scales_.push_back(std::make_unique<DeviceBuffer<float>>(w_.back()->scales));
      const bool has_rows = c.group_rows[g] > 0;
      host_w_.push_back(has_rows ? w_.back()->Chunk() : nullptr);
      host_scales_.push_back(has_rows ? w_.back()->scales.data() : nullptr);
      device_w_.push_back(has_rows ? reinterpret_cast<uintptr_t>(d_codes_.back()->get() +
                                                                 c.blocks.first_row * c.k)
                                   : 0);
      device_scales_.push_back(has_rows ? reinterpret_cast<uintptr_t>(d_scales_.back()->get()) : 0);
    }
    d_offsets_ = std::make_unique<DeviceBuffer<int64_t>>(offsets_);
    d_w_ptrs_ = std::make_unique<DeviceBuffer<uintptr_t>>(device_w_);
    d_scale_ptrs_ = std::make_unique<DeviceBuffer<uintptr_t>>(device_scales_);
    if (c.x_type == RowType::kBF16) {
      d_x_bf16_ = std::make_unique<DeviceBuffer<uint16_t>>(x_bits_);
    } else {
      d_x_f32_ = std::make_unique<DeviceBuffer<float>>(c.unrounded_f32_x ? x_drawn_ : x_values_);
    }
    if (!x_rows_.empty()) d_x_rows_ = std::make_unique<DeviceBuffer<int32_t>>(x_rows_);
    if (!y_rows_.empty()) d_y_rows_ = std::make_unique<DeviceBuffer<int32_t>>(y_rows_);
    if (!scale_.empty()) d_scale_ = std::make_unique<DeviceBuffer<float>>(scale_);
  }

  // New group sizes (total <= max_rows) in the device offsets; no gather or scatter.
  void SetGroupRows(const std::vector<int64_t>& group_rows) {
    ASSERT_EQ(group_rows.size(), c_.group_rows.size());
    ASSERT_TRUE(x_rows_.empty() && y_rows_.empty());
    for (size_t g = 0; g < group_rows.size(); ++g) {
      ASSERT_TRUE(group_rows[g] == 0 || host_w_[g] != nullptr) << "group " << g << " has no w";
    }
    c_.group_rows = group_rows;
    offsets_.assign(1, 0);
    for (int64_t r : group_rows) offsets_.push_back(offsets_.back() + r);
    ASSERT_LE(offsets_.back(), max_rows_);
    ASSERT_EQ(cudaMemcpy(d_offsets_->get(), offsets_.data(), offsets_.size() * sizeof(int64_t),
                         cudaMemcpyHostToDevice),
              cudaSuccess);
  }

  GroupedGemmParams Params(float* y, bool device) const {
    GroupedGemmParams p;
    p.num_groups = static_cast<int>(c_.group_rows.size());
    p.k = c_.k;
    p.n = c_.n;
    p.ldx = c_.ldx;
    p.w_type = WeightType::kF8E4M3;
    p.w_blocks = c_.blocks;
    p.y = y;
    p.max_rows = max_rows_;
    if (!device) {  // the CPU reads the BF16-rounded values as F32
      p.x = x_values_.data();
      p.x_type = RowType::kF32;
      p.row_offsets = offsets_.data();
      p.w = host_w_.data();
      p.w_scale_inv = reinterpret_cast<const void* const*>(host_scales_.data());
      p.x_rows = x_rows_.empty() ? nullptr : x_rows_.data();
      p.y_rows = y_rows_.empty() ? nullptr : y_rows_.data();
      p.row_scale = scale_.empty() ? nullptr : scale_.data();
      return p;
    }
    p.x_type = c_.x_type;
    p.x = d_x_bf16_ ? static_cast<const void*>(d_x_bf16_->get()) : d_x_f32_->get();
    p.row_offsets = d_offsets_->get();
    p.w = reinterpret_cast<const void* const*>(d_w_ptrs_->get());
    p.w_scale_inv = reinterpret_cast<const void* const*>(d_scale_ptrs_->get());
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

  std::vector<float> GpuResult(cudaStream_t stream, int64_t max_rows) const {
    DeviceBuffer<float> y(y_init_);
    GroupedGemmParams p = Params(y.get(), /*device=*/true);
    p.max_rows = max_rows;
    const absl::Status launched = LaunchGroupedGemm(p, stream);
    EXPECT_TRUE(launched.ok()) << launched;
    EXPECT_EQ(cudaStreamSynchronize(stream), cudaSuccess) << cudaGetErrorString(cudaGetLastError());
    return y.Download();
  }

  // Per element of y: 1e-5 * (sum_k |x w| * |row_scale| + 1) where a product
  // lands, 0 (bit for bit) elsewhere.
  std::vector<double> Tolerance() const {
    std::vector<double> tol(y_init_.size(), 0.0);
    for (size_t g = 0; g < c_.group_rows.size(); ++g) {
      for (int64_t r = offsets_[g]; r < offsets_[g + 1]; ++r) {
        const float* x = x_values_.data() + (x_rows_.empty() ? r : x_rows_[r]) * ld_;
        const double scale = scale_.empty() ? 1.0 : std::fabs(scale_[r]);
        const int64_t y_row = y_rows_.empty() ? r : y_rows_[r];
        for (int64_t j = 0; j < c_.n; ++j) {
          double mag = 0.0;
          for (int64_t kk = 0; kk < c_.k; ++kk) mag += std::fabs(double(x[kk]) * w_[g]->Weight(j, kk));
          tol[y_row * c_.n + j] = 1e-5 * (mag * scale + 1.0);
        }
      }
    }
    return tol;
  }

  int num_groups() const { return static_cast<int>(c_.group_rows.size()); }
  int64_t max_rows() const { return max_rows_; }
  const std::vector<float>& y_init() const { return y_init_; }

 private:
  GroupedCase c_;
  std::vector<int64_t> offsets_;
  int64_t max_rows_ = 0, ld_ = 0, out_rows_ = 0;
  std::vector<float> x_drawn_, x_values_;
  std::vector<uint16_t> x_bits_;
  std::vector<int32_t> x_rows_, y_rows_;
  std::vector<float> scale_, y_init_;
  std::vector<std::unique_ptr<Fp8Matrix>> w_;
  std::vector<const void*> host_w_;
  std::vector<const float*> host_scales_;
  std::vector<uintptr_t> device_w_, device_scales_;
  std::vector<std::unique_ptr<DeviceBuffer<uint8_t>>> d_codes_;
  std::vector<std::unique_ptr<DeviceBuffer<float>>> d_scales_;
  std::unique_ptr<DeviceBuffer<int64_t>> d_offsets_;
  std::unique_ptr<DeviceBuffer<uintptr_t>> d_w_ptrs_, d_scale_ptrs_;
  std::unique_ptr<DeviceBuffer<uint16_t>> d_x_bf16_;
  std::unique_ptr<DeviceBuffer<float>> d_x_f32_;
  std::unique_ptr<DeviceBuffer<int32_t>> d_x_rows_, d_y_rows_;
  std::unique_ptr<DeviceBuffer<float>> d_scale_;
};

void ExpectWithin(const std::vector<float>& got, const std::vector<float>& want,
                  const std::vector<double>& tol, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int reported = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!(std::fabs(double(got[i]) - double(want[i])) <= tol[i]) && reported++ < 10) {
      ADD_FAILURE() << what << " y[" << i << "]: got " << got[i] << ", want " << want[i]
                    << " (tol " << tol[i] << ")";
    }
  }
}

// A launch bound loose enough to select the 64-row (prefill) tiles.
int64_t PrefillBound(const Fp8GroupedData& d) {
  const int64_t bound =
      std::max<int64_t>(d.max_rows(), int64_t{kDecodeTileRows} * d.num_groups() + 1);
  EXPECT_EQ(RowTileHeight(bound, d.num_groups()), kPrefillTileRows);
  return bound;
}

class CudaFp8GroupedGemmTest : public CudaKernelTest {
 protected:
  // Within the tolerance of the CPU result with the problem's own launch bound
  // and one that picks 64-row tiles; both tile heights give the same bits.
  void ExpectMatchesCpu(const GroupedCase& c) {
    SCOPED_TRACE(Describe(c));
    const Fp8GroupedData d(c);
    const std::vector<float> want = d.CpuResult();
    const std::vector<double> tol = d.Tolerance();
    const std::vector<float> decode_tiles = d.GpuResult(stream_, d.max_rows());
    const std::vector<float> prefill_tiles = d.GpuResult(stream_, PrefillBound(d));
    ExpectWithin(decode_tiles, want, tol, "launch bound max_rows");
    ExpectWithin(prefill_tiles, want, tol, "launch bound for 64-row tiles");
    EXPECT_EQ(decode_tiles, prefill_tiles) << "the tile height changed a result";
  }
};

const WeightBlocks kBlocks128{.rows = 128, .cols = 128, .first_row = 0};

// One group of 1 row (decode, one token to one expert) and of 64 rows.
TEST_F(CudaFp8GroupedGemmTest, OneGroupDecodeAndPrefill) {
  for (const int64_t m : {1, 64}) {
    for (RowType xt : {RowType::kBF16, RowType::kF32}) {
      ExpectMatchesCpu({.group_rows = {m}, .blocks = kBlocks128, .x_type = xt,
                        .seed = static_cast<uint32_t>(100 + m)});
    }
  }
}

TEST_F(CudaFp8GroupedGemmTest, DecodeOneRowPerExpert) {
  for (RowType xt : {RowType::kBF16, RowType::kF32}) {
    ExpectMatchesCpu({.group_rows = {1, 1, 0, 1, 1, 0, 0, 1, 2, 1}, .k = 768, .n = 96,
                      .blocks = kBlocks128, .x_type = xt, .seed = 111});
  }
}

TEST_F(CudaFp8GroupedGemmTest, PrefillGroupsWithPartialBlocks) {
  ExpectMatchesCpu({.group_rows = {70, 0, 129, 1}, .k = 300, .n = 200, .blocks = kBlocks128,
                    .x_type = RowType::kF32, .seed = 121});
  ExpectMatchesCpu({.group_rows = {5, 0, 17, 1}, .k = 45, .n = 72, .blocks = kBlocks128,
                    .x_type = RowType::kBF16, .seed = 122});
}

// The down projection in column chunks (worker/model/experts.cc): each
// expert's w starts at row first_row of its matrix and keeps that row's
// block scales; with the fused combine's scatter-add.
TEST_F(CudaFp8GroupedGemmTest, ColumnChunkWithScatterAdd) {
  for (const int64_t first_row : {72, 128}) {
    for (const bool scale : {true, false}) {
      ExpectMatchesCpu({.group_rows = {3, 0, 6, 1, 11}, .k = 300, .n = 130, .total_rows = 400,
                        .blocks = {.rows = 128, .cols = 128, .first_row = first_row},
                        .x_type = RowType::kF32, .scatter = true, .row_scale = scale,
                        .seed = static_cast<uint32_t>(131 + first_row)});
    }
  }
}

// Rows read in place through x_rows, from a strided buffer (k + 3: no
// alignment), and a loose launch bound whose extra tiles do nothing.
TEST_F(CudaFp8GroupedGemmTest, GatheredRowsStrideAndLooseBound) {
  for (RowType xt : {RowType::kBF16, RowType::kF32}) {
    ExpectMatchesCpu({.group_rows = {4, 0, 7, 1, 9, 2}, .k = 136, .n = 80, .blocks = kBlocks128,
                      .x_type = xt, .ldx = 139, .gather_rows = 7, .seed = 141});
  }
  ExpectMatchesCpu({.group_rows = {2, 0, 5, 1}, .k = 200, .n = 64, .blocks = kBlocks128,
                    .extra_max_rows = 300, .seed = 142});
}

// F32 x is rounded to the nearest even BF16 (the CPU is given those values):
// truncating instead is off by about 2^-9 per element, beyond the tolerance.
TEST_F(CudaFp8GroupedGemmTest, F32XIsRoundedToNearestEven) {
  ExpectMatchesCpu({.group_rows = {3, 0, 9}, .k = 256, .n = 64, .blocks = kBlocks128,
                    .x_type = RowType::kF32, .unrounded_f32_x = true, .seed = 151});
}

TEST_F(CudaFp8GroupedGemmTest, OtherBlockSizes) {
  ExpectMatchesCpu({.group_rows = {6, 2, 0, 33}, .k = 100, .n = 70, .total_rows = 200,
                    .blocks = {.rows = 32, .cols = 48, .first_row = 40}, .seed = 161});
}

// As the BF16 kernel: the launch reads nothing on the host, so a captured
// graph replayed after the device offsets change computes the new groups.
TEST_F(CudaFp8GroupedGemmTest, GraphReplaysWithNewOffsets) {
  Fp8GroupedData d({.group_rows = {3, 1, 4, 1, 5, 9}, .k = 136, .n = 80, .blocks = kBlocks128,
                    .extra_max_rows = 20, .seed = 171});
  DeviceBuffer<float> y(d.y_init());
  ASSERT_EQ(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  const absl::Status launched = LaunchGroupedGemm(d.Params(y.get(), /*device=*/true), stream_);
  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamEndCapture(stream_, &graph), cudaSuccess);
  ASSERT_TRUE(launched.ok()) << launched;
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  for (const std::vector<int64_t>& rows :
       {std::vector<int64_t>{3, 1, 4, 1, 5, 9}, std::vector<int64_t>{0, 12, 0, 2, 7, 20}}) {
    d.SetGroupRows(rows);
    ASSERT_EQ(cudaMemcpy(y.get(), d.y_init().data(), d.y_init().size() * sizeof(float),
                         cudaMemcpyHostToDevice),
              cudaSuccess);
    ASSERT_EQ(cudaGraphLaunch(exec, stream_), cudaSuccess);
    Sync();
    ExpectWithin(y.Download(), d.CpuResult(), d.Tolerance(),
                 "replay with group 1 rows " + std::to_string(rows[1]));
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
}

// ---------------------------------------------------------------------------
// Validation (no device needed: nothing is launched)
// ---------------------------------------------------------------------------

void ExpectInvalid(const absl::Status& s, const std::string& field) {
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr(field));
}

TEST(CudaFp8Validation, DenseGemmNeedsScalesAndBlocks) {
  static float x[1], y[1];
  static uint8_t w[1];
  GemmParams p;
  p.x = x;
  p.w = w;
  p.y = y;
  p.m = 2;
  p.n = 4;
  p.k = 8;
  p.w_type = WeightType::kF8E4M3;
  ExpectInvalid(LaunchGemm(p, nullptr), "w_scale_inv");
  static float scales[1];
  p.w_scale_inv = scales;
  p.w_blocks.cols = 0;
  ExpectInvalid(LaunchGemm(p, nullptr), "w_blocks");
  p.w_blocks = {.rows = 128, .cols = 128, .first_row = -1};
  ExpectInvalid(LaunchGemm(p, nullptr), "first_row");
  // cuBLASLt takes BF16 only: FP8 (and F32) weights are the SIMT kernel's.
  p.w_blocks = {};
  p.workspace = y;
  ExpectInvalid(ValidateLtGemmParams(p), "w_type");
}

TEST(CudaFp8Validation, GroupedGemmNeedsScalesAndBlocks) {
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
  p.w_type = WeightType::kF8E4M3;
  ExpectInvalid(LaunchGroupedGemm(p, nullptr), "w_scale_inv is null");
  static const void* scales[2];
  p.w_scale_inv = scales;
  p.w_blocks.rows = 0;
  ExpectInvalid(LaunchGroupedGemm(p, nullptr), "w_blocks");
  // Nothing to compute needs no scales.
  p.w_scale_inv = nullptr;
  p.w_blocks = {};
  p.max_rows = 0;
  EXPECT_TRUE(LaunchGroupedGemm(p, nullptr).ok());
}

}  // namespace
}  // namespace joule::kernels::cuda
