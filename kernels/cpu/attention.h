// Causal grouped-query attention over a paged KV cache (F32).
#pragma once

#include <cstdint>

#include "kernels/cpu/thread_pool.h"

namespace joule::kernels::cpu {

// Writes this step's keys and values into their cache slots.
// A slot is block * block_size + offset; cache layout per layer is
// [num_blocks, block_size, num_kv_heads, head_dim].
struct KvCacheWriteParams {
  const float* k = nullptr;  // [tokens, num_kv_heads, head_dim]
  const float* v = nullptr;
  const int64_t* slots = nullptr;  // [tokens]
  int64_t tokens = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  float* k_cache = nullptr;
  float* v_cache = nullptr;
};
void LaunchKvCacheWrite(const KvCacheWriteParams& p, CpuStream stream);

// For sequence s, its query tokens are q rows [query_start[s], query_start[s+1])
// and are the *last* tokens of its context of context_lens[s] tokens (their keys
// already written to the cache). Query i of a sequence with q_len queries sits at
// position context_len - q_len + i and attends to keys 0..position (or the last
// `sliding_window` of them when sliding_window > 0).
struct PagedAttentionParams {
  const float* q = nullptr;  // [tokens, num_q_heads, head_dim]
  float* out = nullptr;      // [tokens, num_q_heads, head_dim]
  int num_q_heads = 0;
  int num_kv_heads = 0;  // num_q_heads % num_kv_heads == 0
  int head_dim = 0;
  float scale = 1.0f;
  const float* k_cache = nullptr;
  const float* v_cache = nullptr;
  int block_size = 0;
  int num_seqs = 0;
  const int32_t* query_start = nullptr;   // [num_seqs + 1]
  const int32_t* context_lens = nullptr;  // [num_seqs]
  const int32_t* block_tables = nullptr;  // [num_seqs, max_blocks_per_seq]
  int max_blocks_per_seq = 0;
  int sliding_window = 0;  // 0: attend to the whole context
};
void LaunchPagedAttention(const PagedAttentionParams& p, CpuStream stream);

}  // namespace joule::kernels::cpu
