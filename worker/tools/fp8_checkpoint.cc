#include "worker/tools/fp8_checkpoint.h"

#include <algorithm>
#include <cmath>

#include "common/dtype.h"

namespace joule {

BlockFp8Weight QuantizeBlockFp8(const float* w, int64_t rows, int64_t cols, int64_t block_rows,
                                int64_t block_cols) {
  BlockFp8Weight q;
  q.scale_rows = (rows + block_rows - 1) / block_rows;
  q.scale_cols = (cols + block_cols - 1) / block_cols;
  q.e4m3.resize(static_cast<size_t>(rows * cols));
  q.scale_inv.resize(static_cast<size_t>(q.scale_rows * q.scale_cols));
  for (int64_t br = 0; br < q.scale_rows; ++br) {
    const int64_t r0 = br * block_rows, r1 = std::min(rows, r0 + block_rows);
    for (int64_t bc = 0; bc < q.scale_cols; ++bc) {
      const int64_t c0 = bc * block_cols, c1 = std::min(cols, c0 + block_cols);
      float amax = 0.0f;
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t c = c0; c < c1; ++c) amax = std::max(amax, std::fabs(w[r * cols + c]));
      }
      // An all-zero block keeps scale 1 (codes 0) instead of dividing by zero.
      const float scale_inv = amax > 0.0f ? amax / 448.0f : 1.0f;
      q.scale_inv[br * q.scale_cols + bc] = scale_inv;
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t c = c0; c < c1; ++c) q.e4m3[r * cols + c] = F32ToE4M3(w[r * cols + c] / scale_inv);
      }
    }
  }
  return q;
}

}  // namespace joule
