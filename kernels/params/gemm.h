// Parameters of the dense GEMM with BF16, F32 or block-scaled FP8 weights and
// F32 activations, shared by kernels::cpu::LaunchGemm and kernels::cuda::LaunchGemm.
//
// Weights use PyTorch's nn.Linear layout: W is [n, k] row-major and
// y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]). BF16 weights are read as stored
// (on the CPU straight from the mmapped checkpoint) and widened in registers;
// accumulation is F32, so the two backends agree up to summation order.
//
// FP8 (w_type kF8E4M3, DeepSeek-V3's checkpoints): W[n, k] is
// e4m3(codes[n, k]) * w_scale_inv[(first_row + n) / rows][k / cols], the F32
// scale of its block (checkpoints name it `weight_scale_inv`: it multiplies).
// The CPU widens the codes and applies the scale in registers, so the result is
// the F32 GEMM over the dequantized weights up to summation order; the codes
// stay in memory as stored. CUDA does the same on CUDA cores (x rounded to BF16
// first, as for its other weights); no tensor-core FP8 path yet.
//
// Pointers are host memory for kernels::cpu launches and device memory for
// kernels::cuda launches. Device-neutral: no CUDA or thread-pool types here.
#pragma once

#include <cstdint>

#include "kernels/params/types.h"

namespace joule::kernels {

// How an FP8 weight's rows and columns map onto its scale grid, which is
// [ceil(rows of the whole matrix / rows), ceil(k / cols)] F32, row-major.
struct WeightBlocks {
  int64_t rows = 128;     // output features per block
  int64_t cols = 128;     // input features per block
  int64_t first_row = 0;  // the matrix row that w's row 0 is (w a column chunk of it)
};

struct GemmParams {
  const float* x = nullptr;  // [m, ldx]
  int64_t m = 0;
  int64_t k = 0;
  int64_t ldx = 0;           // 0 means k
  const void* w = nullptr;   // [n, k], dense rows
  WeightType w_type = WeightType::kBF16;
  int64_t n = 0;
  const float* bias = nullptr;  // optional [n]
  float* y = nullptr;           // [m, ldy]
  int64_t ldy = 0;              // 0 means n
  bool accumulate = false;      // y += x W^T instead of y = x W^T
  // CUDA: tensor cores take BF16 inputs, so F32 x is rounded to BF16 into
  // this caller-owned scratch first (Backend::GemmWorkspaceBytes; CPU: none).
  void* workspace = nullptr;
  // kF8E4M3 only: the F32 block scales and their geometry.
  const float* w_scale_inv = nullptr;
  WeightBlocks w_blocks;
  // Strided batch (MLA's per-head products): `batch` products of this shape in
  // one launch, the b-th reading x + b * x_batch_stride and w + b *
  // w_batch_stride (elements of w_type) and writing y + b * y_batch_stride.
  // F32 and BF16 weights only (FP8 scales have no batch stride); bias and
  // workspace are shared. kernels/cuda/gemm_checks.h says what is accepted.
  int64_t batch = 1;
  int64_t x_batch_stride = 0;
  int64_t w_batch_stride = 0;
  int64_t y_batch_stride = 0;
};

// The b-th product of a batched GEMM as a GEMM of its own (batch 1). Null
// pointers (k = 0 needs no x or w) stay null.
inline GemmParams GemmBatchMember(const GemmParams& p, int64_t b) {
  GemmParams one = p;
  if (p.x != nullptr) one.x = p.x + b * p.x_batch_stride;
  if (p.w != nullptr) {
    one.w = static_cast<const char*>(p.w) +
            b * p.w_batch_stride * static_cast<int64_t>(ElementBytes(p.w_type));
  }
  if (p.y != nullptr) one.y = p.y + b * p.y_batch_stride;
  one.batch = 1;
  return one;
}

// One GEMM per group over contiguous row ranges of x (tokens permuted by
// expert): rows [row_offsets[g], row_offsets[g+1]) are multiplied by w[g].
// Groups with no rows are skipped (their w may be null).
struct GroupedGemmParams {
  int num_groups = 0;
  const void* x = nullptr;             // [total_rows, k] of x_type, row stride ldx
  const int64_t* row_offsets = nullptr;  // [num_groups + 1]
  int64_t k = 0;
  int64_t n = 0;
  const void* const* w = nullptr;      // [num_groups] pointers to [n, k]
  WeightType w_type = WeightType::kBF16;
  float* y = nullptr;                  // [total_rows, n], or with y_rows [max(y_rows) + 1, n]
  // Optional weighted scatter-add (an MoE combine fused into the down
  // projection): row r of the product is multiplied by row_scale[r] (when
  // given) and added into row y_rows[r] of y, which the caller initialized.
  // CPU: several rows may name the same y row; each y row then receives its
  // terms in group order, whatever the thread count, so results are
  // deterministic. CUDA: y rows must not repeat (no atomics, no order).
  const int32_t* y_rows = nullptr;     // [total_rows]
  const float* row_scale = nullptr;    // [total_rows]; only with y_rows
  // Activations: F32, or BF16 (widened exactly in registers, like weights).
  // Optional in-place gather: row r of the product reads row x_rows[r] of x,
  // so rows straight from a receive buffer, one row shared by several groups,
  // need no regrouped copy. ldx: elements between rows of x (0: k).
  RowType x_type = RowType::kF32;
  int64_t ldx = 0;
  const int32_t* x_rows = nullptr;     // [total_rows]
  // CUDA: row_offsets live on the device, so the launch is sized from this
  // bound on row_offsets[num_groups] (e.g. tokens * top_k); the CPU reads the
  // offsets themselves and ignores it.
  int64_t max_rows = 0;
  // kF8E4M3 only: [num_groups] pointers to each w[g]'s F32 block scales (as
  // GemmParams::w_scale_inv), one geometry for all groups.
  const void* const* w_scale_inv = nullptr;
  WeightBlocks w_blocks;
};

}  // namespace joule::kernels
