// The per-ISA GEMM block entry points behind LaunchGemm / LaunchGroupedGemm (internal).
#pragma once

#include <cstdint>

namespace joule::kernels::cpu {

// Computes y[m0:m1, n0:n1] = x[m0:m1, :] . W[n0:n1, :]^T (+ bias) (+ y if accumulate).
// With y_rows, row r of the product goes to row y_rows[r] of y instead of row r,
// scaled by row_scale[r] when given (a weighted scatter-add with accumulate).
// Plain types only: this crosses from ISA-specific translation units.
struct GemmBlock {
  // Row r of x is at x + r * ldx elements, or at x + x_rows[r] * ldx when
  // x_rows is given (rows gathered in place, e.g. straight from a receive buffer).
  const void* x = nullptr;
  bool x_bf16 = false;
  int64_t ldx = 0;
  const int32_t* x_rows = nullptr;
  const void* w = nullptr;   // [n, k] dense rows
  bool w_bf16 = true;
  // FP8 E4M3 codes instead (w_bf16 false): W[r, c] = e4m3(w[r, c]) *
  // w_scale_inv[(scale_row0 + r) / block_rows * scale_ld + c / block_cols].
  bool w_fp8 = false;
  const float* w_scale_inv = nullptr;
  int64_t block_rows = 0, block_cols = 0, scale_row0 = 0, scale_ld = 0;
  int64_t k = 0;
  const float* bias = nullptr;
  float* y = nullptr;        // row r at y + r * ldy
  int64_t ldy = 0;
  bool accumulate = false;
  const int32_t* y_rows = nullptr;
  const float* row_scale = nullptr;
  int64_t m0 = 0, m1 = 0, n0 = 0, n1 = 0;
};

void GemmBlockScalar(const GemmBlock& b);
#if defined(JOULE_CPU_X86)
void GemmBlockAvx2(const GemmBlock& b);
void GemmBlockAvx512(const GemmBlock& b);
#endif

}  // namespace joule::kernels::cpu
