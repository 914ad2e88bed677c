// The arithmetic of the CUDA paged attention kernels that does not need a GPU:
// which sequence a query row belongs to, the keys it sees, how those keys are
// cut into splits, the workspace layout of the splits' partial results, the
// merge of two online-softmax states and F32 -> BF16 rounding. Functions are
// __host__ __device__ under nvcc and plain inline C++ elsewhere, so
// tests/kernels/cuda_attention_math_test.cc checks on every CI host the very
// code the kernels run. No CUDA headers: this compiles with any C++17 compiler.
#pragma once

#include <math.h>  // expf, fmaxf, INFINITY: the same calls on host and device

#include <cstddef>
#include <cstdint>

#ifndef JOULE_HD
#if defined(__CUDACC__)
#define JOULE_HD __host__ __device__
#else
#define JOULE_HD
#endif
#endif

namespace joule::kernels::cuda {

// ---------------------------------------------------------------------------
// Which keys a query row attends to
// ---------------------------------------------------------------------------

// Keys [begin, end) of one sequence; empty when end == begin (never end < begin).
struct KeyRange {
  int64_t begin = 0;
  int64_t end = 0;
  JOULE_HD int64_t size() const { return end - begin; }
};

// The sequence s with query_start[s] <= row < query_start[s + 1], or -1 when
// the row is in none (graph padding after query_start[num_seqs]). query_start
// is non-decreasing; sequences without queries (equal neighbours) are skipped.
JOULE_HD inline int FindSequence(const int32_t* query_start, int num_seqs, int64_t row) {
  if (num_seqs <= 0 || row < query_start[0] || row >= query_start[num_seqs]) return -1;
  int lo = 0;         // query_start[lo] <= row
  int hi = num_seqs;  // row < query_start[hi]
  while (hi - lo > 1) {
    const int mid = lo + (hi - lo) / 2;
    if (query_start[mid] <= row) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Keys visible to query i (0-based) of a sequence of context_len tokens whose
// last q_len tokens are the queries: position = context_len - q_len + i sees
// keys [0, position], or the last sliding_window of them when sliding_window > 0.
// Keys at or past key_capacity (max_blocks_per_seq * block_size) are dropped so
// an inconsistent context length cannot read past the block table.
JOULE_HD inline KeyRange VisibleKeys(int64_t context_len, int64_t q_len, int64_t i,
                                     int sliding_window, int64_t key_capacity) {
  KeyRange keys;
  keys.end = context_len - q_len + i + 1;
  if (sliding_window > 0 && keys.end - sliding_window > 0) keys.begin = keys.end - sliding_window;
  if (keys.end > key_capacity) keys.end = key_capacity;
  if (keys.end < keys.begin) keys.end = keys.begin;  // no key at all: a zero output
  return keys;
}

// ---------------------------------------------------------------------------
// Query-head chunks (groups wider than one CTA serves)
// ---------------------------------------------------------------------------

// A KV head's group of query heads is served by HeadChunks CTAs of at most
// max_heads heads each (multi-head latent attention: every query head shares
// the one latent KV head, up to 128 of them). Each chunk reads the keys again.
JOULE_HD inline int HeadChunks(int group, int max_heads) {
  return (group + max_heads - 1) / max_heads;
}

// Query heads [begin, end) of the group that chunk `chunk` serves: max_heads
// each, the last chunk the rest. Fixed sizes rather than balanced ones: no
// division on the device, which costs the GQA kernels registers and a spill
// (MLA's groups are multiples of 16 anyway).
struct HeadRange {
  int begin = 0;
  int end = 0;
  JOULE_HD int size() const { return end - begin; }
};

JOULE_HD inline HeadRange ChunkHeads(int group, int chunk, int max_heads) {
  HeadRange heads;
  heads.begin = chunk * max_heads;
  heads.end = group - heads.begin < max_heads ? group : heads.begin + max_heads;
  return heads;
}

// ---------------------------------------------------------------------------
// Split-K over long contexts (FlashDecoding)
// ---------------------------------------------------------------------------

// A split scores at least this many keys, so its partial result is worth
// writing out and merging.
inline constexpr int64_t kMinKeysPerSplit = 256;
inline constexpr int kMaxAttentionSplits = 32;
// Splitting stops once (query rows x query heads x splits) reaches this: by
// then there are CTAs enough for every SM without the split overhead.
inline constexpr int64_t kSplitTargetHeadRows = 4096;

// How many splits every query row's keys are cut into. Only host values go in,
// so the workspace query and the launch (and every replay of a captured graph)
// agree: many query rows (prefill) or short contexts give 1.
JOULE_HD inline int NumAttentionSplits(int64_t num_tokens, int num_q_heads,
                                       int64_t max_context_len) {
  if (num_tokens <= 0 || num_q_heads <= 0 || max_context_len <= kMinKeysPerSplit) return 1;
  const int64_t head_rows = num_tokens * num_q_heads;
  if (head_rows >= kSplitTargetHeadRows) return 1;
  int64_t splits = (max_context_len + kMinKeysPerSplit - 1) / kMinKeysPerSplit;
  const int64_t for_occupancy = (kSplitTargetHeadRows + head_rows - 1) / head_rows;
  if (splits > for_occupancy) splits = for_occupancy;
  if (splits > kMaxAttentionSplits) splits = kMaxAttentionSplits;
  return static_cast<int>(splits);
}

// Split `split` of num_splits gets keys [begin + n*split/S, begin + n*(split+1)/S):
// consecutive, each key in exactly one split, sizes within one of each other,
// and empty splits when the row has fewer keys than splits. The query's own
// range is cut (not max_context_len), so short rows in a long batch stay balanced.
JOULE_HD inline KeyRange SplitKeys(KeyRange keys, int split, int num_splits) {
  const int64_t n = keys.size();
  KeyRange part;
  part.begin = keys.begin + n * split / num_splits;
  part.end = keys.begin + n * (split + 1) / num_splits;
  return part;
}

// Where the splits' partial results live in the workspace (floats):
//   partial_out [rows, num_splits, head_dim]  un-normalized sum p * v
//                                             (head_dim: of the values, v_head_dim)
//   partial_max [rows, num_splits]            running max m (-inf: no key)
//   partial_sum [rows, num_splits]            sum of exp(score - m)
// with rows = num_tokens * num_q_heads (row r = token * num_q_heads + q head).
struct AttentionWorkspaceLayout {
  int num_splits = 1;
  int64_t out_offset = 0;  // in floats from the workspace start
  int64_t max_offset = 0;
  int64_t sum_offset = 0;
  size_t bytes = 0;  // 0 with one split: nothing is written there
};

JOULE_HD inline AttentionWorkspaceLayout MakeAttentionWorkspaceLayout(int64_t num_tokens,
                                                                      int num_q_heads,
                                                                      int head_dim,
                                                                      int64_t max_context_len) {
  AttentionWorkspaceLayout layout;
  layout.num_splits = NumAttentionSplits(num_tokens, num_q_heads, max_context_len);
  if (layout.num_splits == 1 || head_dim <= 0) return layout;
  const int64_t partials = num_tokens * num_q_heads * layout.num_splits;
  layout.out_offset = 0;
  layout.max_offset = partials * head_dim;
  layout.sum_offset = layout.max_offset + partials;
  layout.bytes = static_cast<size_t>(layout.sum_offset + partials) * sizeof(float);
  return layout;
}

// ---------------------------------------------------------------------------
// Online softmax
// ---------------------------------------------------------------------------

// Softmax over some keys, kept un-normalized: m = max score, l = sum exp(s - m),
// and (beside it) acc[d] = sum exp(s - m) * v[d]. No key: m = -inf, l = 0, acc = 0.
struct SoftmaxState {
  float m = -INFINITY;
  float l = 0.f;
};

// exp(m - m_total), the factor a state with max m is rescaled by under the
// merged max m_total >= m. An empty state weighs 0 (exp(-inf - -inf) is NaN).
JOULE_HD inline float MergeWeight(float m, float m_total) {
  return m == -INFINITY ? 0.f : expf(m - m_total);
}

// Folds state b (with its acc_b[0, n)) into a (acc_a[0, n)); the order of
// merges changes only rounding.
JOULE_HD inline void MergeSoftmaxState(SoftmaxState& a, float* acc_a, const SoftmaxState& b,
                                       const float* acc_b, int n) {
  const float m = fmaxf(a.m, b.m);
  const float weight_a = MergeWeight(a.m, m);
  const float weight_b = MergeWeight(b.m, m);
  a.l = a.l * weight_a + b.l * weight_b;
  for (int d = 0; d < n; ++d) acc_a[d] = acc_a[d] * weight_a + acc_b[d] * weight_b;
  a.m = m;
}

// The attention output from a state: acc / l, and 0 for a query with no key
// (l == 0 only then; a NaN l still gives NaN, so bad inputs stay visible).
JOULE_HD inline float FinalizeSoftmax(float acc, float l) { return l == 0.f ? 0.f : acc * (1.f / l); }

// ---------------------------------------------------------------------------
// BF16 cache rows
// ---------------------------------------------------------------------------

// F32 bits -> BF16 bits, round to nearest even (as PyTorch does). A NaN keeps
// its sign and top payload and gets the quiet bit, so a NaN whose payload sits
// in the low 16 bits cannot round into infinity.
JOULE_HD inline uint16_t Bf16BitsFromF32Bits(uint32_t bits) {
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

}  // namespace joule::kernels::cuda
