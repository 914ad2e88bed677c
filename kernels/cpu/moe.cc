#include "kernels/cpu/moe.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/cpu/convert_internal.h"
#include "kernels/cpu/cpu_isa.h"

namespace joule::kernels::cpu {
namespace {

struct ConvertFns {
  F32ToBf16RowFn to_bf16;
  Bf16ToF32RowFn to_f32;
  AxpyBf16RowFn axpy_bf16;
  AxpyF32RowFn axpy_f32;
};

ConvertFns ActiveConvertFns() {
  switch (ActiveIsa()) {
#if defined(JOULE_CPU_X86)
    case Isa::kAvx512:
      return {&F32ToBf16RowAvx512, &Bf16ToF32RowAvx512, &AxpyBf16RowAvx512, &AxpyF32RowAvx512};
    case Isa::kAvx2:
      return {&F32ToBf16RowAvx2, &Bf16ToF32RowAvx2, &AxpyBf16RowAvx2, &AxpyF32RowAvx2};
#endif
    default:
      return {&F32ToBf16RowScalar, &Bf16ToF32RowScalar, &AxpyBf16RowScalar, &AxpyF32RowScalar};
  }
}

// Same rounding as common/dtype.h's F32ToBf16 (kernels depend on nothing in the project).
uint16_t RoundToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

float WidenBf16(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

}  // namespace

void F32ToBf16RowScalar(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = RoundToBf16(src[i]);
}

void Bf16ToF32RowScalar(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = WidenBf16(src[i]);
}

void AxpyBf16RowScalar(float w, const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += w * WidenBf16(src[i]);
}

void AxpyF32RowScalar(float w, const float* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += w * src[i];
}

namespace {

// Inserts (value, id) into ids/values, kept sorted by decreasing value with
// `*filled` of `k` entries used. Called with ids in increasing order, it keeps
// the lower id first among equal values.
inline void InsertTopK(float value, int32_t id, int k, int* filled, int32_t* ids, float* values) {
  if (*filled == k && !(value > values[k - 1])) return;
  int i = *filled < k ? (*filled)++ : k - 1;
  for (; i > 0 && value > values[i - 1]; --i) {
    values[i] = values[i - 1];
    ids[i] = ids[i - 1];
  }
  values[i] = value;
  ids[i] = id;
}

// noaux_tc for one token (RouterMethod::kNoauxTc in kernels/params/moe.h).
// `score`, `choice` and `group_ids`/`group_score` are the caller's scratch.
void NoauxTcToken(const RouterTopKParams& p, const float* logits, float* score, float* choice,
                  int32_t* group_ids, float* group_score, int32_t* ids, float* w) {
  const int ne = p.num_experts;
  const int per_group = ne / p.num_groups;
  for (int e = 0; e < ne; ++e) {
    score[e] = 1.0f / (1.0f + std::exp(-logits[e]));
    choice[e] = score[e] + p.selection_bias[e];
  }
  // Each group's score: its two largest biased scores, summed (top1 + top2).
  int kept = 0;
  for (int g = 0; g < p.num_groups; ++g) {
    const float* c = choice + g * per_group;
    float top1 = c[0], top2 = c[1];
    if (top2 > top1) std::swap(top1, top2);
    for (int i = 2; i < per_group; ++i) {
      if (c[i] > top1) {
        top2 = top1;
        top1 = c[i];
      } else if (c[i] > top2) {
        top2 = c[i];
      }
    }
    InsertTopK(top1 + top2, g, p.topk_groups, &kept, group_ids, group_score);
  }
  // The top_k biased scores among the kept groups' experts, in id order so
  // the lower id wins a tie.
  std::sort(group_ids, group_ids + kept);
  int filled = 0;
  for (int i = 0; i < kept; ++i) {
    const int first = group_ids[i] * per_group;
    for (int e = first; e < first + per_group; ++e) InsertTopK(choice[e], e, p.top_k, &filled, ids, w);
  }
  // Weights: the unbiased scores.
  float total = 0.0f;
  for (int j = 0; j < p.top_k; ++j) {
    w[j] = score[ids[j]];
    total += w[j];
  }
  const float denominator = total + 1e-20f;
  for (int j = 0; j < p.top_k; ++j) w[j] = (p.renormalize ? w[j] / denominator : w[j]) * p.scaling;
}

}  // namespace

void LaunchRouterTopK(const RouterTopKParams& p, CpuStream stream) {
  if (p.method == RouterMethod::kNoauxTc) {
    ParallelFor(stream, p.tokens, 64, [&](int64_t begin, int64_t end) {
      std::vector<float> score(p.num_experts), choice(p.num_experts), group_score(p.topk_groups);
      std::vector<int32_t> group_ids(p.topk_groups);
      for (int64_t t = begin; t < end; ++t) {
        NoauxTcToken(p, p.logits + t * p.num_experts, score.data(), choice.data(), group_ids.data(),
                     group_score.data(), p.expert_ids + t * p.top_k, p.weights + t * p.top_k);
      }
    });
    return;
  }
  const int ne = p.num_experts;
  const int k = p.top_k;
  ParallelFor(stream, p.tokens, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> prob(ne);
    for (int64_t t = begin; t < end; ++t) {
      const float* logits = p.logits + t * ne;
      float mx = logits[0];
      for (int e = 1; e < ne; ++e) mx = std::max(mx, logits[e]);
      float sum = 0.0f;
      for (int e = 0; e < ne; ++e) {
        prob[e] = std::exp(logits[e] - mx);
        sum += prob[e];
      }
      const float inv = 1.0f / sum;
      for (int e = 0; e < ne; ++e) prob[e] *= inv;

      // Insertion into a list sorted by decreasing probability; scanning ids in
      // increasing order and inserting after equals puts the lower id first on ties.
      int32_t* ids = p.expert_ids + t * k;
      float* w = p.weights + t * k;
      int filled = 0;
      for (int e = 0; e < ne; ++e) InsertTopK(prob[e], e, k, &filled, ids, w);
      if (p.renormalize) {
        float total = 0.0f;
        for (int j = 0; j < k; ++j) total += w[j];
        for (int j = 0; j < k; ++j) w[j] /= total;
      }
    }
  });
}

void ComputeMoeLayout(const MoeLayoutParams& p) {
  const int64_t slots = p.tokens * p.top_k;
  // Counting sort: count, exclusive prefix sum, then a stable scatter.
  std::vector<int64_t> cursor(p.num_experts, 0);
  for (int64_t s = 0; s < slots; ++s) ++cursor[p.expert_ids[s]];
  p.expert_offsets[0] = 0;
  for (int e = 0; e < p.num_experts; ++e) {
    p.expert_offsets[e + 1] = p.expert_offsets[e] + cursor[e];
    cursor[e] = p.expert_offsets[e];
  }
  for (int64_t s = 0; s < slots; ++s) {
    const int64_t r = cursor[p.expert_ids[s]]++;
    p.permuted_to_slot[r] = static_cast<int32_t>(s);
    p.slot_to_permuted[s] = static_cast<int32_t>(r);
    if (p.permuted_to_token != nullptr) p.permuted_to_token[r] = static_cast<int32_t>(s / p.top_k);
  }
}

void AccumulateExpertLoad(const ExpertLoadParams& p) {
  for (int e = 0; e < p.num_experts; ++e) p.load[e] += p.expert_offsets[e + 1] - p.expert_offsets[e];
}

void LaunchPermute(const PermuteParams& p, CpuStream stream) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, p.hidden));
  ParallelFor(stream, p.rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t token = p.permuted_to_slot[r] / p.top_k;
      std::memcpy(p.out + r * p.hidden, p.x + token * p.hidden, sizeof(float) * p.hidden);
    }
  });
}

void LaunchUnpermute(const UnpermuteParams& p, CpuStream stream) {
  const int64_t h = p.hidden;
  const AxpyBf16RowFn axpy_bf16 = ActiveConvertFns().axpy_bf16;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, h * p.top_k));
  ParallelFor(stream, p.tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* out = p.out + t * h;
      if (!p.accumulate) std::memset(out, 0, sizeof(float) * h);
      // Row-wise accumulation in choice order (vectorizes; deterministic order).
      for (int j = 0; j < p.top_k; ++j) {
        const int64_t slot = t * p.top_k + j;
        const float w = p.weights[slot];
        const int64_t offset = static_cast<int64_t>(p.slot_to_permuted[slot]) * h;
        if (p.expert_out_bf16 != nullptr) {
          axpy_bf16(w, p.expert_out_bf16 + offset, out, h);
          continue;
        }
        const float* row = p.expert_out + offset;
        for (int64_t d = 0; d < h; ++d) out[d] += w * row[d];
      }
    }
  });
}

void LaunchGatherRows(const GatherRowsParams& p, CpuStream stream) {
  const ConvertFns fns = ActiveConvertFns();
  const size_t in_elem = p.in_type == RowType::kBF16 ? 2 : 4;
  const size_t out_elem = p.out_type == RowType::kBF16 ? 2 : 4;
  const size_t row_bytes = in_elem * static_cast<size_t>(p.hidden);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, p.hidden));
  auto out_row = [&](int64_t r) {
    return p.out_rows != nullptr ? p.out_rows[r]
                                 : static_cast<std::byte*>(p.out) + r * p.out_stride_bytes;
  };
  // Rows that copy an earlier one wait until every converted row is written.
  for (const bool copies : {false, true}) {
    if (copies && p.copy_of == nullptr) break;
    ParallelFor(stream, p.rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const bool copy = p.copy_of != nullptr && p.copy_of[r] >= 0;
        if (copy != copies) continue;
        std::byte* out = out_row(r);
        if (copy) {
          std::memcpy(out, out_row(p.copy_of[r]), out_elem * static_cast<size_t>(p.hidden));
          continue;
        }
        const int64_t src_row = p.index != nullptr ? p.index[r] / p.index_divisor : r;
        const auto* in = static_cast<const std::byte*>(p.in) + src_row * p.in_stride_bytes;
        if (p.in_type == p.out_type) {
          std::memcpy(out, in, row_bytes);
        } else if (p.out_type == RowType::kBF16) {
          fns.to_bf16(reinterpret_cast<const float*>(in), reinterpret_cast<uint16_t*>(out),
                      p.hidden);
        } else {
          fns.to_f32(reinterpret_cast<const uint16_t*>(in), reinterpret_cast<float*>(out),
                     p.hidden);
        }
      }
    });
  }
}

void LaunchReduceRows(const ReduceRowsParams& p, CpuStream stream) {
  const ConvertFns fns = ActiveConvertFns();
  const int64_t h = p.hidden;
  const bool f32_out = p.out_type == RowType::kF32;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, h));
  ParallelFor(stream, p.rows, grain, [&](int64_t begin, int64_t end) {
    // BF16 rows are summed in F32 here and rounded once at the end.
    std::vector<float> scratch(f32_out ? 0 : h);
    for (int64_t r = begin; r < end; ++r) {
      std::byte* out = p.out_rows != nullptr
                           ? p.out_rows[r]
                           : static_cast<std::byte*>(p.out) + r * p.out_stride_bytes;
      float* acc = f32_out ? reinterpret_cast<float*>(out) : scratch.data();
      if (!(f32_out && p.accumulate)) std::memset(acc, 0, sizeof(float) * h);
      for (int64_t j = p.offsets[r]; j < p.offsets[r + 1]; ++j) {
        const float w = p.weights != nullptr ? p.weights[j] : 1.0f;
        const auto* in = static_cast<const std::byte*>(p.in) + p.index[j] * p.in_stride_bytes;
        if (p.in_type == RowType::kBF16) {
          fns.axpy_bf16(w, reinterpret_cast<const uint16_t*>(in), acc, h);
        } else {
          fns.axpy_f32(w, reinterpret_cast<const float*>(in), acc, h);
        }
      }
      if (!f32_out) fns.to_bf16(acc, reinterpret_cast<uint16_t*>(out), h);
    }
  });
}

}  // namespace joule::kernels::cpu
