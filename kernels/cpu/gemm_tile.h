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

#include <bit>
#include <cstdint>
#include <type_traits>

#include "kernels/cpu/gemm_internal.h"
#include "kernels/cpu/simd_scalar.h"

namespace joule::kernels::cpu {
namespace {  // internal linkage: one copy per ISA translation unit

// y[m:m+MR, n:n+NR] from full-k dot products. kPrefetch also prefetches the
// weight rows of the next column tile at the same k offset: with several FMAs
// per weight vector the out-of-order window alone keeps too few cache misses in
// flight to stream from DRAM at full bandwidth. (One row of x needs no help,
// and later row tiles of a block find the weights in L2.)
// Row m of the block's x and the row of y it lands in (x_rows / y_rows, when given).
template <class X>
inline const X* GemmRowX(const GemmBlock& b, int64_t m) {
  const int64_t row = b.x_rows != nullptr ? b.x_rows[m] : m;
  return static_cast<const X*>(b.x) + row * b.ldx;
}
inline float* GemmRowY(const GemmBlock& b, int64_t m) {
  const int64_t row = b.y_rows != nullptr ? b.y_rows[m] : m;
  return b.y + row * b.ldy;
}

template <class V, class X, int MR, int NR, bool kPrefetch>
inline void GemmTileFp8(const GemmBlock& b, int64_t m, int64_t n);

template <class V, class X, class W, int MR, int NR, bool kPrefetch>
inline void GemmTile(const GemmBlock& b, int64_t m, int64_t n) {
  if constexpr (std::is_same_v<W, uint8_t>) {
    return GemmTileFp8<V, X, MR, NR, kPrefetch>(b, m, n);
  }
  constexpr int L = V::kLanes;
  const int64_t k = b.k;
  const X* x[MR];
  const W* w[NR];
  const W* next[NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) x[i] = GemmRowX<X>(b, m + i);
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
      xv[i] = V::LoadW(x[i] + kk);  // BF16 activations widen like weights
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
    for (int i = 0; i < MR; ++i) xv[i] = V::LoadWTail(x[i] + kk, rem);
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      typename V::Reg wv = V::LoadWTail(w[j] + kk, rem);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) acc[i][j] = V::Fma(xv[i], wv, acc[i][j]);
    }
  }

#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    const float scale = b.row_scale != nullptr ? b.row_scale[m + i] : 1.0f;
    float* y = GemmRowY(b, m + i) + n;
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      float r = V::ReduceAdd(acc[i][j]);
      if (b.bias != nullptr) r += b.bias[n + j];
      if (b.row_scale != nullptr) r *= scale;
      y[j] = b.accumulate ? y[j] + r : r;
    }
  }
}

// GemmTile over FP8 E4M3 weights with block scales. The k loop runs block by
// block of the scale grid: each column's scale is set once per block, and each
// widened weight vector (the code's value times 2^-8, see simd_avx2.h) is
// multiplied by it before its MR FMAs, so the products are those of the
// dequantized weights scaled by 2^-8 (which commutes with every rounding outside
// the subnormal range) and the dot product is multiplied by 2^8 once at the
// end: the F32 GEMM over dequantized weights in the same summation order. A block width that is not a
// multiple of the vector length costs a masked tail per block, nothing more.
template <class V, class X, int MR, int NR, bool kPrefetch>
inline void GemmTileFp8(const GemmBlock& b, int64_t m, int64_t n) {
  constexpr int L = V::kLanes;
  const int64_t k = b.k;
  const X* x[MR];
  const uint8_t* w[NR];
  const uint8_t* next[NR];
  const float* scale_row[NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) x[i] = GemmRowX<X>(b, m + i);
#pragma GCC unroll 8
  for (int j = 0; j < NR; ++j) {
    w[j] = static_cast<const uint8_t*>(b.w) + (n + j) * k;
    next[j] = n + NR + j < b.n1 ? w[j] + NR * k : w[j];
    scale_row[j] = b.w_scale_inv + (b.scale_row0 + n + j) / b.block_rows * b.scale_ld;
  }

  typename V::Reg acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = V::Zero();

  for (int64_t k0 = 0, block = 0; k0 < k; k0 += b.block_cols, ++block) {
    const int64_t k1 = k - k0 < b.block_cols ? k : k0 + b.block_cols;
    typename V::Reg scale[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) scale[j] = V::Set1(scale_row[j][block]);
    int64_t kk = k0;
    for (; kk + L <= k1; kk += L) {
      typename V::Reg xv[MR];
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        xv[i] = V::LoadW(x[i] + kk);
        V::Pin(xv[i]);
      }
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) {
        if constexpr (kPrefetch) V::Prefetch(next[j] + kk);
        const typename V::Reg wv = V::Mul(V::LoadW(w[j] + kk), scale[j]);
#pragma GCC unroll 8
        for (int i = 0; i < MR; ++i) acc[i][j] = V::Fma(xv[i], wv, acc[i][j]);
      }
    }
    if (kk < k1) {  // the block's tail: masked loads read zeros past it
      const int rem = static_cast<int>(k1 - kk);
      typename V::Reg xv[MR];
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) xv[i] = V::LoadWTail(x[i] + kk, rem);
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) {
        const typename V::Reg wv = V::Mul(V::LoadWTail(w[j] + kk, rem), scale[j]);
#pragma GCC unroll 8
        for (int i = 0; i < MR; ++i) acc[i][j] = V::Fma(xv[i], wv, acc[i][j]);
      }
    }
  }

#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    const float row_scale = b.row_scale != nullptr ? b.row_scale[m + i] : 1.0f;
    float* y = GemmRowY(b, m + i) + n;
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      float r = V::ReduceAdd(acc[i][j]) * 256.0f;
      if (b.bias != nullptr) r += b.bias[n + j];
      if (b.row_scale != nullptr) r *= row_scale;
      y[j] = b.accumulate ? y[j] + r : r;
    }
  }
}

// The last `rem` (< NR) columns as one narrower tile: a column at a time would
// load the MR x vectors once per column (the gate/up projection of a tiny
// model has n = 16 = 6 + 6 + 4 on AVX-512).
template <class V, class X, class W, int MR, int NR>
inline void GemmRemainderTile(const GemmBlock& b, int64_t m, int64_t n, int rem) {
  if constexpr (NR > 1) {
    if (rem == NR) return GemmTile<V, X, W, MR, NR, false>(b, m, n);
    GemmRemainderTile<V, X, W, MR, NR - 1>(b, m, n, rem);
  } else {
    GemmTile<V, X, W, MR, 1, false>(b, m, n);
  }
}

// All columns of the block for rows [m, m + MR): full NR tiles, then one
// narrower tile. Only the first row tile of a block streams weights from memory.
template <class V, class X, class W, int MR, int NR>
inline void GemmRowTile(const GemmBlock& b, int64_t m) {
  int64_t n = b.n0;
  if (MR > 1 && m == b.m0) {
    for (; n + NR <= b.n1; n += NR) GemmTile<V, X, W, MR, NR, (MR > 1)>(b, m, n);
  } else {
    for (; n + NR <= b.n1; n += NR) GemmTile<V, X, W, MR, NR, false>(b, m, n);
  }
  if (n < b.n1) GemmRemainderTile<V, X, W, MR, NR - 1>(b, m, n, static_cast<int>(b.n1 - n));
}

// Not common/dtype.h's Bf16ToF32: an inline function with external linkage,
// compiled here with this ISA's flags, could be the copy the linker keeps for
// every caller (the reason this header sits in an anonymous namespace).
inline float Widen(float w) { return w; }
inline float Widen(uint16_t w) {  // BF16 is the high half of an F32
  return std::bit_cast<float>(static_cast<uint32_t>(w) << 16);
}

// Weight (row, kk) of the block as F32: FP8 codes times their block's scale
// (exactly the dequantized weight), other types widened.
template <class W>
inline float WeightAt(const GemmBlock& b, const W* row, int64_t row_index, int64_t kk) {
  if constexpr (std::is_same_v<W, uint8_t>) {
    // Scalar's widening is exact: the code's value times 2^-8.
    const float value = Scalar::LoadW(row + kk) * 256.0f;
    return value * b.w_scale_inv[(b.scale_row0 + row_index) / b.block_rows * b.scale_ld +
                                 kk / b.block_cols];
  } else {
    return Widen(row[kk]);
  }
}

// Rows shorter than two vectors (the down projection of a tiny test model has
// k = 8): a dot product per output would spend more on its masked loads and
// horizontal reduction than on its one or two FMAs. Instead the block's
// weights are transposed once per panel into wt[k][columns] and x is
// broadcast, so every FMA yields kLanes outputs and nothing is reduced. The
// transpose costs about one row of the dot-product form. The choice depends on
// k alone, never on the rows in the block: a row's result must not depend on
// which other rows share its batch (expert parallelism regroups rows and is
// checked bit for bit against the local executor).
template <class V>
constexpr bool UseShortK(int64_t k) {
  return V::kLanes > 1 && k < 2 * V::kLanes;
}

// One output row of a short-k panel, columns [j, j + U*L) (or [j, j + count)
// when U = 1 and count < L): U independent accumulators share each broadcast
// of x, then (dot + bias) * scale is added to y or stored, as GemmTile does.
template <class V, int U, class X>
inline void ShortKColumns(const float* wt, int64_t panel, const X* x, int64_t k,
                          const float* bias, typename V::Reg scale, bool accumulate, float* y,
                          int64_t j, int count) {
  constexpr int L = V::kLanes;
  const bool full = count == L;
  const auto load = [&](const float* p) { return full ? V::Load(p) : V::LoadTail(p, count); };
  typename V::Reg acc[U];
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u) acc[u] = bias == nullptr ? V::Zero() : load(bias + j + u * L);
  for (int64_t kk = 0; kk < k; ++kk) {
    const typename V::Reg xv = V::Set1(Widen(x[kk]));
    const float* w = wt + kk * panel + j;
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) acc[u] = V::Fma(xv, load(w + u * L), acc[u]);
  }
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u) {
    float* out = y + j + u * L;
    const typename V::Reg r = V::Fma(acc[u], scale, accumulate ? load(out) : V::Zero());
    if (full) {
      V::Store(out, r);
    } else {
      V::StoreTail(out, r, count);
    }
  }
}

template <class V, class X, class W>
inline void GemmBlockShortK(const GemmBlock& b) {
  constexpr int L = V::kLanes;
  constexpr int64_t kPanel = 8 * L;  // columns per transposed panel
  constexpr int64_t kMaxK = 2 * L - 1;
  alignas(64) float wt[kMaxK * kPanel];
  const int64_t k = b.k;
  for (int64_t c0 = b.n0; c0 < b.n1; c0 += kPanel) {
    const int64_t nc = b.n1 - c0 < kPanel ? b.n1 - c0 : kPanel;
    for (int64_t j = 0; j < nc; ++j) {
      const W* row = static_cast<const W*>(b.w) + (c0 + j) * k;
      for (int64_t kk = 0; kk < k; ++kk) wt[kk * kPanel + j] = WeightAt(b, row, c0 + j, kk);
    }
    for (int64_t m = b.m0; m < b.m1; ++m) {
      const X* x = GemmRowX<X>(b, m);
      float* y = GemmRowY(b, m) + c0;
      const float* bias = b.bias != nullptr ? b.bias + c0 : nullptr;
      const typename V::Reg scale = V::Set1(b.row_scale != nullptr ? b.row_scale[m] : 1.0f);
      int64_t j = 0;
      for (; j + 4 * L <= nc; j += 4 * L) {
        ShortKColumns<V, 4>(wt, kPanel, x, k, bias, scale, b.accumulate, y, j, L);
      }
      for (; j + L <= nc; j += L) {
        ShortKColumns<V, 1>(wt, kPanel, x, k, bias, scale, b.accumulate, y, j, L);
      }
      if (j < nc) {
        ShortKColumns<V, 1>(wt, kPanel, x, k, bias, scale, b.accumulate, y, j,
                            static_cast<int>(nc - j));
      }
    }
  }
}

// Tile shapes come from Tiles: kNr<mr> columns for mr rows. Rows go 4 at a
// time (the most compute-efficient tile; on AVX-512 two 4-row passes over an
// L2-resident weight block also beat a single 8x2 tile at m = 8) and end with
// one tile of 1-4 rows.
template <class V, class X, class W, class Tiles>
inline void GemmBlockImpl(const GemmBlock& b) {
  if (UseShortK<V>(b.k)) return GemmBlockShortK<V, X, W>(b);
  int64_t m = b.m0;
  for (; b.m1 - m >= 5; m += 4) GemmRowTile<V, X, W, 4, Tiles::kNr4>(b, m);
  switch (b.m1 - m) {
    case 4: GemmRowTile<V, X, W, 4, Tiles::kNr4>(b, m); break;
    case 3: GemmRowTile<V, X, W, 3, Tiles::kNr3>(b, m); break;
    case 2: GemmRowTile<V, X, W, 2, Tiles::kNr2>(b, m); break;
    case 1: GemmRowTile<V, X, W, 1, Tiles::kNr1>(b, m); break;
    default: break;
  }
}

template <class V, class Tiles>
inline void GemmBlockDispatch(const GemmBlock& b) {
  if (b.w_fp8) {
    if (b.x_bf16) return GemmBlockImpl<V, uint16_t, uint8_t, Tiles>(b);
    return GemmBlockImpl<V, float, uint8_t, Tiles>(b);
  }
  if (b.x_bf16) {
    if (b.w_bf16) return GemmBlockImpl<V, uint16_t, uint16_t, Tiles>(b);
    return GemmBlockImpl<V, uint16_t, float, Tiles>(b);
  }
  if (b.w_bf16) return GemmBlockImpl<V, float, uint16_t, Tiles>(b);
  GemmBlockImpl<V, float, float, Tiles>(b);
}

}  // namespace
}  // namespace joule::kernels::cpu
