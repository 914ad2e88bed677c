// The paged KV cache write and causal grouped-query attention over it on CUDA.
// The parameter structs (and their semantics) are in kernels/params/attention.h,
// shared with kernels/cpu/attention.h; every pointer is device memory. Launches
// are asynchronous on `stream`; the Status reports bad parameters and launch
// failures, not faults inside the kernel.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "kernels/cuda/attention_checks.h"  // the accepted shapes and their limits
#include "kernels/params/attention.h"

namespace joule::kernels::cuda {

using ::joule::kernels::KvCacheWriteParams;
using ::joule::kernels::PagedAttentionParams;

// F32 rows into an F32 or BF16 cache (BF16: round to nearest even, NaN stays
// NaN); a negative slot stores nothing. A null v writes keys only (MLA's
// latent cache), and v_cache may then be null too.
absl::Status LaunchKvCacheWrite(const KvCacheWriteParams& p, cudaStream_t stream);

// Workspace bytes LaunchPagedAttention needs (0 when it does not split the
// keys). max_context_len must be the bound the launch uses: p.max_context_len,
// or max_blocks_per_seq * block_size when that is 0 (the overload below
// resolves it from the parameters). The partial outputs are v_head_dim wide
// (0 means head_dim), so sizing with head_dim alone covers any narrower values.
size_t PagedAttentionWorkspaceBytes(int64_t num_tokens, int num_q_heads, int head_dim,
                                    int64_t max_context_len, int v_head_dim = 0);
size_t PagedAttentionWorkspaceBytes(const PagedAttentionParams& p);

// Reads no metadata on the host: the grid follows num_tokens, the head counts
// and the context bound only, so one captured launch replays with new
// query_start / context_lens / block_tables. Rows in no sequence (from
// query_start[num_seqs] to num_tokens: graph padding) and queries with no key
// (context_len 0) get zeros. With more than one split (NumAttentionSplits in
// attention_math.h) `workspace` must hold PagedAttentionWorkspaceBytes(p).
absl::Status LaunchPagedAttention(const PagedAttentionParams& p, cudaStream_t stream);

}  // namespace joule::kernels::cuda
