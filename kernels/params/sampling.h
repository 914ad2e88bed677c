// Parameters of next-token sampling on the device, shared by
// kernels/cpu/sampling.h and kernels/cuda/sampling.h.
//
// Row r of logits picks its token by temperature[r]:
//   0:   greedy, the first maximum (as torch.argmax);
//   > 0: a draw from softmax(logits / temperature) by the inverse CDF in token
//        order: the first token at which uniform[r] * (the sum of
//        exp(logit / T - max)) is used up, the caller's uniform in [0, 1)
//        coming from the sequence's seeded stream (worker/engine/sampler.h);
//   < 0: left to the host (top-k, top-p, or a caller that wants the logits):
//        tokens[r] is set to -1.
// The CPU sampler runs the same arithmetic for the same rows, so a seed gives
// nearly the same tokens on either device, not always the same: the CUDA
// kernel sums in another order and its expf differs from the host's exp by a
// few ulp, so a draw near a boundary of the CDF may pick a neighbouring token.
#pragma once

#include <cstdint>

namespace joule::kernels {

struct SampleParams {
  const float* logits = nullptr;       // [rows, vocab]
  int64_t rows = 0;
  int64_t vocab = 0;
  const float* temperature = nullptr;  // [rows]
  const double* uniform = nullptr;     // [rows]
  int32_t* tokens = nullptr;           // [rows]
};

}  // namespace joule::kernels
