// Register-blocked GEMM micro-kernel, written once over the vector traits of
// simd_*.h and instantiated in one translation unit per ISA (internal).
//
// Both x and W are contiguous along k, so a tile keeps MR x NR vector
// accumulators of partial dot products: each step loads MR x vectors and NR
// weight vectors (BF16 widened in registers) and issues MR*NR FMAs; the
// accumulators are reduced horizontally once per tile. At m = 1 this streams
// NR weight rows at once and is bound by memory bandwidth; at larger m every
// widened weight vector feeds MR FMAs.
#pragma once

#include <cstdint>

#include "kernels/cpu/gemm_internal.h"

namespace joule::kernels::cpu {
namespace {  // internal linkage: one copy per ISA translation unit

// y[m:m+MR, n:n+NR] from full-k dot products. kPrefetch also prefetches the
// weight rows of the next column tile at the same k offset: with several FMAs
// per weight vector the out-of-order window alone keeps too few cache misses in
// flight to stream from DRAM at full bandwidth. (One row of x needs no help,
// and later row tiles of a block find the weights in L2.)
template <class V, class W, int MR, int NR, bool kPrefetch>
inline void GemmTile(const GemmBlock& b, int64_t m, int64_t n) {
  constexpr int L = V::kLanes;
  const int64_t k = b.k;
  const float* x[MR];
  const W* w[NR];
  const W* next[NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) x[i] = b.x + (m + i) * b.ldx;
#pragma GCC unroll 8
  for (int j = 0; j < NR; ++j) {
    w[j] = static_cast<const W*>(b.w) + (n + j) * k;
    next[j] = n + NR + j < b.n1 ? w[j] + NR * k : w[j];
  }

  typename V::Reg acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = V::Zero();

  int64_t kk = 0;
  for (; kk + L <= k; kk += L) {
    typename V::Reg xv[MR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      xv[i] = V::Load(x[i] + kk);
      V::Pin(xv[i]);
    }
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      if constexpr (kPrefetch) V::Prefetch(next[j] + kk);
      typename V::Reg wv = V::LoadW(w[j] + kk);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) acc[i][j] = V::Fma(xv[i], wv, acc[i][j]);
    }
  }
  if (kk < k) {  // k tail: masked loads read zeros past the end of each row
    const int rem = static_cast<int>(k - kk);
    typename V::Reg xv[MR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) xv[i] = V::LoadTail(x[i] + kk, rem);
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      typename V::Reg wv = V::LoadWTail(w[j] + kk, rem);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) acc[i][j] = V::Fma(xv[i], wv, acc[i][j]);
    }
  }

#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    const int64_t row = b.y_rows != nullptr ? b.y_rows[m + i] : m + i;
    const float scale = b.row_scale != nullptr ? b.row_scale[m + i] : 1.0f;
    float* y = b.y + row * b.ldy + n;
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      float r = V::ReduceAdd(acc[i][j]);
      if (b.bias != nullptr) r += b.bias[n + j];
      if (b.row_scale != nullptr) r *= scale;
      y[j] = b.accumulate ? y[j] + r : r;
    }
  }
}

// All columns of the block for rows [m, m + MR): full NR tiles, then single
// columns. Only the first row tile of a block streams weights from memory.
template <class V, class W, int MR, int NR>
inline void GemmRowTile(const GemmBlock& b, int64_t m) {
  int64_t n = b.n0;
  if (MR > 1 && m == b.m0) {
    for (; n + NR <= b.n1; n += NR) GemmTile<V, W, MR, NR, (MR > 1)>(b, m, n);
  } else {
    for (; n + NR <= b.n1; n += NR) GemmTile<V, W, MR, NR, false>(b, m, n);
  }
  for (; n < b.n1; ++n) GemmTile<V, W, MR, 1, false>(b, m, n);
}

// Tile shapes come from Tiles: kNr<mr> columns for mr rows. Rows go 4 at a
// time (the most compute-efficient tile; on AVX-512 two 4-row passes over an
// L2-resident weight block also beat a single 8x2 tile at m = 8) and end with
// one tile of 1-4 rows.
template <class V, class W, class Tiles>
inline void GemmBlockImpl(const GemmBlock& b) {
  int64_t m = b.m0;
  for (; b.m1 - m >= 5; m += 4) GemmRowTile<V, W, 4, Tiles::kNr4>(b, m);
  switch (b.m1 - m) {
    case 4: GemmRowTile<V, W, 4, Tiles::kNr4>(b, m); break;
    case 3: GemmRowTile<V, W, 3, Tiles::kNr3>(b, m); break;
    case 2: GemmRowTile<V, W, 2, Tiles::kNr2>(b, m); break;
    case 1: GemmRowTile<V, W, 1, Tiles::kNr1>(b, m); break;
    default: break;
  }
}

template <class V, class Tiles>
inline void GemmBlockDispatch(const GemmBlock& b) {
  if (b.w_bf16) {
    GemmBlockImpl<V, uint16_t, Tiles>(b);
  } else {
    GemmBlockImpl<V, float, Tiles>(b);
  }
}

}  // namespace
}  // namespace joule::kernels::cpu
