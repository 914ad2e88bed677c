// Paged KV cache write and FlashDecoding-style paged attention (SIMT, F32 math).
//
// Attention: one CTA of kThreads per (query row, KV head, split) serves every
// query head of that KV head's group, so each K/V row is read once per group.
// A group wider than kMaxAttentionGroup (multi-head latent attention's one
// latent KV head under all query heads) is cut into chunks of query heads,
// one CTA each. Keys go in tiles of kKeyTile: the warps score the tile (lanes
// split head_dim), one warp per query head updates that head's online
// softmax, and each thread adds the tile's values into its own value columns
// (the first v_head_dim of the row, which MLA's values are). With one split
// the CTA writes out = acc / l; with several it writes its un-normalized state
// to the workspace and CombineSplitsKernel merges the splits. The index and
// softmax arithmetic is in attention_math.h, tested on the host.
#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/attention.h"
#include "kernels/cuda/attention_math.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch_util.cuh"

namespace joule::kernels::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kKeyTile = 32;  // one key per lane in UpdateSoftmax
constexpr int kCacheWriteThreads = 128;
constexpr int kCombineThreads = 128;
constexpr int kMaxGridY = 65535;
static_assert(kKeyTile == 32, "UpdateSoftmax gives each lane one key of the tile");
static_assert(kMaxAttentionGroup <= kThreads, "WriteResult stores one head's max/sum per thread");

// head_dim columns each lane holds when scoring a key (lanes split the row).
__host__ __device__ constexpr int LaneDims(int head_dim_cap) { return head_dim_cap / 32; }
// Value columns each thread accumulates when adding values.
__host__ __device__ constexpr int ThreadDims(int value_dim_cap) { return (value_dim_cap + kThreads - 1) / kThreads; }

// The kernel instance for a head_dim: the smallest power of two >= 32 that
// holds it, or the widest instance (MLA's latent + rope key, values capped at
// kMaxAttentionValueDim).
int HeadDimCap(int head_dim) {
  if (head_dim <= 32) return 32;
  if (head_dim <= 64) return 64;
  if (head_dim <= 128) return 128;
  if (head_dim <= 256) return 256;
  return kMaxAttentionHeadDim;
}

__device__ __forceinline__ float LoadCache(const float* p) { return *p; }
__device__ __forceinline__ float LoadCache(const uint16_t* p) { return Bf16BitsToFloat(*p); }
__device__ __forceinline__ void StoreCache(float* p, float v) { *p = v; }
__device__ __forceinline__ void StoreCache(uint16_t* p, float v) {
  *p = Bf16BitsFromF32Bits(__float_as_uint(v));
}

// ---------------------------------------------------------------------------
// KV cache write: one CTA per token
// ---------------------------------------------------------------------------

template <typename CacheT>
__device__ __forceinline__ void StoreRow(const float* src, CacheT* dst, int64_t n) {
  for (int64_t c = threadIdx.x; c < n; c += blockDim.x) StoreCache(dst + c, src[c]);
}

template <typename CacheT>
__global__ void KvCacheWriteKernel(KvCacheWriteParams p) {
  const int64_t t = blockIdx.x;
  const int64_t slot = p.slots[t];
  if (slot < 0) return;  // padding token: nothing to store
  const int64_t row = static_cast<int64_t>(p.num_kv_heads) * p.head_dim;
  StoreRow(p.k + t * row, static_cast<CacheT*>(p.k_cache) + slot * row, row);
  // No v: MLA's latent cache, whose key row holds the values too.
  if (p.v != nullptr) StoreRow(p.v + t * row, static_cast<CacheT*>(p.v_cache) + slot * row, row);
}

// ---------------------------------------------------------------------------
// Attention: one CTA per (query row, KV head, split)
// ---------------------------------------------------------------------------

// No default member initializers: __shared__ variables cannot have constructors.
template <int kHeadDimCap>
struct AttentionShared {
  float q[kMaxAttentionGroup][kHeadDimCap];      // the CTA's queries, zero past head_dim
  float probs[kMaxAttentionGroup][kKeyTile];     // a tile's scores, then exp(score - max)
  int64_t key_rows[kKeyTile];                    // element offset of each tile key's row
  float max[kMaxAttentionGroup];                 // per query head: running max score
  float sum[kMaxAttentionGroup];                 // running sum of exp(score - max)
  float rescale[kMaxAttentionGroup];             // this tile's factor for the old acc
};

// What one CTA works on.
struct AttentionJob {
  int64_t token = 0;  // query row
  int kv_head = 0;
  int split = 0;
  int heads = 0;  // query heads served: at most kMaxAttentionGroup
  // Output rows [first_row, first_row + heads) of [num_tokens * num_q_heads].
  int64_t first_row = 0;
  int seq = -1;   // -1: the row belongs to no sequence (no keys, zero output)
  KeyRange keys;  // this split's share of the row's visible keys
};

__device__ AttentionJob FindJob(const PagedAttentionParams& p, int num_splits) {
  AttentionJob job;
  const int64_t cta = blockIdx.x;  // (token * num_kv_heads + kv_head) * num_splits + split
  job.split = static_cast<int>(cta % num_splits);
  job.kv_head = static_cast<int>((cta / num_splits) % p.num_kv_heads);
  job.token = cta / num_splits / p.num_kv_heads;
  // The chunk of query heads is blockIdx.y (always 0 unless the group is
  // wider than kMaxAttentionGroup: MLA).
  const int group = p.num_q_heads / p.num_kv_heads;
  const HeadRange heads = ChunkHeads(group, static_cast<int>(blockIdx.y), kMaxAttentionGroup);
  job.heads = heads.size();
  job.first_row =
      job.token * p.num_q_heads + static_cast<int64_t>(job.kv_head) * group + heads.begin;
  job.seq = FindSequence(p.query_start, p.num_seqs, job.token);
  if (job.seq < 0) return job;
  const int64_t first_query = p.query_start[job.seq];
  const int64_t q_len = p.query_start[job.seq + 1] - first_query;
  const int64_t key_capacity = static_cast<int64_t>(p.max_blocks_per_seq) * p.block_size;
  const KeyRange visible = VisibleKeys(p.context_lens[job.seq], q_len, job.token - first_query,
                                       p.sliding_window, key_capacity);
  job.keys = SplitKeys(visible, job.split, num_splits);
  return job;
}

// q points at the CTA's first query head; its heads are consecutive.
template <int kHeadDimCap>
__device__ __forceinline__ void LoadQueries(const float* q, int heads, int head_dim,
                                            AttentionShared<kHeadDimCap>& sh) {
  for (int e = threadIdx.x; e < kMaxAttentionGroup * kHeadDimCap; e += kThreads) {
    const int g = e / kHeadDimCap;
    const int d = e % kHeadDimCap;
    sh.q[g][d] = (g < heads && d < head_dim) ? q[g * head_dim + d] : 0.f;
  }
  if (threadIdx.x < kMaxAttentionGroup) {
    sh.max[threadIdx.x] = -INFINITY;
    sh.sum[threadIdx.x] = 0.f;
    sh.rescale[threadIdx.x] = 0.f;
  }
}

// key_rows[j] = where key tile_begin + j of this KV head starts in the cache.
__device__ __forceinline__ void TileKeyRows(const PagedAttentionParams& p, const AttentionJob& job,
                                            int64_t tile_begin, int count, int64_t* key_rows) {
  if (threadIdx.x >= count) return;
  const int64_t key = tile_begin + threadIdx.x;
  const int32_t* block_table = p.block_tables + static_cast<int64_t>(job.seq) * p.max_blocks_per_seq;
  const int64_t block = block_table[key / p.block_size];
  const int64_t slot = block * p.block_size + key % p.block_size;
  key_rows[threadIdx.x] = (slot * p.num_kv_heads + job.kv_head) * p.head_dim;
}

// probs[g][j] = scale * q[g] . k[j]: warp w scores keys w, w + kWarps, ...
template <int kHeadDimCap, typename CacheT>
__device__ __forceinline__ void ScoreTile(const PagedAttentionParams& p, int heads, int count,
                                          AttentionShared<kHeadDimCap>& sh) {
  constexpr int kLaneDims = LaneDims(kHeadDimCap);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const CacheT* k_cache = static_cast<const CacheT*>(p.k_cache);
  for (int j = warp; j < count; j += kWarps) {
    const CacheT* k_row = k_cache + sh.key_rows[j];
    float k[kLaneDims];
#pragma unroll
    for (int i = 0; i < kLaneDims; ++i) {
      const int d = lane + 32 * i;
      k[i] = d < p.head_dim ? LoadCache(k_row + d) : 0.f;
    }
#pragma unroll
    for (int g = 0; g < kMaxAttentionGroup; ++g) {
      if (g >= heads) break;  // the same for the whole warp: WarpSum stays converged
      float dot = 0.f;
#pragma unroll
      for (int i = 0; i < kLaneDims; ++i) dot += sh.q[g][lane + 32 * i] * k[i];
      dot = WarpSum(dot);
      if (lane == 0) sh.probs[g][j] = dot * p.scale;
    }
  }
}

// Online softmax over one tile, one warp per query head (lane j: key j):
// the new max, probs = exp(score - new max), and the factor that rescales the
// sum and acc accumulated under the old max.
template <int kHeadDimCap>
__device__ __forceinline__ void UpdateSoftmax(int heads, int count, AttentionShared<kHeadDimCap>& sh) {
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  for (int g = warp; g < heads; g += kWarps) {
    const float score = lane < count ? sh.probs[g][lane] : -INFINITY;
    const float old_max = sh.max[g];
    const float new_max = fmaxf(old_max, WarpMax(score));
    const float prob = lane < count ? expf(score - new_max) : 0.f;
    const float tile_sum = WarpSum(prob);
    sh.probs[g][lane] = prob;
    __syncwarp();  // every lane has read max[g] before lane 0 replaces it
    if (lane == 0) {
      const float rescale = MergeWeight(old_max, new_max);
      sh.rescale[g] = rescale;
      sh.sum[g] = sh.sum[g] * rescale + tile_sum;
      sh.max[g] = new_max;
    }
  }
}

// acc[g][i] (column threadIdx.x + kThreads * i) = acc * rescale[g] + sum_j probs[g][j] * v[j].
// A value row is the first v_head_dim columns of a row laid out like a key's.
template <int kHeadDimCap, int kValueDimCap, typename CacheT>
__device__ __forceinline__ void AddValues(const PagedAttentionParams& p, int heads, int count,
                                          const AttentionShared<kHeadDimCap>& sh,
                                          float (&acc)[kMaxAttentionGroup][ThreadDims(kValueDimCap)]) {
  constexpr int kThreadDims = ThreadDims(kValueDimCap);
#pragma unroll
  for (int g = 0; g < kMaxAttentionGroup; ++g) {
    if (g >= heads) break;
#pragma unroll
    for (int i = 0; i < kThreadDims; ++i) acc[g][i] *= sh.rescale[g];
  }
  const CacheT* v_cache = static_cast<const CacheT*>(p.v_cache);
  const int v_dim = p.v_head_dim;  // resolved by the launch
  for (int j = 0; j < count; ++j) {
    const CacheT* v_row = v_cache + sh.key_rows[j];
#pragma unroll
    for (int i = 0; i < kThreadDims; ++i) {
      const int d = threadIdx.x + kThreads * i;
      if (d >= v_dim) break;  // d only grows with i
      const float v = LoadCache(v_row + d);
#pragma unroll
      for (int g = 0; g < kMaxAttentionGroup; ++g) {
        if (g >= heads) break;
        acc[g][i] += sh.probs[g][j] * v;
      }
    }
  }
}

// One split: out = acc / sum. Several: the un-normalized state, for CombineSplitsKernel.
template <int kHeadDimCap, int kValueDimCap>
__device__ __forceinline__ void WriteResult(
    const PagedAttentionParams& p, const AttentionWorkspaceLayout& layout, const AttentionJob& job,
    const AttentionShared<kHeadDimCap>& sh,
    const float (&acc)[kMaxAttentionGroup][ThreadDims(kValueDimCap)]) {
  constexpr int kThreadDims = ThreadDims(kValueDimCap);
  const int hd = p.v_head_dim;  // resolved by the launch
  float* workspace = static_cast<float*>(p.workspace);
#pragma unroll
  for (int g = 0; g < kMaxAttentionGroup; ++g) {
    if (g >= job.heads) break;
    const int64_t row = job.first_row + g;  // token * num_q_heads + q head
    const int64_t partial = row * layout.num_splits + job.split;
#pragma unroll
    for (int i = 0; i < kThreadDims; ++i) {
      const int d = threadIdx.x + kThreads * i;
      if (d >= hd) break;
      if (layout.num_splits == 1) {
        p.out[row * hd + d] = FinalizeSoftmax(acc[g][i], sh.sum[g]);
      } else {
        workspace[layout.out_offset + partial * hd + d] = acc[g][i];
      }
    }
  }
  if (layout.num_splits > 1 && threadIdx.x < job.heads) {
    const int64_t partial = (job.first_row + threadIdx.x) * layout.num_splits + job.split;
    workspace[layout.max_offset + partial] = sh.max[threadIdx.x];
    workspace[layout.sum_offset + partial] = sh.sum[threadIdx.x];
  }
}

template <int kHeadDimCap, int kValueDimCap, typename CacheT>
__global__ void __launch_bounds__(kThreads)
    PagedAttentionKernel(PagedAttentionParams p, AttentionWorkspaceLayout layout) {
  __shared__ AttentionShared<kHeadDimCap> sh;
  const AttentionJob job = FindJob(p, layout.num_splits);
  const int heads = job.heads;
  LoadQueries(p.q + job.first_row * p.head_dim, heads, p.head_dim, sh);
  float acc[kMaxAttentionGroup][ThreadDims(kValueDimCap)] = {};
  __syncthreads();
  // job.keys is the same in every thread, so all take the same trips (and barriers).
  for (int64_t tile = job.keys.begin; tile < job.keys.end; tile += kKeyTile) {
    const int count = static_cast<int>(job.keys.end - tile < kKeyTile ? job.keys.end - tile : kKeyTile);
    TileKeyRows(p, job, tile, count, sh.key_rows);
    __syncthreads();
    ScoreTile<kHeadDimCap, CacheT>(p, heads, count, sh);
    __syncthreads();
    UpdateSoftmax(heads, count, sh);
    __syncthreads();
    AddValues<kHeadDimCap, kValueDimCap, CacheT>(p, heads, count, sh, acc);
    __syncthreads();  // the next tile overwrites key_rows and probs
  }
  WriteResult<kHeadDimCap, kValueDimCap>(p, layout, job, sh, acc);
}

// One CTA per (token, q head) row: merges the row's splits in split order.
__global__ void CombineSplitsKernel(PagedAttentionParams p, AttentionWorkspaceLayout layout) {
  const int64_t row = blockIdx.x;
  const int64_t first_partial = row * layout.num_splits;
  const float* workspace = static_cast<const float*>(p.workspace);
  const int v_dim = p.v_head_dim;  // resolved by the launch
  for (int d = threadIdx.x; d < v_dim; d += blockDim.x) {
    SoftmaxState total;
    float acc = 0.f;
    for (int s = 0; s < layout.num_splits; ++s) {
      const int64_t partial = first_partial + s;
      SoftmaxState split;
      split.m = workspace[layout.max_offset + partial];
      split.l = workspace[layout.sum_offset + partial];
      const float split_acc = workspace[layout.out_offset + partial * v_dim + d];
      MergeSoftmaxState(total, &acc, split, &split_acc, 1);
    }
    p.out[row * v_dim + d] = FinalizeSoftmax(acc, total.l);
  }
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

absl::Status ValidatePointers(const PagedAttentionParams& p, const AttentionWorkspaceLayout& layout) {
  if (!p.q || !p.out || !p.k_cache || !p.v_cache) {
    return absl::InvalidArgumentError("PagedAttention: q, out, k_cache and v_cache must be non-null");
  }
  if (!p.query_start || !p.context_lens || !p.block_tables) {
    return absl::InvalidArgumentError(
        "PagedAttention: query_start, context_lens and block_tables must be non-null");
  }
  if (layout.num_splits > 1 && p.workspace == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        "PagedAttention: workspace is null but ", layout.num_splits,
        " splits need PagedAttentionWorkspaceBytes() = ", layout.bytes, " bytes"));
  }
  return absl::OkStatus();
}

// The bound on context lengths that fixes the split count.
int64_t ContextBound(const PagedAttentionParams& p) {
  return p.max_context_len > 0 ? p.max_context_len
                               : static_cast<int64_t>(p.max_blocks_per_seq) * p.block_size;
}

template <typename CacheT>
absl::Status LaunchAttentionKernels(const PagedAttentionParams& p,
                                    const AttentionWorkspaceLayout& layout, dim3 attention_grid,
                                    unsigned combine_ctas, cudaStream_t stream) {
  // Values as wide as keys, but for the MLA instance: its value columns stop at
  // kMaxAttentionValueDim (512 of 576), which saves a column per thread.
  switch (HeadDimCap(p.head_dim)) {
    case 32:
      PagedAttentionKernel<32, 32, CacheT><<<attention_grid, kThreads, 0, stream>>>(p, layout);
      break;
    case 64:
      PagedAttentionKernel<64, 64, CacheT><<<attention_grid, kThreads, 0, stream>>>(p, layout);
      break;
    case 128:
      PagedAttentionKernel<128, 128, CacheT><<<attention_grid, kThreads, 0, stream>>>(p, layout);
      break;
    case 256:
      PagedAttentionKernel<256, 256, CacheT><<<attention_grid, kThreads, 0, stream>>>(p, layout);
      break;
    default:
      PagedAttentionKernel<kMaxAttentionHeadDim, kMaxAttentionValueDim, CacheT>
          <<<attention_grid, kThreads, 0, stream>>>(p, layout);
      break;
  }
  JOULE_CUDA_RETURN_IF_LAUNCH_FAILED("PagedAttentionKernel");
  if (layout.num_splits == 1) return absl::OkStatus();
  CombineSplitsKernel<<<combine_ctas, kCombineThreads, 0, stream>>>(p, layout);
  JOULE_CUDA_RETURN_IF_LAUNCH_FAILED("CombineSplitsKernel");
  return absl::OkStatus();
}

}  // namespace

absl::Status LaunchKvCacheWrite(const KvCacheWriteParams& p, cudaStream_t stream) {
  if (p.tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat("KvCacheWrite: tokens must be >= 0, got ", p.tokens));
  }
  if (p.num_kv_heads <= 0 || p.head_dim <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("KvCacheWrite: num_kv_heads and head_dim must be positive, got ",
                                                   p.num_kv_heads, " and ", p.head_dim));
  }
  if (absl::Status s = ValidateCacheType("KvCacheWrite", p.cache_type); !s.ok()) return s;
  if (p.tokens == 0) return absl::OkStatus();
  if (!p.k || !p.slots || !p.k_cache) {
    return absl::InvalidArgumentError("KvCacheWrite: k, slots and k_cache must be non-null");
  }
  if (p.v != nullptr && p.v_cache == nullptr) {  // a null v writes keys only (MLA)
    return absl::InvalidArgumentError("KvCacheWrite: v is set but v_cache is null");
  }
  if (p.tokens > kMaxGridX) {
    return absl::InvalidArgumentError(absl::StrCat("KvCacheWrite: tokens must be at most ", kMaxGridX,
                                                   ", got ", p.tokens));
  }
  const unsigned blocks = static_cast<unsigned>(p.tokens);
  if (p.cache_type == DType::kBF16) {
    KvCacheWriteKernel<uint16_t><<<blocks, kCacheWriteThreads, 0, stream>>>(p);
  } else {
    KvCacheWriteKernel<float><<<blocks, kCacheWriteThreads, 0, stream>>>(p);
  }
  JOULE_CUDA_RETURN_IF_LAUNCH_FAILED("KvCacheWriteKernel");
  return absl::OkStatus();
}

size_t PagedAttentionWorkspaceBytes(int64_t num_tokens, int num_q_heads, int head_dim,
                                    int64_t max_context_len, int v_head_dim) {
  const int v_dim = v_head_dim > 0 ? v_head_dim : head_dim;
  return MakeAttentionWorkspaceLayout(num_tokens, num_q_heads, v_dim, max_context_len).bytes;
}

size_t PagedAttentionWorkspaceBytes(const PagedAttentionParams& p) {
  return PagedAttentionWorkspaceBytes(p.num_tokens, p.num_q_heads, p.head_dim, ContextBound(p),
                                      p.v_head_dim);
}

absl::Status LaunchPagedAttention(const PagedAttentionParams& p, cudaStream_t stream) {
  if (absl::Status s = ValidatePagedAttention(p); !s.ok()) return s;
  if (p.num_tokens == 0) return absl::OkStatus();
  const AttentionWorkspaceLayout layout =
      MakeAttentionWorkspaceLayout(p.num_tokens, p.num_q_heads, ValueDim(p), ContextBound(p));
  if (absl::Status s = ValidatePointers(p, layout); !s.ok()) return s;
  // Checked in this order so no product overflows: splits > 1 only when
  // num_tokens * num_q_heads < kSplitTargetHeadRows.
  if (p.num_tokens > kMaxGridX || p.num_tokens * p.num_q_heads > kMaxGridX) {
    return absl::InvalidArgumentError(absl::StrCat("PagedAttention: num_tokens * num_q_heads must be at most ",
                                                   kMaxGridX, ", got ", p.num_tokens, " * ", p.num_q_heads));
  }
  // Chunks of query heads go on the grid's y.
  const int chunks = HeadChunks(p.num_q_heads / p.num_kv_heads, kMaxAttentionGroup);
  if (chunks > kMaxGridY) {
    return absl::InvalidArgumentError(absl::StrCat(
        "PagedAttention: num_q_heads / num_kv_heads must be at most ",
        int64_t{kMaxGridY} * kMaxAttentionGroup, ", got ", p.num_q_heads, " / ", p.num_kv_heads));
  }
  const int64_t attention_ctas = p.num_tokens * p.num_kv_heads * layout.num_splits;
  const dim3 attention_grid(static_cast<unsigned>(attention_ctas), static_cast<unsigned>(chunks));
  const int64_t combine_ctas = p.num_tokens * p.num_q_heads;
  // The kernels' copy carries the value width resolved: a select on the device
  // costs the GQA instances registers, then spills.
  PagedAttentionParams resolved = p;
  resolved.v_head_dim = ValueDim(p);
  if (p.cache_type == DType::kBF16) {
    return LaunchAttentionKernels<uint16_t>(resolved, layout, attention_grid,
                                            static_cast<unsigned>(combine_ctas), stream);
  }
  return LaunchAttentionKernels<float>(resolved, layout, attention_grid,
                                       static_cast<unsigned>(combine_ctas), stream);
}

}  // namespace joule::kernels::cuda
