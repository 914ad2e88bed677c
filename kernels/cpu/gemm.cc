#include "kernels/cpu/gemm.h"

#include <algorithm>
#include <vector>

#include "kernels/cpu/cpu_isa.h"
#include "kernels/cpu/gemm_internal.h"
#include "kernels/cpu/gemm_tile.h"
#include "kernels/cpu/simd_scalar.h"

namespace joule::kernels::cpu {
namespace {

struct ScalarTiles {
  static constexpr int kNr1 = 4, kNr2 = 4, kNr3 = 2, kNr4 = 2;
};

using GemmBlockFn = void (*)(const GemmBlock&);

GemmBlockFn SelectBlockFn() {
  switch (ActiveIsa()) {
#if defined(JOULE_CPU_X86)
    case Isa::kAvx512: return &GemmBlockAvx512;
    case Isa::kAvx2: return &GemmBlockAvx2;
#endif
    default: return &GemmBlockScalar;
  }
}

// Columns per work item: small enough that every thread gets several items
// (dynamic balance) and that an item's weight rows (<= ~256 KiB) stay in L2
// while every row tile of x goes past them, and a multiple of the tile widths
// (8 and 4 for 1-2 rows; 2, 3, 4, 6 and 8 for 3-4 rows) so tiles stay full.
int64_t ColumnsPerItem(int64_t m, int64_t k, int64_t n, WeightType type, CpuStream stream) {
  constexpr int64_t kL2Bytes = 256 * 1024;
  constexpr int64_t kItemsPerThread = 4;
  const int64_t align = m <= 2 ? 8 : 24;
  const int64_t items = kItemsPerThread * (stream.pool != nullptr ? stream.pool->num_threads() : 1);
  const int64_t row_bytes = std::max<int64_t>(1, k * static_cast<int64_t>(ElementBytes(type)));
  const int64_t cols = std::min(kL2Bytes / row_bytes, (n + items - 1) / items);
  return std::max<int64_t>(align, (cols + align - 1) / align * align);
}

// The FP8 fields of a block over weights of `type` with scale grid geometry
// `blocks` (k inputs per row).
void SetWeightBlocks(GemmBlock& b, WeightType type, const WeightBlocks& blocks, int64_t k) {
  b.w_bf16 = type == WeightType::kBF16;
  b.w_fp8 = type == WeightType::kF8E4M3;
  if (!b.w_fp8) return;
  b.block_rows = blocks.rows;
  b.block_cols = blocks.cols;
  b.scale_row0 = blocks.first_row;
  b.scale_ld = (k + blocks.cols - 1) / blocks.cols;
}

}  // namespace

void GemmBlockScalar(const GemmBlock& b) { GemmBlockDispatch<Scalar, ScalarTiles>(b); }

void LaunchGemm(const GemmParams& p, CpuStream stream) {
  if (p.m <= 0 || p.n <= 0 || p.batch <= 0) return;
  GemmBlock b;
  b.x = p.x;
  b.ldx = p.ldx != 0 ? p.ldx : p.k;
  b.w = p.w;
  SetWeightBlocks(b, p.w_type, p.w_blocks, p.k);
  b.w_scale_inv = p.w_scale_inv;
  b.k = p.k;
  b.bias = p.bias;
  b.y = p.y;
  b.ldy = p.ldy != 0 ? p.ldy : p.n;
  b.accumulate = p.accumulate;
  b.m0 = 0;
  b.m1 = p.m;
  const GemmBlockFn fn = SelectBlockFn();
  const int64_t cols = ColumnsPerItem(p.m, p.k, p.n, p.w_type, stream);
  const int64_t col_items = (p.n + cols - 1) / cols;
  // One work item per (batch member, column block): a batch is one parallel
  // region, and each member's columns split as an unbatched GEMM's do.
  ParallelFor(stream, p.batch * col_items, 1, [&](int64_t begin, int64_t end) {
    GemmBlock blk = b;
    for (int64_t i = begin; i < end; ++i) {
      const GemmParams member = GemmBatchMember(p, i / col_items);
      blk.x = member.x;
      blk.w = member.w;
      blk.y = member.y;
      blk.n0 = (i % col_items) * cols;
      blk.n1 = std::min(p.n, blk.n0 + cols);
      fn(blk);
    }
  });
}

void LaunchGroupedGemm(const GroupedGemmParams& p, CpuStream stream) {
  if (p.num_groups <= 0 || p.n <= 0) return;
  // Rows per group vary; size items for a typical group (tokens * top_k / groups).
  const int64_t avg_rows = p.row_offsets[p.num_groups] / p.num_groups;
  const int64_t cols = ColumnsPerItem(avg_rows, p.k, p.n, p.w_type, stream);
  const int64_t col_items = (p.n + cols - 1) / cols;
  // One work item per (non-empty group, column block): an expert with many
  // tokens becomes many items, an idle expert none.
  std::vector<int> groups;
  groups.reserve(p.num_groups);
  for (int g = 0; g < p.num_groups; ++g) {
    if (p.row_offsets[g + 1] > p.row_offsets[g]) groups.push_back(g);
  }
  if (groups.empty()) return;
  const GemmBlockFn fn = SelectBlockFn();
  GemmBlock proto;
  proto.x = p.x;
  proto.x_bf16 = p.x_type == RowType::kBF16;
  proto.ldx = p.ldx != 0 ? p.ldx : p.k;
  proto.x_rows = p.x_rows;
  SetWeightBlocks(proto, p.w_type, p.w_blocks, p.k);
  proto.k = p.k;
  proto.y = p.y;
  proto.ldy = p.n;
  const auto run = [&](GemmBlock& b, int g, int64_t col_item) {
    b.w = p.w[g];
    if (b.w_fp8) b.w_scale_inv = static_cast<const float*>(p.w_scale_inv[g]);
    b.m0 = p.row_offsets[g];
    b.m1 = p.row_offsets[g + 1];
    b.n0 = col_item * cols;
    b.n1 = std::min(p.n, b.n0 + cols);
    fn(b);
  };
  if (p.y_rows != nullptr) {
    // Scatter-add: rows of different groups may meet in one y row, so a work
    // item owns a column block across every group (no two threads write the
    // same element) and adds the groups in order.
    proto.y_rows = p.y_rows;
    proto.row_scale = p.row_scale;
    proto.accumulate = true;
    ParallelFor(stream, col_items, 1, [&](int64_t begin, int64_t end) {
      GemmBlock b = proto;
      for (int64_t item = begin; item < end; ++item) {
        for (int g : groups) run(b, g, item);
      }
    });
    return;
  }
  ParallelFor(stream, static_cast<int64_t>(groups.size()) * col_items, 1,
              [&](int64_t begin, int64_t end) {
                GemmBlock b = proto;
                for (int64_t item = begin; item < end; ++item) {
                  run(b, groups[item / col_items], item % col_items);
                }
              });
}

}  // namespace joule::kernels::cpu
