// FP8 checkpoints as DeepSeek-V3 ships them, for joule-make-model: E4M3 weights with one
// float32 `weight_scale_inv` per 128x128 block (dequantized = e4m3 * scale_inv). The E4M3
// codes themselves are common/dtype.h's (F32ToE4M3), and common/safetensors writes F8_E4M3.
#pragma once

#include <cstdint>
#include <vector>

namespace joule {

// A row-major [rows, cols] matrix quantized block by block: each block_rows x block_cols block
// (the last ones partial when the block does not divide the matrix) gets
// scale_inv = max|w| / 448 and codes e4m3(w / scale_inv), as DeepSeek's quantizer does.
struct BlockFp8Weight {
  std::vector<uint8_t> e4m3;        // rows * cols codes
  std::vector<float> scale_inv;     // scale_rows * scale_cols, row-major
  int64_t scale_rows = 0, scale_cols = 0;  // ceil(rows / block_rows), ceil(cols / block_cols)
};
BlockFp8Weight QuantizeBlockFp8(const float* w, int64_t rows, int64_t cols, int64_t block_rows,
                                int64_t block_cols);

}  // namespace joule
