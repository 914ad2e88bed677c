// Grouped GEMM on tensor cores: row r of group g gives
// x[x_rows[r]] W_g^T, stored into y[r] or scaled and added into y[y_rows[r]].
//
// One CTA (4 warps) computes kBm rows of one group by kBn = 64 columns.
// grid.x walks column tiles; grid.y walks an upper bound on the row tiles of
// all groups (grouped_tiles.h), because the offsets are device data that a
// replayed graph changes. A CTA finds its group by a block-wide scan of the
// per-group tile counts and leaves when its tile lies past the real total.
// k advances kBk = 64 at a time through a ring of shared-memory stages:
// weights arrive by 16-byte cp.async (decode is bound by streaming them), x is
// rounded to BF16 as it is staged. Warps multiply with 16x16x16 WMMA fragments
// into F32 accumulators, which pass through shared memory so the epilogue can
// mask rows and columns and write whole row segments coalesced.
//
// Block-scaled FP8 weights (w_type kF8E4M3) take a SIMT kernel on the same
// row tiles, row tables and epilogue: each E4M3 code is widened exactly and
// multiplied by its block's F32 scale as it is staged into shared memory (the
// dequantized weight the CPU kernel multiplies with), x is rounded to BF16
// like the tensor-core path's (so expert parallelism, which may receive BF16
// rows, still gives the local executor's bits), and every output is an F32
// FMA chain over k in order, whatever the tile height.
#include <cuda_bf16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <cub/block/block_scan.cuh>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/grouped_gemm.h"
#include "kernels/cuda/grouped_tiles.h"
#include "kernels/cuda/launch_util.cuh"

namespace joule::kernels::cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kBn = 64;                      // output columns per CTA
constexpr int kBk = 64;                      // k per stage: 128 bytes of a BF16 row
constexpr int kChunk = 8;                    // BF16 elements per 16-byte copy
constexpr int kChunksPerRow = kBk / kChunk;  // 8 threads read one 128-byte row segment
// Shared rows are padded by 16 bytes so the 8 rows a fragment load touches
// start in different banks; the pitch stays a multiple of 16 bytes (cp.async,
// WMMA ldm) and 16-row fragment offsets stay 32-byte aligned (WMMA pointers).
constexpr int kLds = kBk + 8;        // BF16 stage pitch
constexpr int kLdc = kBn + 4;        // F32 epilogue pitch
constexpr int kGroupsPerThread = 4;  // groups per thread in each step of the group scan
constexpr int64_t kMaxGridY = 65535;

// Decode (kBm = 16): 1 x 4 warps of 16 x 16 and three stages to keep more
// weight bytes in flight. Prefill (kBm = 64): 2 x 2 warps of 32 x 32, two
// stages (three would pass 48 KB of static shared memory).
template <int kBm>
struct TileShape {
  static constexpr int kWarpsM = kBm >= 32 ? 2 : 1;
  static constexpr int kWarpsN = kWarps / kWarpsM;
  static constexpr int kWarpM = kBm / kWarpsM;
  static constexpr int kWarpN = kBn / kWarpsN;
  static constexpr int kFragsM = kWarpM / 16;
  static constexpr int kFragsN = kWarpN / 16;
  static constexpr int kStages = kBm <= 16 ? 3 : 2;
  static constexpr int kXStageElems = kBm * kLds;
  static constexpr int kWStageElems = kBn * kLds;
  static constexpr int kPipeBytes = kStages * (kXStageElems + kWStageElems) * 2;
  static constexpr int kEpilogueBytes = kBm * kLdc * 4;  // reuses the stages
  static constexpr int kSmemBytes = kPipeBytes > kEpilogueBytes ? kPipeBytes : kEpilogueBytes;
  static_assert(kWarpsM * kWarpsN == kWarps, "warp grid");
  static_assert(kWarpM % 16 == 0 && kWarpN % 16 == 0, "whole fragments per warp");
  static_assert(kBm <= kThreads, "one thread per row sets up the row table");
  // Under 48 KB of static shared memory (no opt-in attribute, so graph
  // capture needs no setup), with room for the scan and the row tables.
  static_assert(kSmemBytes + 3 * kBm * 8 < 44 * 1024, "static shared memory under 48 KB");
};

using Scan = cub::BlockScan<int64_t, kThreads>;

// The block's row tile: s_group stays -1 (set before the call) when `tile`
// lies past every group's tiles. Groups are scanned kThreads *
// kGroupsPerThread at a time, each thread owning consecutive groups (the
// blocked arrangement BlockScan expects).
template <int kBm>
__device__ void FindRowTileBlockwise(const int64_t* row_offsets, int num_groups, int64_t tile,
                                     Scan::TempStorage& scan_storage, int* s_group,
                                     int64_t* s_row_begin, int64_t* s_row_end) {
  int64_t tiles_before_step = 0;
  for (int base = 0; base < num_groups; base += kThreads * kGroupsPerThread) {
    const int first = base + static_cast<int>(threadIdx.x) * kGroupsPerThread;
    int64_t begin[kGroupsPerThread], end[kGroupsPerThread], tiles[kGroupsPerThread];
#pragma unroll
    for (int i = 0; i < kGroupsPerThread; ++i) {
      const int g = first + i;
      begin[i] = g < num_groups ? row_offsets[g] : 0;
      end[i] = g < num_groups ? row_offsets[g + 1] : 0;
      tiles[i] = RowTilesInGroup(end[i] - begin[i], kBm);
    }
    int64_t tiles_before[kGroupsPerThread];
    int64_t step_tiles;
    Scan(scan_storage).ExclusiveSum(tiles, tiles_before, step_tiles);
#pragma unroll
    for (int i = 0; i < kGroupsPerThread; ++i) {
      RowTile found;
      if (TileInGroup(tile, tiles_before_step + tiles_before[i], first + i, begin[i], end[i], kBm,
                      &found)) {
        *s_group = found.group;  // exactly one (group, tile) pair matches
        *s_row_begin = found.row_begin;
        *s_row_end = found.row_end;
      }
    }
    tiles_before_step += step_tiles;
    __syncthreads();  // scan_storage is reused by the next step
  }
}

__device__ __forceinline__ void StoreZeros(__nv_bfloat16* dst) {
  *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
}

// Weight rows [n0, n0 + kBn) x k [k0, k0 + kBk) into `ws` (pitch kLds), zeros
// outside [0, n) x [0, k). `vec`: k % 8 == 0 and w 16-byte aligned, so every
// in-range chunk is one aligned 16-byte cp.async.
__device__ void StageWeights(__nv_bfloat16* ws, const __nv_bfloat16* w, int64_t n, int64_t k,
                             int64_t n0, int64_t k0, bool vec) {
  for (int c = threadIdx.x; c < kBn * kChunksPerRow; c += kThreads) {
    const int row = c / kChunksPerRow;
    const int col = (c % kChunksPerRow) * kChunk;
    __nv_bfloat16* dst = ws + row * kLds + col;
    const int64_t gn = n0 + row;
    const int64_t gk = k0 + col;
    if (gn >= n || gk >= k) {
      StoreZeros(dst);
      continue;
    }
    const __nv_bfloat16* src = w + gn * k + gk;
    if (vec) {
      __pipeline_memcpy_async(dst, src, 16);
      continue;
    }
    for (int e = 0; e < kChunk; ++e) dst[e] = gk + e < k ? src[e] : __float2bfloat16(0.f);
  }
}

// Eight F32 values rounded to BF16 (nearest even) into 16 aligned bytes.
__device__ __forceinline__ void StoreRoundedF32x8(__nv_bfloat16* dst, const float* src) {
  const float4 lo = reinterpret_cast<const float4*>(src)[0];
  const float4 hi = reinterpret_cast<const float4*>(src)[1];
  __nv_bfloat162* out = reinterpret_cast<__nv_bfloat162*>(dst);
  out[0] = __floats2bfloat162_rn(lo.x, lo.y);
  out[1] = __floats2bfloat162_rn(lo.z, lo.w);
  out[2] = __floats2bfloat162_rn(hi.x, hi.y);
  out[3] = __floats2bfloat162_rn(hi.z, hi.w);
}

__device__ __forceinline__ __nv_bfloat16 RoundToBf16(float v) { return __float2bfloat16_rn(v); }
__device__ __forceinline__ __nv_bfloat16 RoundToBf16(__nv_bfloat16 v) { return v; }

// Tile rows [0, rows) x k [k0, k0 + kBk) of x into `xs` (pitch kLds), reading
// row x_row[i] of x for tile row i; zeros for rows >= rows and k outside
// [0, k). `vec`: x 16-byte aligned and ldx a multiple of 16 bytes, so a full
// chunk is one or two aligned 16-byte reads.
template <int kBm, typename X>
__device__ void StageActivations(__nv_bfloat16* xs, const X* x, int64_t ldx, int64_t k, int64_t k0,
                                 const int64_t* x_row, int rows, bool vec) {
  for (int c = threadIdx.x; c < kBm * kChunksPerRow; c += kThreads) {
    const int row = c / kChunksPerRow;
    const int col = (c % kChunksPerRow) * kChunk;
    __nv_bfloat16* dst = xs + row * kLds + col;
    const int64_t gk = k0 + col;
    if (row >= rows || gk >= k) {
      StoreZeros(dst);
      continue;
    }
    const X* src = x + x_row[row] * ldx + gk;
    if (vec && gk + kChunk <= k) {
      if constexpr (sizeof(X) == 4) {
        StoreRoundedF32x8(dst, src);
      } else {
        __pipeline_memcpy_async(dst, src, 16);
      }
      continue;
    }
    for (int e = 0; e < kChunk; ++e) {
      dst[e] = gk + e < k ? RoundToBf16(src[e]) : __float2bfloat16(0.f);
    }
  }
}

using AccFragment = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// acc += xs (kBm x kBk, row-major) * ws^T for this warp's fragments. ws holds
// W rows (n) of kBk values, which is B = W^T (k x n) in column-major order.
template <int kBm>
__device__ void MultiplyStage(
    const __nv_bfloat16* xs, const __nv_bfloat16* ws, int warp_m, int warp_n,
    AccFragment (&acc)[TileShape<kBm>::kFragsM][TileShape<kBm>::kFragsN]) {
  using T = TileShape<kBm>;
#pragma unroll
  for (int kk = 0; kk < kBk; kk += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a[T::kFragsM];
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b[T::kFragsN];
#pragma unroll
    for (int i = 0; i < T::kFragsM; ++i) {
      wmma::load_matrix_sync(a[i], xs + (warp_m * T::kWarpM + i * 16) * kLds + kk, kLds);
    }
#pragma unroll
    for (int j = 0; j < T::kFragsN; ++j) {
      wmma::load_matrix_sync(b[j], ws + (warp_n * T::kWarpN + j * 16) * kLds + kk, kLds);
    }
#pragma unroll
    for (int i = 0; i < T::kFragsM; ++i) {
#pragma unroll
      for (int j = 0; j < T::kFragsN; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }
}

// Per tile row: the x row it reads, the y row it writes and its scale (1
// unless y_rows and row_scale are given).
template <int kBm>
struct RowTable {
  int64_t x_row[kBm];
  int64_t y_row[kBm];
  float scale[kBm];
};

template <int kBm>
__device__ void FillRowTable(const GroupedGemmParams& p, int64_t row_begin, int rows,
                             RowTable<kBm>& table) {
  const int t = threadIdx.x;
  if (t >= rows) return;
  const int64_t r = row_begin + t;
  table.x_row[t] = p.x_rows != nullptr ? p.x_rows[r] : r;
  table.y_row[t] = p.y_rows != nullptr ? p.y_rows[r] : r;
  table.scale[t] = p.y_rows != nullptr && p.row_scale != nullptr ? p.row_scale[r] : 1.f;
}

// A block's row tile in shared memory (plain data: a __shared__ variable
// cannot have initializers, unlike RowTile).
struct SharedRowTile {
  int group;
  int64_t row_begin, row_end;
};

// Finds this block's row tile (blockIdx.y) and fills its row table. Returns
// its rows (1..kBm), or 0 when the tile lies past the real total: the same
// answer for every thread, so the whole block returns.
template <int kBm>
__device__ int ClaimRowTile(const GroupedGemmParams& p, Scan::TempStorage& scan_storage,
                            RowTable<kBm>& table, SharedRowTile& tile) {
  if (threadIdx.x == 0) tile.group = -1;
  __syncthreads();
  FindRowTileBlockwise<kBm>(p.row_offsets, p.num_groups, blockIdx.y, scan_storage, &tile.group,
                            &tile.row_begin, &tile.row_end);
  __syncthreads();
  if (tile.group < 0) return 0;
  const int rows = static_cast<int>(tile.row_end - tile.row_begin);
  FillRowTable<kBm>(p, tile.row_begin, rows, table);
  __syncthreads();
  return rows;
}

// The warps' accumulators into the F32 tile cs (kBm x kBn, pitch kLdc).
template <int kBm>
__device__ void StoreAccumulators(
    float* cs, AccFragment (&acc)[TileShape<kBm>::kFragsM][TileShape<kBm>::kFragsN], int warp_m,
    int warp_n) {
  using T = TileShape<kBm>;
#pragma unroll
  for (int i = 0; i < T::kFragsM; ++i) {
#pragma unroll
    for (int j = 0; j < T::kFragsN; ++j) {
      float* tile = cs + (warp_m * T::kWarpM + i * 16) * kLdc + warp_n * T::kWarpN + j * 16;
      wmma::store_matrix_sync(tile, acc[i][j], kLdc, wmma::mem_row_major);
    }
  }
}

// The tile's rows [0, rows) and columns [n0, n) into y: stored, or scaled and
// added with y_rows. Consecutive threads take consecutive columns (coalesced).
template <int kBm>
__device__ void WriteRows(const float* cs, const GroupedGemmParams& p, int64_t n0, int rows,
                          const RowTable<kBm>& table) {
  for (int e = threadIdx.x; e < kBm * kBn; e += kThreads) {
    const int row = e / kBn;
    const int col = e % kBn;
    const int64_t gn = n0 + col;
    if (row >= rows || gn >= p.n) continue;
    const float v = cs[row * kLdc + col];
    float* out = p.y + table.y_row[row] * p.n + gn;
    // Product times scale, rounded, then added (no fused multiply-add), as
    // the CPU kernel does.
    *out = p.y_rows != nullptr ? *out + __fmul_rn(v, table.scale[row]) : v;
  }
}

template <int kBm, typename X>
__global__ void __launch_bounds__(kThreads) GroupedGemmKernel(GroupedGemmParams p, int64_t ldx) {
  using T = TileShape<kBm>;
  __shared__ __align__(128) unsigned char smem[T::kSmemBytes];
  __shared__ Scan::TempStorage scan_storage;
  __shared__ RowTable<kBm> table;
  __shared__ SharedRowTile tile;
  const int rows = ClaimRowTile<kBm>(p, scan_storage, table, tile);
  if (rows == 0) return;  // past the real total: the whole block leaves

  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBn;
  const X* x = static_cast<const X*>(p.x);
  const __nv_bfloat16* w = static_cast<const __nv_bfloat16*>(p.w[tile.group]);
  const bool vec_w = p.k % kChunk == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0;
  const bool vec_x = (ldx * sizeof(X)) % 16 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(smem);
  __nv_bfloat16* ws = xs + T::kStages * T::kXStageElems;
  const auto stage = [&](int64_t k_tile) {
    const int slot = static_cast<int>(k_tile % T::kStages);
    const int64_t k0 = k_tile * kBk;
    StageWeights(ws + slot * T::kWStageElems, w, p.n, p.k, n0, k0, vec_w);
    StageActivations<kBm>(xs + slot * T::kXStageElems, x, ldx, p.k, k0, table.x_row, rows, vec_x);
  };

  const int warp = threadIdx.x / 32;
  const int warp_m = warp / T::kWarpsN;
  const int warp_n = warp % T::kWarpsN;
  AccFragment acc[T::kFragsM][T::kFragsN];
#pragma unroll
  for (int i = 0; i < T::kFragsM; ++i) {
#pragma unroll
    for (int j = 0; j < T::kFragsN; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  }

  // Ring of kStages slots: tile t lives in slot t % kStages. One commit per
  // slot load (empty past the end) keeps "all but the newest kStages - 2
  // groups done" equal to "tile k_tile has landed".
  const int64_t k_tiles = (p.k + kBk - 1) / kBk;
  for (int s = 0; s < T::kStages - 1; ++s) {
    if (s < k_tiles) stage(s);
    __pipeline_commit();
  }
  for (int64_t k_tile = 0; k_tile < k_tiles; ++k_tile) {
    __pipeline_wait_prior(T::kStages - 2);
    // Makes every thread's copies of tile k_tile visible, and ensures all
    // warps are done with tile k_tile - 1, whose slot is refilled next.
    __syncthreads();
    if (k_tile + T::kStages - 1 < k_tiles) stage(k_tile + T::kStages - 1);
    __pipeline_commit();
    const int slot = static_cast<int>(k_tile % T::kStages);
    MultiplyStage<kBm>(xs + slot * T::kXStageElems, ws + slot * T::kWStageElems, warp_m, warp_n,
                       acc);
  }
  __pipeline_wait_prior(0);
  __syncthreads();  // the stages become the epilogue tile
  float* cs = reinterpret_cast<float*>(smem);
  StoreAccumulators<kBm>(cs, acc, warp_m, warp_n);
  __syncthreads();
  WriteRows<kBm>(cs, p, n0, rows, table);
}

// --- Block-scaled FP8 weights: SIMT ------------------------------------------

constexpr int kFp8Bk = 32;  // k per stage
constexpr int kFp8ThreadCols = 16;  // threads across a tile's columns; 4 columns each
constexpr int kFp8ThreadRows = kThreads / kFp8ThreadCols;  // 8 rows of threads

__device__ __forceinline__ float RoundedActivation(float v) {
  return __bfloat162float(__float2bfloat16_rn(v));
}
__device__ __forceinline__ float RoundedActivation(__nv_bfloat16 v) { return __bfloat162float(v); }

template <int kBm>
struct Fp8Smem {
  float xs[kFp8Bk][kBm + 1];  // x tile, k-major; +1 spreads the banks
  float ws[kFp8Bk][kBn + 1];  // dequantized W tile, k-major
  static_assert(kBm % kFp8ThreadRows == 0, "whole rows per thread");
};

// y rows of the tile = x rows (rounded to BF16) times the dequantized W_g^T:
// W[r, c] = e4m3(w[r, c]) * scale[(first_row + r) / rows * scale_ld + c / cols].
template <int kBm, typename X>
__global__ void __launch_bounds__(kThreads)
    GroupedGemmFp8Kernel(GroupedGemmParams p, int64_t ldx, int64_t scale_ld) {
  constexpr int kRowsPerThread = kBm / kFp8ThreadRows;
  __shared__ Fp8Smem<kBm> sm;
  __shared__ __align__(16) float cs[kBm * kLdc];
  __shared__ Scan::TempStorage scan_storage;
  __shared__ RowTable<kBm> table;
  __shared__ SharedRowTile tile;
  const int rows = ClaimRowTile<kBm>(p, scan_storage, table, tile);
  if (rows == 0) return;  // past the real total: the whole block leaves

  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBn;
  const X* x = static_cast<const X*>(p.x);
  const uint8_t* w = static_cast<const uint8_t*>(p.w[tile.group]);
  const float* scale = static_cast<const float*>(p.w_scale_inv[tile.group]);
  const int64_t block_rows = p.w_blocks.rows;
  const int64_t block_cols = p.w_blocks.cols;
  const int64_t first_row = p.w_blocks.first_row;
  const int tx = threadIdx.x % kFp8ThreadCols;
  const int ty = threadIdx.x / kFp8ThreadCols;

  float acc[kRowsPerThread][4] = {};
  for (int64_t k0 = 0; k0 < p.k; k0 += kFp8Bk) {
    // Consecutive threads read consecutive k of one row (32 bytes of codes).
    for (int i = threadIdx.x; i < kBm * kFp8Bk; i += kThreads) {
      const int row = i / kFp8Bk;
      const int kk = i % kFp8Bk;
      const int64_t gk = k0 + kk;
      sm.xs[kk][row] =
          row < rows && gk < p.k ? RoundedActivation(x[table.x_row[row] * ldx + gk]) : 0.f;
    }
    for (int i = threadIdx.x; i < kBn * kFp8Bk; i += kThreads) {
      const int row = i / kFp8Bk;
      const int kk = i % kFp8Bk;
      const int64_t gn = n0 + row;
      const int64_t gk = k0 + kk;
      float v = 0.f;
      if (gn < p.n && gk < p.k) {
        v = E4M3ToFloat(w[gn * p.k + gk]) *
            scale[Fp8ScaleIndex(first_row + gn, gk, block_rows, block_cols, scale_ld)];
      }
      sm.ws[kk][row] = v;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kFp8Bk; ++kk) {
      float a[kRowsPerThread], b[4];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) a[i] = sm.xs[kk][ty + kFp8ThreadRows * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = sm.ws[kk][tx + kFp8ThreadCols * j];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      cs[(ty + kFp8ThreadRows * i) * kLdc + tx + kFp8ThreadCols * j] = acc[i][j];
    }
  }
  __syncthreads();
  WriteRows<kBm>(cs, p, n0, rows, table);
}

absl::Status ValidateGroupedGemm(const GroupedGemmParams& p) {
  if (p.w_type != WeightType::kBF16 && p.w_type != WeightType::kF8E4M3) {
    return absl::InvalidArgumentError(absl::StrCat(
        "GroupedGemm: w_type must be bf16 or f8_e4m3 on CUDA (got ", DTypeName(p.w_type), ")"));
  }
  const bool fp8 = p.w_type == WeightType::kF8E4M3;
  if (fp8) {
    if (absl::Status s = ValidateFp8Blocks("GroupedGemm", p.w_blocks, p.n, p.k); !s.ok()) return s;
  }
  if (p.num_groups < 0 || p.n < 0 || p.k < 0 || p.max_rows < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("GroupedGemm: negative shape num_groups=", p.num_groups, " n=", p.n,
                     " k=", p.k, " max_rows=", p.max_rows));
  }
  if (p.ldx != 0 && p.ldx < p.k) {
    return absl::InvalidArgumentError(absl::StrCat("GroupedGemm: ldx=", p.ldx, " < k=", p.k));
  }
  if (p.row_scale != nullptr && p.y_rows == nullptr) {
    return absl::InvalidArgumentError("GroupedGemm: row_scale is only used with y_rows");
  }
  if (p.num_groups == 0 || p.n == 0 || p.max_rows == 0) return absl::OkStatus();
  const char* null_field = p.row_offsets == nullptr ? "row_offsets"
                           : p.w == nullptr         ? "w"
                           : p.x == nullptr         ? "x"
                           : p.y == nullptr         ? "y"
                           : fp8 && p.w_scale_inv == nullptr ? "w_scale_inv"
                                                    : nullptr;
  if (null_field != nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("GroupedGemm: ", null_field, " is null with max_rows=", p.max_rows));
  }
  return absl::OkStatus();
}

template <int kBm>
absl::Status LaunchTiles(const GroupedGemmParams& p, int64_t ldx, cudaStream_t stream) {
  const int64_t row_tiles = RowTileBound(p.max_rows, p.num_groups, kBm);
  const int64_t col_tiles = (p.n + kBn - 1) / kBn;
  if (row_tiles > kMaxGridY || col_tiles > kMaxGridX) {
    return absl::InvalidArgumentError(absl::StrCat(
        "GroupedGemm: max_rows=", p.max_rows, " num_groups=", p.num_groups, " n=", p.n, " need a ",
        col_tiles, " x ", row_tiles, " grid, more than one launch allows"));
  }
  const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(row_tiles));
  if (p.w_type == WeightType::kF8E4M3) {
    const int64_t scale_ld = (p.k + p.w_blocks.cols - 1) / p.w_blocks.cols;
    if (p.x_type == RowType::kBF16) {
      GroupedGemmFp8Kernel<kBm, __nv_bfloat16><<<grid, kThreads, 0, stream>>>(p, ldx, scale_ld);
    } else {
      GroupedGemmFp8Kernel<kBm, float><<<grid, kThreads, 0, stream>>>(p, ldx, scale_ld);
    }
    JOULE_CUDA_RETURN_IF_LAUNCH_FAILED("GroupedGemmFp8Kernel");
    return absl::OkStatus();
  }
  if (p.x_type == RowType::kBF16) {
    GroupedGemmKernel<kBm, __nv_bfloat16><<<grid, kThreads, 0, stream>>>(p, ldx);
  } else {
    GroupedGemmKernel<kBm, float><<<grid, kThreads, 0, stream>>>(p, ldx);
  }
  JOULE_CUDA_RETURN_IF_LAUNCH_FAILED("GroupedGemmKernel");
  return absl::OkStatus();
}

}  // namespace

absl::Status LaunchGroupedGemm(const GroupedGemmParams& p, cudaStream_t stream) {
  const absl::Status valid = ValidateGroupedGemm(p);
  if (!valid.ok()) return valid;
  if (p.num_groups == 0 || p.n == 0 || p.max_rows == 0) return absl::OkStatus();
  const int64_t ldx = p.ldx != 0 ? p.ldx : p.k;
  // Both tile heights sum k in the same order, so a row's result does not
  // depend on the choice (expert parallelism is compared bit for bit).
  if (RowTileHeight(p.max_rows, p.num_groups) == kDecodeTileRows) {
    return LaunchTiles<kDecodeTileRows>(p, ldx, stream);
  }
  return LaunchTiles<kPrefillTileRows>(p, ldx, stream);
}

}  // namespace joule::kernels::cuda
