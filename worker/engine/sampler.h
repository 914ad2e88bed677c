// Token sampling: greedy, temperature, top-k, top-p, with a per-sequence seed.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "absl/status/status.h"

namespace joule {

struct SamplingParams {
  float temperature = 1.0f;  // 0: greedy
  float top_p = 1.0f;        // (0, 1]
  int top_k = 0;             // 0: disabled
  std::optional<uint64_t> seed;
  int max_tokens = 16;
  std::vector<int32_t> stop_token_ids;  // in addition to the model's EOS ids
  bool ignore_eos = false;

  // InvalidArgument naming the field.
  absl::Status Validate() const;
};

// A sequence's random stream (splitmix64): identical seeds give identical
// samples, whatever else is in the batch.
class SamplerRng {
 public:
  explicit SamplerRng(uint64_t seed) : state_(seed) {}
  uint64_t Next();
  double Uniform();  // [0, 1)

 private:
  uint64_t state_;
};

// Uniforms a sequence draws per token: 0 greedy, else 1.
int DrawsPerToken(const SamplingParams& params);

// Whether the device picks this sequence's tokens (kernels/params/sampling.h):
// greedy, or plain temperature sampling; top-k and top-p are picked on the host.
bool SamplesOnDevice(const SamplingParams& params, int64_t vocab);
// The temperature the device sampler takes for such a sequence (0: greedy).
float DeviceTemperature(const SamplingParams& params);

// Picks the next token from logits [vocab]. `scratch` avoids per-call allocation.
// For a sequence that SamplesOnDevice, the same arithmetic as the device sampler
// (one uniform drawn from rng unless greedy).
int32_t SampleToken(const float* logits, int64_t vocab, const SamplingParams& params,
                    SamplerRng* rng, std::vector<std::pair<float, int32_t>>* scratch);

}  // namespace joule
