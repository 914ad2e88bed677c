// Parameters of the paged KV cache write and of causal grouped-query
// attention over it, shared by kernels/cpu/attention.h and
// kernels/cuda/attention.h.
//
// A KV slot is block * block_size + offset; the cache of one layer is
// [num_blocks, block_size, num_kv_heads, head_dim] of cache_type (the CPU
// keeps F32, the GPU BF16). Pointers are host memory for kernels::cpu
// launches and device memory for kernels::cuda launches.
#pragma once

#include <cstdint>

#include "kernels/params/types.h"

namespace joule::kernels {

// Writes this step's keys and values into their cache slots; a negative slot
// is padding (vLLM's convention) and stores nothing. Without v (MLA's latent
// cache: one row per token holds what keys and values are read from) only
// keys are written.
struct KvCacheWriteParams {
  const float* k = nullptr;  // [tokens, num_kv_heads, head_dim]
  const float* v = nullptr;  // [tokens, num_kv_heads, head_dim] or null
  const int64_t* slots = nullptr;  // [tokens]
  int64_t tokens = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  DType cache_type = DType::kF32;
};

// For sequence s, its query tokens are q rows [query_start[s], query_start[s+1])
// and are the *last* tokens of its context of context_lens[s] tokens (their keys
// already written to the cache). Query i of a sequence with q_len queries sits at
// position context_len - q_len + i and attends to keys 0..position (or the last
// `sliding_window` of them when sliding_window > 0). A query with no key to
// attend to (CUDA graphs' padding: context_len 0) gets a zero output.
//
// Values may be narrower than keys (v_head_dim < head_dim): each value row is
// the first v_head_dim elements of the v_cache row laid out like a key row.
// Multi-head latent attention's absorbed form is one KV head whose key is
// [latent, rope key] and whose value is the latent, both from one cache
// (v_cache == k_cache).
struct PagedAttentionParams {
  const float* q = nullptr;  // [tokens, num_q_heads, head_dim]
  float* out = nullptr;      // [tokens, num_q_heads, v_head_dim]
  int num_q_heads = 0;
  int num_kv_heads = 0;  // num_q_heads % num_kv_heads == 0
  int head_dim = 0;
  int v_head_dim = 0;    // 0 means head_dim; at most head_dim
  float scale = 1.0f;
  const void* k_cache = nullptr;
  const void* v_cache = nullptr;
  DType cache_type = DType::kF32;
  int block_size = 0;
  int num_seqs = 0;
  const int32_t* query_start = nullptr;   // [num_seqs + 1]
  const int32_t* context_lens = nullptr;  // [num_seqs]
  const int32_t* block_tables = nullptr;  // [num_seqs, max_blocks_per_seq]
  int max_blocks_per_seq = 0;
  int sliding_window = 0;  // 0: attend to the whole context
  // CUDA only: the metadata above lives on the device, so the launch is
  // sized from the host's numbers: query rows (query_start[num_seqs]) and a
  // bound on any context length (0: max_blocks_per_seq * block_size), which
  // fixes how many splits the keys are cut into (split-K for long decode
  // contexts). `workspace` holds the splits' partial results
  // (Backend::AttentionWorkspaceBytes).
  int64_t num_tokens = 0;
  int64_t max_context_len = 0;
  void* workspace = nullptr;
};

}  // namespace joule::kernels
