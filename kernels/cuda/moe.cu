// Router top-k, dispatch layout, expert load, permute, un-permute and the
// row gather and reduce.
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch_util.cuh"
#include "kernels/cuda/moe.h"

namespace joule::kernels::cuda {
namespace {

constexpr int kRouterWarpsPerBlock = 4;

// Padding of a captured batch (t at or past *valid_tokens) gets no expert and
// no weight, so the layout leaves its slots out and the un-permute adds
// nothing for it. Returns whether t is padding; the whole warp agrees.
__device__ bool PadTokenPastValid(const RouterTopKParams& p, int64_t t, int32_t* ids,
                                  float* weights) {
  if (p.valid_tokens == nullptr || t < *p.valid_tokens) return false;
  for (int j = threadIdx.x % 32; j < p.top_k; j += 32) {
    ids[j] = -1;
    weights[j] = 0.f;
  }
  return true;
}

// One warp per token; the token's probabilities live in shared memory.
__global__ void RouterTopKKernel(RouterTopKParams p) {
  extern __shared__ float shared_probs[];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouterWarpsPerBlock + warp;
  if (t >= p.tokens) return;  // whole warps leave together
  float* probs = shared_probs + warp * p.num_experts;
  const float* logits = p.logits + t * p.num_experts;
  int32_t* ids = p.expert_ids + t * p.top_k;
  float* weights = p.weights + t * p.top_k;
  if (PadTokenPastValid(p, t, ids, weights)) return;  // t is the warp's: whole warps leave

  float max_logit = -INFINITY;
  for (int e = lane; e < p.num_experts; e += 32) {
    probs[e] = logits[e];
    max_logit = fmaxf(max_logit, probs[e]);
  }
  max_logit = WarpMax(max_logit);
  float sum = 0.f;
  for (int e = lane; e < p.num_experts; e += 32) {
    probs[e] = expf(probs[e] - max_logit);
    sum += probs[e];
  }
  sum = WarpSum(sum);
  const float inv = 1.f / sum;  // multiply by the inverse, as the CPU kernel does
  for (int e = lane; e < p.num_experts; e += 32) probs[e] *= inv;
  __syncwarp();

  float picked_sum = 0.f;  // lane 0's
  for (int j = 0; j < p.top_k; ++j) {
    // Arg-max, ties to the lower expert id; picked experts hold -1 (probs are >= 0).
    // Why the rank: a NaN, +inf or all -inf row makes every prob NaN, and a bare
    // "probs[e] > best" then never holds, leaving best_id == num_experts (out of
    // range for ids and for this warp's probs). Ranking NaN as -0.5 (below any
    // prob, above a picked expert) makes every rank a number, so the first
    // unpicked expert always wins and a NaN row yields experts 0..top_k-1 with
    // NaN weights, as the CPU's InsertTopK does (kernels/cpu/moe.cc).
    float best = -INFINITY;  // below every rank, so a lane's first expert wins
    int best_id = p.num_experts;
    for (int e = lane; e < p.num_experts; e += 32) {
      const float rank = isnan(probs[e]) ? -0.5f : probs[e];
      if (rank > best) {  // e rises within a lane, so ">" keeps the lower id
        best = rank;
        best_id = e;
      }
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float other = __shfl_xor_sync(0xffffffffu, best, offset);
      const int other_id = __shfl_xor_sync(0xffffffffu, best_id, offset);
      if (other > best || (other == best && other_id < best_id)) {
        best = other;
        best_id = other_id;
      }
    }
    // Ranks are never NaN, so every lane agrees on best_id, which is below
    // num_experts since top_k <= num_experts leaves an unpicked expert.
    if (lane == 0) {
      const float picked = probs[best_id];  // the prob itself (NaN stays NaN), not its rank
      ids[j] = best_id;
      weights[j] = picked;
      probs[best_id] = -1.f;
      picked_sum += picked;
    }
    __syncwarp();
  }
  if (p.renormalize && lane == 0) {
    for (int j = 0; j < p.top_k; ++j) weights[j] /= picked_sum;
  }
}

// ---------------------------------------------------------------------------
// noaux_tc routing (DeepSeek-V3): the CPU kernel's arithmetic, one warp per token
// ---------------------------------------------------------------------------

// The CPU's formula and rounding order (IEEE division; expf within 2 ulp of
// the host's, so a near-tie of two experts may order differently).
__device__ __forceinline__ float Sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// Arg-max of values[0, n) (n > 0) over the warp, ties to the lower index,
// broadcast from lane 0. Some index < n always wins, even among NaNs, so bad
// logits cannot send an expert id out of range.
__device__ int WarpArgMax(const float* values, int n) {
  const int lane = threadIdx.x % 32;
  float best = -INFINITY;
  int best_id = n;  // none yet
  for (int i = lane; i < n; i += 32) {  // i rises within a lane: ">" keeps the lower index
    if (best_id == n || values[i] > best) {
      best = values[i];
      best_id = i;
    }
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, best, offset);
    const int other_id = __shfl_xor_sync(0xffffffffu, best_id, offset);
    if (other_id < n &&
        (best_id == n || other > best || (other == best && other_id < best_id))) {
      best = other;
      best_id = other_id;
    }
  }
  return __shfl_sync(0xffffffffu, best_id, 0);
}

// The sum of the two largest of c[0, n) (n >= 2), scanned as the CPU does.
__device__ float TopTwoSum(const float* c, int n) {
  float top1 = c[0], top2 = c[1];
  if (top2 > top1) {
    const float swap = top1;
    top1 = top2;
    top2 = swap;
  }
  for (int i = 2; i < n; ++i) {
    if (c[i] > top1) {
      top2 = top1;
      top1 = c[i];
    } else if (c[i] > top2) {
      top2 = c[i];
    }
  }
  return top1 + top2;
}

// Shared floats one warp uses: biased scores [num_experts], then group
// scores and kept-group flags (1 or 0) [num_groups] each.
__host__ __device__ int64_t NoauxTcSharedFloats(const RouterTopKParams& p) {
  return p.num_experts + 2 * static_cast<int64_t>(p.num_groups);
}

// Keeps the topk_groups groups whose two best biased scores sum highest
// (ties: lower group) and knocks every expert of the other groups out of
// `choice` (-inf), as DeepSeek's and vLLM's mask does.
__device__ void KeepBestGroups(const RouterTopKParams& p, float* choice, float* group_score,
                               float* kept) {
  const int lane = threadIdx.x % 32;
  const int per_group = p.num_experts / p.num_groups;
  for (int g = lane; g < p.num_groups; g += 32) {
    group_score[g] = TopTwoSum(choice + g * per_group, per_group);
    kept[g] = 0.f;
  }
  __syncwarp();
  for (int r = 0; r < p.topk_groups; ++r) {
    const int g = WarpArgMax(group_score, p.num_groups);
    if (lane == 0) {
      kept[g] = 1.f;
      group_score[g] = -INFINITY;
    }
    __syncwarp();
  }
  for (int e = lane; e < p.num_experts; e += 32) {
    if (kept[e / per_group] == 0.f) choice[e] = -INFINITY;
  }
  __syncwarp();
}

__global__ void NoauxTcKernel(RouterTopKParams p) {
  extern __shared__ float shared[];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouterWarpsPerBlock + warp;
  if (t >= p.tokens) return;  // whole warps leave together
  const float* logits = p.logits + t * p.num_experts;
  int32_t* ids = p.expert_ids + t * p.top_k;
  float* weights = p.weights + t * p.top_k;
  if (PadTokenPastValid(p, t, ids, weights)) return;

  float* choice = shared + warp * NoauxTcSharedFloats(p);
  float* group_score = choice + p.num_experts;
  float* kept = group_score + p.num_groups;
  // The bias steers the choice only; the weights are the unbiased scores.
  for (int e = lane; e < p.num_experts; e += 32) {
    choice[e] = Sigmoid(logits[e]) + p.selection_bias[e];
  }
  __syncwarp();
  KeepBestGroups(p, choice, group_score, kept);

  // Top-k by biased score (ties: lower id), ordered by it; lane 0 writes.
  float total = 0.f;
  for (int j = 0; j < p.top_k; ++j) {
    const int e = WarpArgMax(choice, p.num_experts);
    if (lane == 0) {
      ids[j] = e;
      weights[j] = Sigmoid(logits[e]);
      total += weights[j];
      choice[e] = -INFINITY;
    }
    __syncwarp();
  }
  if (lane == 0) {
    const float denominator = total + 1e-20f;
    for (int j = 0; j < p.top_k; ++j) {
      weights[j] = (p.renormalize ? weights[j] / denominator : weights[j]) * p.scaling;
    }
  }
}

// Layout, step 1: expert_offsets[e + 1] = number of slots routed to e (one warp per expert).
__global__ void CountSlotsKernel(MoeLayoutParams p, int64_t slots) {
  const int e = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (e >= p.num_experts) return;
  int64_t count = 0;
  for (int64_t base = 0; base < slots; base += 32) {
    const int64_t s = base + lane;
    const bool mine = s < slots && p.expert_ids[s] == e;
    count += __popc(__ballot_sync(0xffffffffu, mine));
  }
  if (lane == 0) p.expert_offsets[e + 1] = count;
}

// Layout, step 2: counts -> offsets. Expert counts are few; one thread is enough.
__global__ void ScanOffsetsKernel(MoeLayoutParams p) {
  p.expert_offsets[0] = 0;
  for (int e = 0; e < p.num_experts; ++e) p.expert_offsets[e + 1] += p.expert_offsets[e];
}

// Layout, step 3: each expert's warp walks the slots in order and places its
// own, which keeps the grouping stable in slot order.
__global__ void PlaceSlotsKernel(MoeLayoutParams p, int64_t slots) {
  const int e = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (e >= p.num_experts) return;
  int64_t next = p.expert_offsets[e];
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int64_t base = 0; base < slots; base += 32) {
    const int64_t s = base + lane;
    const bool mine = s < slots && p.expert_ids[s] == e;
    const unsigned mask = __ballot_sync(0xffffffffu, mine);
    if (mine) {
      const int64_t row = next + __popc(mask & lanes_below);
      p.permuted_to_slot[row] = static_cast<int32_t>(s);
      p.slot_to_permuted[s] = static_cast<int32_t>(row);
      if (p.permuted_to_token != nullptr) {
        p.permuted_to_token[row] = static_cast<int32_t>(s / p.top_k);
      }
    }
    next += __popc(mask);
  }
}

__global__ void ExpertLoadKernel(ExpertLoadParams p) {
  for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < p.num_experts;
       e += gridDim.x * blockDim.x) {
    p.load[e] += p.expert_offsets[e + 1] - p.expert_offsets[e];
  }
}

__global__ void PermuteKernel(PermuteParams p) {
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const float* src = p.x + static_cast<int64_t>(p.permuted_to_slot[r] / p.top_k) * p.hidden;
    float* dst = p.out + r * p.hidden;
    for (int64_t c = threadIdx.x; c < p.hidden; c += blockDim.x) dst[c] = src[c];
  }
}

__global__ void UnpermuteKernel(UnpermuteParams p) {
  for (int64_t t = blockIdx.x; t < p.tokens; t += gridDim.x) {
    const int32_t* rows = p.slot_to_permuted + t * p.top_k;
    const float* w = p.weights + t * p.top_k;
    float* dst = p.out + t * p.hidden;
    for (int64_t c = threadIdx.x; c < p.hidden; c += blockDim.x) {
      // Same order and rounding as the CPU kernel: start from out (or 0), add
      // choices in order, multiply and add rounded apart (no FMA contraction).
      float acc = p.accumulate ? dst[c] : 0.f;
      for (int j = 0; j < p.top_k; ++j) {
        if (rows[j] < 0) continue;
        const int64_t i = static_cast<int64_t>(rows[j]) * p.hidden + c;
        // BF16 expert outputs are widened exactly (the top 16 bits of an F32).
        const float v = p.expert_out_bf16 != nullptr
                            ? __uint_as_float(static_cast<uint32_t>(p.expert_out_bf16[i]) << 16)
                            : p.expert_out[i];
        acc = __fadd_rn(acc, __fmul_rn(w[j], v));
      }
      dst[c] = acc;
    }
  }
}

// Same rounding as the CPU's RoundToBf16 (kernels/cpu/moe.cc), bit for bit:
// nearest even, and a NaN stays a (quiet) NaN instead of rounding to infinity.
__device__ __forceinline__ uint16_t F32BitsToBf16(uint32_t bits) {
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// Rows move as raw bits (uint32_t: F32, uint16_t: BF16), so a row of the
// same type is copied exactly, NaN payloads included.
template <typename In, typename Out>
__device__ __forceinline__ Out ConvertBits(In v) {
  if constexpr (sizeof(In) == sizeof(Out)) {
    return v;
  } else if constexpr (sizeof(Out) == sizeof(uint16_t)) {
    return F32BitsToBf16(v);
  } else {
    return static_cast<uint32_t>(v) << 16;  // BF16 -> F32 is exact
  }
}

// Row r of a row-moving launch's input or output (GatherRowsParams,
// ReduceRowsParams): base + r * stride_bytes, or out_rows[r] when given.
template <typename In>
__device__ __forceinline__ const In* InRow(const void* in, int64_t stride_bytes, int64_t r) {
  return reinterpret_cast<const In*>(static_cast<const char*>(in) + r * stride_bytes);
}
template <typename Out>
__device__ __forceinline__ Out* OutRow(std::byte* const* out_rows, void* out,
                                       int64_t stride_bytes, int64_t r) {
  return reinterpret_cast<Out*>(out_rows != nullptr ? reinterpret_cast<char*>(out_rows[r])
                                                    : static_cast<char*>(out) + r * stride_bytes);
}

template <typename In, typename Out>
__global__ void GatherRowsKernel(GatherRowsParams p) {
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const int64_t src_row = p.index != nullptr ? p.index[r] / p.index_divisor : r;
    const In* in = InRow<In>(p.in, p.in_stride_bytes, src_row);
    Out* out = OutRow<Out>(p.out_rows, p.out, p.out_stride_bytes, r);
    for (int64_t c = threadIdx.x; c < p.hidden; c += blockDim.x) {
      out[c] = ConvertBits<In, Out>(in[c]);
    }
  }
}

// One block per output row, threads over hidden. Each element is summed from
// 0 (or from out) term by term in j order, as the CPU's rows are: an F32
// multiply, then an add, each rounded on its own (__fmul_rn / __fadd_rn keep
// nvcc from contracting them into an FMA, which the CPU does not do), so the
// sums have the CPU's bits. Rounded to out_type once, at the end.
template <typename In, typename Out>
__global__ void ReduceRowsKernel(ReduceRowsParams p) {
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    Out* out = OutRow<Out>(p.out_rows, p.out, p.out_stride_bytes, r);
    const int64_t begin = p.offsets[r];
    const int64_t end = p.offsets[r + 1];
    for (int64_t c = threadIdx.x; c < p.hidden; c += blockDim.x) {
      float acc = 0.f;
      if constexpr (sizeof(Out) == sizeof(uint32_t)) {
        if (p.accumulate) acc = __uint_as_float(out[c]);
      }
      for (int64_t j = begin; j < end; ++j) {
        const float w = p.weights != nullptr ? p.weights[j] : 1.f;
        const In v = InRow<In>(p.in, p.in_stride_bytes, p.index[j])[c];
        acc = __fadd_rn(acc, __fmul_rn(w, __uint_as_float(ConvertBits<In, uint32_t>(v))));
      }
      out[c] = ConvertBits<uint32_t, Out>(__float_as_uint(acc));
    }
  }
}

// noaux_tc's group limits, naming the field (num_experts and top_k are checked already).
absl::Status ValidateNoauxTcGroups(const RouterTopKParams& p) {
  if (p.num_groups <= 0 || p.num_experts % p.num_groups != 0 ||
      p.num_experts / p.num_groups < 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "RouterTopK: num_groups must divide num_experts (", p.num_experts,
        ") into groups of at least 2 experts, got ", p.num_groups));
  }
  if (p.topk_groups <= 0 || p.topk_groups > p.num_groups) {
    return absl::InvalidArgumentError(absl::StrCat("RouterTopK: topk_groups must be in [1, ",
                                                   p.num_groups, "], got ", p.topk_groups));
  }
  const int candidates = p.topk_groups * (p.num_experts / p.num_groups);
  if (p.top_k > candidates) {
    return absl::InvalidArgumentError(absl::StrCat(
        "RouterTopK: top_k must be at most the kept groups' experts (topk_groups * experts per "
        "group = ", candidates, "), got ", p.top_k));
  }
  return absl::OkStatus();
}

unsigned RowBlocks(int64_t rows) { return static_cast<unsigned>(rows < 65535 ? rows : 65535); }

int64_t AddressLowBits(const void* ptr) {
  return static_cast<int64_t>(reinterpret_cast<uintptr_t>(ptr) % 16);
}

// The buffers of a row-moving launch (GatherRowsParams, ReduceRowsParams:
// the same field names), for `launch`'s messages: F32 or BF16 rows, in and
// out (or out_rows) set, and strides and pointers that are multiples of the
// element size, since misaligned element accesses fault on the GPU. With
// out_rows, out and out_stride_bytes are unused.
template <typename Params>
absl::Status ValidateRowBuffers(const char* launch, const Params& p) {
  const std::pair<const char*, RowType> types[] = {{"in_type", p.in_type},
                                                   {"out_type", p.out_type}};
  for (const auto& [field, type] : types) {
    if (type != RowType::kF32 && type != RowType::kBF16) {
      return absl::InvalidArgumentError(absl::StrCat(launch, ": ", field,
                                                     " must be f32 or bf16, got ",
                                                     DTypeName(type)));
    }
  }
  if (!p.in) return absl::InvalidArgumentError(absl::StrCat(launch, ": in is null"));
  if (!p.out && !p.out_rows) {
    return absl::InvalidArgumentError(absl::StrCat(launch, ": out and out_rows are both null"));
  }
  struct Check {
    const char* field;
    int64_t value;
    RowType type;
  };
  const bool out_used = p.out_rows == nullptr;
  const Check checks[] = {
      {"in_stride_bytes", p.in_stride_bytes, p.in_type},
      {"in (address)", AddressLowBits(p.in), p.in_type},
      {"out_stride_bytes", out_used ? p.out_stride_bytes : 0, p.out_type},
      {"out (address)", out_used ? AddressLowBits(p.out) : 0, p.out_type},
  };
  for (const Check& c : checks) {
    const int64_t bytes = static_cast<int64_t>(ElementBytes(c.type));
    if (c.value % bytes != 0) {
      return absl::InvalidArgumentError(absl::StrCat(launch, ": ", c.field,
                                                     " must be a multiple of ", bytes, " for ",
                                                     DTypeName(c.type), " rows, got ", c.value));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateGatherRows(const GatherRowsParams& p) {
  if (p.rows < 0 || p.hidden < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "GatherRows: rows and hidden must be >= 0, got rows=", p.rows, " hidden=", p.hidden));
  }
  if (p.index != nullptr && p.index_divisor <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("GatherRows: index_divisor must be positive, got ", p.index_divisor));
  }
  if (p.rows == 0 || p.hidden == 0) return absl::OkStatus();
  return ValidateRowBuffers("GatherRows", p);
}

absl::Status ValidateReduceRows(const ReduceRowsParams& p) {
  if (p.rows < 0 || p.hidden < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ReduceRows: rows and hidden must be >= 0, got rows=", p.rows, " hidden=", p.hidden));
  }
  if (p.rows == 0 || p.hidden == 0) return absl::OkStatus();
  if (p.accumulate && p.out_type != RowType::kF32) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ReduceRows: accumulate needs F32 out, got out_type ", DTypeName(p.out_type)));
  }
  if (!p.offsets) return absl::InvalidArgumentError("ReduceRows: offsets is null");
  if (!p.index) return absl::InvalidArgumentError("ReduceRows: index is null");
  return ValidateRowBuffers("ReduceRows", p);
}

// Calls launch(In{}, Out{}) with the rows' raw element types (uint32_t: F32,
// uint16_t: BF16), for launches templated on them.
template <typename Launch>
void WithRowTypes(RowType in_type, RowType out_type, Launch launch) {
  auto with_in = [&](auto in) {
    if (out_type == RowType::kBF16) {
      launch(in, uint16_t{});
    } else {
      launch(in, uint32_t{});
    }
  };
  if (in_type == RowType::kBF16) {
    with_in(uint16_t{});
  } else {
    with_in(uint32_t{});
  }
}

}  // namespace

absl::Status LaunchRouterTopK(const RouterTopKParams& p, cudaStream_t stream) {
  if (p.method != RouterMethod::kSoftmaxTopK && p.method != RouterMethod::kNoauxTc) {
    return absl::InvalidArgumentError(
        absl::StrCat("RouterTopK: unknown method ", static_cast<int>(p.method)));
  }
  if (p.tokens < 0) return absl::InvalidArgumentError("RouterTopK: negative tokens");
  if (p.num_experts <= 0 || p.num_experts > kMaxRouterExperts) {
    return absl::InvalidArgumentError(absl::StrCat("RouterTopK: num_experts must be in [1, ",
                                                   kMaxRouterExperts, "], got ", p.num_experts));
  }
  if (p.top_k <= 0 || p.top_k > p.num_experts) {
    return absl::InvalidArgumentError(absl::StrCat("RouterTopK: top_k must be in [1, ",
                                                   p.num_experts, "], got ", p.top_k));
  }
  const bool noaux_tc = p.method == RouterMethod::kNoauxTc;
  if (noaux_tc) {
    if (absl::Status s = ValidateNoauxTcGroups(p); !s.ok()) return s;
  }
  if (p.tokens == 0) return absl::OkStatus();
  if (!p.logits || !p.expert_ids || !p.weights) {
    return absl::InvalidArgumentError("RouterTopK: null pointer");
  }
  if (noaux_tc && !p.selection_bias) {
    return absl::InvalidArgumentError("RouterTopK: noaux_tc needs selection_bias, got null");
  }
  const int64_t blocks = (p.tokens + kRouterWarpsPerBlock - 1) / kRouterWarpsPerBlock;
  if (blocks > kMaxGridX) return absl::InvalidArgumentError("RouterTopK: too many tokens");
  if (noaux_tc) {
    const size_t shared = sizeof(float) * kRouterWarpsPerBlock * NoauxTcSharedFloats(p);
    NoauxTcKernel<<<static_cast<unsigned>(blocks), 32 * kRouterWarpsPerBlock, shared, stream>>>(p);
    JOULE_CUDA_RETURN_IF_LAUNCH_FAILED("NoauxTcKernel");
    return absl::OkStatus();
  }
  const size_t shared = sizeof(float) * kRouterWarpsPerBlock * p.num_experts;
  RouterTopKKernel<<<static_cast<unsigned>(blocks), 32 * kRouterWarpsPerBlock, shared, stream>>>(p);
  JOULE_CUDA_RETURN_IF_LAUNCH_FAILED("RouterTopKKernel");
  return absl::OkStatus();
}

absl::Status ComputeMoeLayout(const MoeLayoutParams& p, cudaStream_t stream) {
  if (p.tokens < 0 || p.top_k < 0 || p.num_experts <= 0) {
    return absl::InvalidArgumentError("MoeLayout: bad shape");
  }
  const int64_t slots = p.tokens * p.top_k;
  if (slots > INT32_MAX) return absl::InvalidArgumentError("MoeLayout: too many slots");
  if (!p.expert_offsets || (slots > 0 && (!p.expert_ids || !p.permuted_to_slot ||
                                          !p.slot_to_permuted))) {
    return absl::InvalidArgumentError("MoeLayout: null pointer");
  }
  if (slots > 0) {
    JOULE_CUDA_RETURN_IF_ERROR(
        cudaMemsetAsync(p.slot_to_permuted, 0xff, sizeof(int32_t) * slots, stream));  // -1
  }
  constexpr int kWarps = 4;
  const unsigned blocks = (p.num_experts + kWarps - 1) / kWarps;
  CountSlotsKernel<<<blocks, 32 * kWarps, 0, stream>>>(p, slots);
  JOULE_CUDA_RETURN_IF_LAUNCH_FAILED("CountSlotsKernel");
  ScanOffsetsKernel<<<1, 1, 0, stream>>>(p);
  JOULE_CUDA_RETURN_IF_LAUNCH_FAILED("ScanOffsetsKernel");
  PlaceSlotsKernel<<<blocks, 32 * kWarps, 0, stream>>>(p, slots);
  JOULE_CUDA_RETURN_IF_LAUNCH_FAILED("PlaceSlotsKernel");
  return absl::OkStatus();
}

absl::Status AccumulateExpertLoad(const ExpertLoadParams& p, cudaStream_t stream) {
  if (p.num_experts < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("ExpertLoad: num_experts must be >= 0, got ", p.num_experts));
  }
  if (p.num_experts == 0) return absl::OkStatus();
  if (!p.expert_offsets) return absl::InvalidArgumentError("ExpertLoad: expert_offsets is null");
  if (!p.load) return absl::InvalidArgumentError("ExpertLoad: load is null");
  ExpertLoadKernel<<<GridStrideBlocks(p.num_experts, 128), 128, 0, stream>>>(p);
  JOULE_CUDA_RETURN_IF_LAUNCH_FAILED("ExpertLoadKernel");
  return absl::OkStatus();
}

absl::Status LaunchPermute(const PermuteParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.hidden < 0 || p.top_k <= 0) {
    return absl::InvalidArgumentError("Permute: bad shape");
  }
  if (p.rows == 0 || p.hidden == 0) return absl::OkStatus();
  if (!p.x || !p.permuted_to_slot || !p.out) return absl::InvalidArgumentError("Permute: null pointer");
  PermuteKernel<<<RowBlocks(p.rows), 128, 0, stream>>>(p);
  JOULE_CUDA_RETURN_IF_LAUNCH_FAILED("PermuteKernel");
  return absl::OkStatus();
}

absl::Status LaunchUnpermute(const UnpermuteParams& p, cudaStream_t stream) {
  if (p.tokens < 0 || p.hidden < 0 || p.top_k <= 0) {
    return absl::InvalidArgumentError("Unpermute: bad shape");
  }
  if (p.tokens == 0 || p.hidden == 0) return absl::OkStatus();
  if ((!p.expert_out && !p.expert_out_bf16) || !p.slot_to_permuted || !p.weights || !p.out) {
    return absl::InvalidArgumentError("Unpermute: null pointer");
  }
  UnpermuteKernel<<<RowBlocks(p.tokens), 128, 0, stream>>>(p);
  JOULE_CUDA_RETURN_IF_LAUNCH_FAILED("UnpermuteKernel");
  return absl::OkStatus();
}

absl::Status LaunchGatherRows(const GatherRowsParams& p, cudaStream_t stream) {
  if (absl::Status s = ValidateGatherRows(p); !s.ok()) return s;
  if (p.rows == 0 || p.hidden == 0) return absl::OkStatus();
  WithRowTypes(p.in_type, p.out_type, [&](auto in, auto out) {
    GatherRowsKernel<decltype(in), decltype(out)><<<RowBlocks(p.rows), 128, 0, stream>>>(p);
  });
  JOULE_CUDA_RETURN_IF_LAUNCH_FAILED("GatherRowsKernel");
  return absl::OkStatus();
}

absl::Status LaunchReduceRows(const ReduceRowsParams& p, cudaStream_t stream) {
  if (absl::Status s = ValidateReduceRows(p); !s.ok()) return s;
  if (p.rows == 0 || p.hidden == 0) return absl::OkStatus();
  WithRowTypes(p.in_type, p.out_type, [&](auto in, auto out) {
    ReduceRowsKernel<decltype(in), decltype(out)><<<RowBlocks(p.rows), 128, 0, stream>>>(p);
  });
  JOULE_CUDA_RETURN_IF_LAUNCH_FAILED("ReduceRowsKernel");
  return absl::OkStatus();
}

}  // namespace joule::kernels::cuda
