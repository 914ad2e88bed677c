// Token sampling: greedy, temperature, top-k, top-p, with a per-sequence seed;
// OpenAI's penalties and logit_bias on the logits before sampling, and the
// log probabilities of what was picked.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <span>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"

namespace joule {

// Most alternatives a token's logprob entry carries (OpenAI's top_logprobs bound).
inline constexpr int kMaxTopLogprobs = 20;

struct SamplingParams {
  float temperature = 1.0f;  // 0: greedy
  float top_p = 1.0f;        // (0, 1]
  int top_k = 0;             // 0: disabled
  std::optional<uint64_t> seed;
  int max_tokens = 16;
  std::vector<int32_t> stop_token_ids;  // in addition to the model's EOS ids
  bool ignore_eos = false;
  // On the logits before temperature (ProcessLogits), as OpenAI and vLLM:
  // presence subtracts once from every token generated so far, frequency per
  // time it was generated ([-2, 2]); repetition_penalty (> 0, 1: off) divides
  // positive and multiplies negative logits of every token of the prompt or
  // output; logit_bias adds to a token's logit ([-100, 100]).
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  float repetition_penalty = 1.0f;
  std::map<int32_t, float> logit_bias;
  // Report each generated token's log probability with its top_logprobs most
  // likely alternatives (0..kMaxTopLogprobs); prompt_logprobs: the prompt's too.
  bool logprobs = false;
  int top_logprobs = 0;
  bool prompt_logprobs = false;

  // InvalidArgument naming the field. With `vocab` > 0 logit_bias's token ids
  // must also lie in [0, vocab).
  absl::Status Validate(int64_t vocab = 0) const;
  // Whether ProcessLogits changes anything (a penalty or a bias is set).
  bool ProcessesLogits() const;
  // Whether the host needs this sequence's logits: processing or logprobs.
  bool NeedsHostLogits() const;
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

// What the penalties know of a sequence: how often each token was generated
// (frequency, presence) and which tokens its prompt or output holds (repetition).
class TokenHistory {
 public:
  void AddPrompt(std::span<const int32_t> tokens);
  void AddGenerated(int32_t token);
  const absl::flat_hash_map<int32_t, int>& generated() const { return generated_; }
  const absl::flat_hash_set<int32_t>& seen() const { return seen_; }

 private:
  absl::flat_hash_map<int32_t, int> generated_;
  absl::flat_hash_set<int32_t> seen_;
};

// Applies, in vLLM's order, logit_bias, then repetition_penalty to every seen
// token, then frequency and presence penalties to the generated ones, to
// logits [vocab] in place.
void ProcessLogits(float* logits, int64_t vocab, const SamplingParams& params,
                   const TokenHistory& history);

// Uniforms a sequence draws per token: 0 greedy, else 1.
int DrawsPerToken(const SamplingParams& params);

// Whether the device picks this sequence's tokens (kernels/params/sampling.h):
// greedy, or plain temperature sampling, on logits nobody processes or reads;
// top-k, top-p, penalties, logit_bias and logprobs are handled on the host.
bool SamplesOnDevice(const SamplingParams& params, int64_t vocab);
// The temperature the device sampler takes for such a sequence (0: greedy).
float DeviceTemperature(const SamplingParams& params);

// Picks the next token from (processed) logits [vocab]. `scratch` avoids
// per-call allocation. Greedy and plain temperature sampling run the device
// sampler's arithmetic (one uniform drawn from rng unless greedy), so asking
// for logprobs or a penalty that changes nothing does not change the token.
int32_t SampleToken(const float* logits, int64_t vocab, const SamplingParams& params,
                    SamplerRng* rng, std::vector<std::pair<float, int32_t>>* scratch);

struct TopLogprob {
  int32_t token = -1;
  float logprob = 0.0f;
};
struct TokenLogprob {
  int32_t token = -1;
  float logprob = 0.0f;
  std::vector<TopLogprob> top;  // most likely first; ties: lower token id first
};

// log_softmax(logits / temperature) at `token` (temperature 0: of the logits
// unscaled), and the `top` most likely tokens.
TokenLogprob ComputeLogprob(const float* logits, int64_t vocab, float temperature, int32_t token,
                            int top, std::vector<std::pair<float, int32_t>>* scratch);

}  // namespace joule
