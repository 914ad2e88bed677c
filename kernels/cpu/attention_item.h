// Attention for one (query token, KV head) item, written once over the vector
// traits of simd_*.h and instantiated per ISA (internal).
//
// Two passes over the keys with the scores kept in scratch: scores = q.k * scale,
// an F32 softmax with the maximum subtracted, then out = sum p * v / sum p.
// Keys and values are read once per block of up to kMaxHeads query heads.
#pragma once

#include <math.h>  // expf: a plain libm call, nothing inline from <cmath>

#include <cstdint>

#include "kernels/cpu/attention_internal.h"

namespace joule::kernels::cpu {
namespace {  // internal linkage: one copy per ISA translation unit

constexpr int kMaxHeads = 8;

// Keys ahead whose rows are prefetched. One KV head's consecutive keys are
// num_kv_heads * head_dim floats apart (usually a new 4 KiB page each), which
// the hardware prefetchers do not follow, so both passes would otherwise wait
// on memory latency for every key.
constexpr int64_t kPrefetchKeys = 8;

// Fills a.rows[i] with the cache row offset (slot * kv_stride) of key
// key_begin + i, walking the block table once.
inline void ComputeRows(const AttentionItem& a) {
  int64_t index = 0;
  for (int64_t pos = a.key_begin; pos < a.key_end;) {
    const int64_t block = a.block_table[pos / a.block_size];
    const int64_t offset = pos % a.block_size;
    int64_t count = a.block_size - offset;
    if (count > a.key_end - pos) count = a.key_end - pos;
    const int64_t base = (block * a.block_size + offset) * a.kv_stride;
    for (int64_t t = 0; t < count; ++t) a.rows[index++] = base + t * a.kv_stride;
    pos += count;
  }
}

template <class V>
inline void PrefetchRow(const float* row, int head_dim) {
  for (int d = 0; d < head_dim; d += 16) V::Prefetch(row + d);  // 16 floats: one line
}

// scores[g, j] = scale * q[g] . k[j] for heads [g0, g0 + G).
template <class V, int G>
inline void Scores(const AttentionItem& a, int g0) {
  constexpr int L = V::kLanes;
  const int hd = a.head_dim;
  const int64_t nkeys = a.key_end - a.key_begin;
  const float* q = a.q + g0 * hd;
  float* s = a.scores + g0 * nkeys;
  for (int64_t j = 0; j < nkeys; ++j) {
    if (j + kPrefetchKeys < nkeys) PrefetchRow<V>(a.k_cache + a.rows[j + kPrefetchKeys], hd);
    const float* k = a.k_cache + a.rows[j];
    typename V::Reg acc[G];
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) acc[g] = V::Zero();
    int d = 0;
    for (; d + L <= hd; d += L) {
      typename V::Reg kv = V::Load(k + d);
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) acc[g] = V::Fma(V::Load(q + g * hd + d), kv, acc[g]);
    }
    if (d < hd) {
      typename V::Reg kv = V::LoadTail(k + d, hd - d);
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) acc[g] = V::Fma(V::LoadTail(q + g * hd + d, hd - d), kv, acc[g]);
    }
    // Horizontal sums four heads at a time: per key they cost about as much as
    // the dot products themselves, so the merged shuffle tree matters.
    int g = 0;
#pragma GCC unroll 8
    for (; g + 4 <= G; g += 4) {
      float r[4];
      V::ReduceAdd4(acc[g], acc[g + 1], acc[g + 2], acc[g + 3], r);
#pragma GCC unroll 4
      for (int t = 0; t < 4; ++t) s[(g + t) * nkeys + j] = r[t] * a.scale;
    }
#pragma GCC unroll 8
    for (; g < G; ++g) s[g * nkeys + j] = V::ReduceAdd(acc[g]) * a.scale;
  }
}

// out[g] = sum_j p[g, j] * v[j] / sum_j p[g, j] for heads [g0, g0 + G), where p
// are the exponentiated scores. Keys go in blocks of kKeyBlock: for each
// head_dim slice the block's contributions are summed in registers and out is
// read and written once per block (not once per key, which would chain every
// FMA through store-to-load forwarding). The first slice brings a block's value
// rows into L1, the other slices find them there.
template <class V, int G>
inline void Values(const AttentionItem& a, int g0, const float* inv_sum) {
  constexpr int L = V::kLanes;
  constexpr int kKeyBlock = 16;
  const int hd = a.v_dim;
  const int64_t nkeys = a.key_end - a.key_begin;
  const float* p = a.scores + g0 * nkeys;
  float* out = a.out + g0 * hd;
  for (int i = 0; i < G * hd; ++i) out[i] = 0.0f;
  for (int64_t first = 0; first < nkeys; first += kKeyBlock) {
    const int count = nkeys - first < kKeyBlock ? static_cast<int>(nkeys - first) : kKeyBlock;
    const float* rows[kKeyBlock];
    for (int t = 0; t < count; ++t) {
      rows[t] = a.v_cache + a.rows[first + t];
      if (first + t + kPrefetchKeys < nkeys) PrefetchRow<V>(a.v_cache + a.rows[first + t + kPrefetchKeys], hd);
    }
    for (int d = 0; d < hd; d += L) {
      const int rem = hd - d < L ? hd - d : L;
      typename V::Reg acc[G];
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) acc[g] = V::Zero();
      for (int t = 0; t < count; ++t) {
        typename V::Reg vv = rem == L ? V::Load(rows[t] + d) : V::LoadTail(rows[t] + d, rem);
#pragma GCC unroll 8
        for (int g = 0; g < G; ++g) acc[g] = V::Fma(V::Set1(p[g * nkeys + first + t]), vv, acc[g]);
      }
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) {
        float* o = out + g * hd + d;
        if (rem == L) {
          V::Store(o, V::Add(V::Load(o), acc[g]));
        } else {
          V::StoreTail(o, V::Add(V::LoadTail(o, rem), acc[g]), rem);
        }
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    for (int d = 0; d < hd; ++d) out[g * hd + d] *= inv_sum[g];
  }
}

// Numerically stable softmax of each head's score row, in place; writes 1/sum.
inline void Softmax(const AttentionItem& a, float* inv_sum) {
  const int64_t nkeys = a.key_end - a.key_begin;
  for (int g = 0; g < a.group; ++g) {
    float* s = a.scores + g * nkeys;
    float mx = s[0];
    for (int64_t j = 1; j < nkeys; ++j) mx = s[j] > mx ? s[j] : mx;
    float sum = 0.0f;
    for (int64_t j = 0; j < nkeys; ++j) {
      s[j] = expf(s[j] - mx);
      sum += s[j];
    }
    inv_sum[g] = 1.0f / sum;
  }
}

template <class V, int G>
inline void HeadBlock(const AttentionItem& a, int g0, const float* inv_sum, bool values) {
  if (values) {
    Values<V, G>(a, g0, inv_sum + g0);
  } else {
    Scores<V, G>(a, g0);
  }
}

template <class V>
inline void ForHeadBlocks(const AttentionItem& a, const float* inv_sum, bool values) {
  for (int g0 = 0; g0 < a.group; g0 += kMaxHeads) {
    switch (a.group - g0 < kMaxHeads ? a.group - g0 : kMaxHeads) {
      case 1: HeadBlock<V, 1>(a, g0, inv_sum, values); break;
      case 2: HeadBlock<V, 2>(a, g0, inv_sum, values); break;
      case 3: HeadBlock<V, 3>(a, g0, inv_sum, values); break;
      case 4: HeadBlock<V, 4>(a, g0, inv_sum, values); break;
      case 5: HeadBlock<V, 5>(a, g0, inv_sum, values); break;
      case 6: HeadBlock<V, 6>(a, g0, inv_sum, values); break;
      case 7: HeadBlock<V, 7>(a, g0, inv_sum, values); break;
      default: HeadBlock<V, 8>(a, g0, inv_sum, values); break;
    }
  }
}

template <class V>
inline void AttendImpl(const AttentionItem& a) {
  const int64_t nkeys = a.key_end - a.key_begin;
  if (nkeys <= 0) {  // no visible key (inconsistent context length): zeros, not NaN
    for (int i = 0; i < a.group * a.v_dim; ++i) a.out[i] = 0.0f;
    return;
  }
  float* inv_sum = a.scores + a.group * nkeys;
  ComputeRows(a);
  ForHeadBlocks<V>(a, nullptr, /*values=*/false);
  Softmax(a, inv_sum);
  ForHeadBlocks<V>(a, inv_sum, /*values=*/true);
}

}  // namespace
}  // namespace joule::kernels::cpu
