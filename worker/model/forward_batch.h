// What one forward pass runs over: the step's batch in host memory, the KV
// cache it reads and writes, and the largest step a workspace is sized for.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/params/types.h"

namespace joule {

// Per-layer KV storage in the backend's memory, laid out
// [num_blocks, block_size, num_kv_heads, head_dim] of `type`.
struct KvCacheView {
  int block_size = 0;
  int64_t num_blocks = 0;
  kernels::DType type = kernels::DType::kF32;
  std::vector<void*> k;  // [num_layers]
  std::vector<void*> v;  // [num_layers]
};

// One step's work, flattened over tokens, in host memory. Sequence s owns
// token rows [query_start[s], query_start[s+1]); those are the last tokens of
// its context of context_lens[s] tokens.
struct ForwardBatch {
  std::vector<int32_t> tokens;        // [T]
  std::vector<int32_t> positions;     // [T]
  std::vector<int64_t> slots;         // [T] KV slot = block * block_size + offset
  std::vector<int32_t> query_start;   // [S + 1]
  std::vector<int32_t> context_lens;  // [S]
  std::vector<int32_t> block_tables;  // [S * max_blocks_per_seq]
  int max_blocks_per_seq = 0;
  std::vector<int32_t> logit_rows;    // token rows whose next-token logits are wanted

  int64_t num_tokens() const { return static_cast<int64_t>(tokens.size()); }
  int num_seqs() const { return static_cast<int>(context_lens.size()); }
};

// Where each logit row's next token is chosen (kernels/params/sampling.h):
// temperature >= 0 on the device (0: greedy; else a draw with `uniform`), its
// token returned in `tokens` and its logits never copied back; < 0 on the host,
// from the logits Model::Forward copies back (tokens -1).
struct StepSampling {
  std::vector<float> temperature;  // [logit rows]
  std::vector<double> uniform;     // [logit rows]
  std::vector<int32_t> tokens;     // [logit rows], written by Model::Forward
};

// The largest step a workspace holds: tokens, sequences, block-table width
// and logit rows, and the longest context attention may read.
struct StepShape {
  int64_t tokens = 0;
  int64_t seqs = 0;
  int64_t blocks_per_seq = 0;
  int64_t logit_rows = 0;
  int64_t max_context_len = 0;

  bool Holds(const StepShape& s) const {
    return tokens >= s.tokens && seqs >= s.seqs && blocks_per_seq >= s.blocks_per_seq &&
           logit_rows >= s.logit_rows && max_context_len >= s.max_context_len;
  }
  StepShape Max(const StepShape& s) const;
};

}  // namespace joule
