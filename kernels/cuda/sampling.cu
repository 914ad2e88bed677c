// Greedy and temperature sampling, one block per row, in the CPU sampler's
// arithmetic (kernels/cpu/sampling.cc): x = logit / T, e = expf(x - max x),
// the total in F64, and the inverse CDF in token order. Each thread owns a
// contiguous chunk of the vocabulary, so the order of the prefix sums is the
// token order. The results are close to the CPU's, not bit-equal: the F64 sum
// is rounded in another order, and the device's expf is within 2 ulp of the
// host's exp, so a draw that lands near a CDF boundary may pick the neighbour.
#include <cuda_runtime.h>

#include <cfloat>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch_util.cuh"
#include "kernels/cuda/sampling.h"

namespace joule::kernels::cuda {
namespace {

constexpr int kThreads = 512;

// Larger value first; among equal values the lower index (torch.argmax).
struct ArgMax {
  float value;
  int64_t index;
};
struct ArgMaxOp {
  __device__ ArgMax operator()(const ArgMax& a, const ArgMax& b) const {
    if (a.value > b.value || (a.value == b.value && a.index < b.index)) return a;
    return b;
  }
};

__global__ void __launch_bounds__(kThreads) SampleKernel(SampleParams p) {
  using Reduce = cub::BlockReduce<ArgMax, kThreads>;
  using Scan = cub::BlockScan<double, kThreads>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename Scan::TempStorage scan;
  } storage;
  __shared__ float s_max;

  const int64_t r = blockIdx.x;
  const float t = p.temperature[r];
  if (t < 0.0f) {  // the host's row
    if (threadIdx.x == 0) p.tokens[r] = -1;
    return;
  }
  const float* logits = p.logits + r * p.vocab;
  const int64_t chunk = (p.vocab + kThreads - 1) / kThreads;
  const int64_t begin = threadIdx.x * chunk;
  const int64_t end = begin + chunk < p.vocab ? begin + chunk : p.vocab;
  const bool greedy = t == 0.0f;

  ArgMax best{-INFINITY, p.vocab};
  for (int64_t i = begin; i < end; ++i) {
    const float x = greedy ? logits[i] : logits[i] / t;
    if (x > best.value || best.index == p.vocab) best = {x, i};
  }
  best = Reduce(storage.reduce).Reduce(best, ArgMaxOp());
  if (greedy) {
    if (threadIdx.x == 0) p.tokens[r] = static_cast<int32_t>(best.index);
    return;
  }
  if (threadIdx.x == 0) s_max = best.value;
  __syncthreads();
  const float max_scaled = s_max;
  double mine = 0.0;
  for (int64_t i = begin; i < end; ++i) mine += expf(logits[i] / t - max_scaled);
  double before = 0.0, total = 0.0;
  Scan(storage.scan).ExclusiveSum(mine, before, total);
  const double target = p.uniform[r] * total;
  // The thread whose chunk holds the target walks it. Every chunk boundary is
  // one value, a thread's `before`: testing [before, before + mine) instead
  // would round the upper bound apart from the next thread's `before`, leaving
  // a draw in a gap (no writer) or an overlap (two). The owner is the count of
  // threads after the first whose chunk starts at or below the target (with
  // rising prefixes, the last such thread): one number every thread agrees
  // on, so exactly one writes, even if rounding makes the prefixes step down.
  // A target past every chunk (rounding, or a NaN row) goes to the last
  // thread, whose walk ends at the last token (as on the CPU).
  const int owner = __syncthreads_count(threadIdx.x > 0 && !(target < before));
  if (threadIdx.x == owner) {
    double left = target - before;
    int64_t pick = end - 1;
    for (int64_t i = begin; i < end; ++i) {
      left -= expf(logits[i] / t - max_scaled);
      if (left < 0.0) {
        pick = i;
        break;
      }
    }
    p.tokens[r] = static_cast<int32_t>(pick);
  }
}

}  // namespace

absl::Status LaunchSample(const SampleParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.vocab <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("Sample: rows must be >= 0 and vocab positive, got rows=", p.rows,
                     " vocab=", p.vocab));
  }
  if (p.rows == 0) return absl::OkStatus();
  if (!p.logits || !p.temperature || !p.uniform || !p.tokens) {
    return absl::InvalidArgumentError("Sample: null pointer");
  }
  if (p.rows > kMaxGridX) return absl::InvalidArgumentError("Sample: too many rows");
  SampleKernel<<<static_cast<unsigned>(p.rows), kThreads, 0, stream>>>(p);
  JOULE_CUDA_RETURN_IF_LAUNCH_FAILED("SampleKernel");
  return absl::OkStatus();
}

}  // namespace joule::kernels::cuda
