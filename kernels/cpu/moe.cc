#include "kernels/cpu/moe.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace joule::kernels::cpu {

void LaunchRouterTopK(const RouterTopKParams& p, CpuStream stream) {
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
      for (int e = 0; e < ne; ++e) {
        if (filled == k && !(prob[e] > w[k - 1])) continue;
        int i = filled < k ? filled++ : k - 1;
        for (; i > 0 && prob[e] > w[i - 1]; --i) {
          w[i] = w[i - 1];
          ids[i] = ids[i - 1];
        }
        w[i] = prob[e];
        ids[i] = e;
      }
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
  }
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
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, h * p.top_k));
  ParallelFor(stream, p.tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* out = p.out + t * h;
      if (!p.accumulate) std::memset(out, 0, sizeof(float) * h);
      // Row-wise accumulation in choice order (vectorizes; deterministic order).
      for (int j = 0; j < p.top_k; ++j) {
        const int64_t slot = t * p.top_k + j;
        const float w = p.weights[slot];
        const float* row = p.expert_out + static_cast<int64_t>(p.slot_to_permuted[slot]) * h;
        for (int64_t d = 0; d < h; ++d) out[d] += w * row[d];
      }
    }
  });
}

}  // namespace joule::kernels::cpu
