#include "worker/engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/cpu/sampling.h"

namespace joule {

namespace {

absl::Status CheckPenalty(const char* field, float value, float lo, float hi) {
  if (value >= lo && value <= hi) return absl::OkStatus();  // false for NaN
  return absl::InvalidArgumentError(
      absl::StrCat(field, ": must be in [", lo, ", ", hi, "], got ", value));
}

absl::Status CheckLogitBias(const std::map<int32_t, float>& logit_bias, int64_t vocab) {
  for (const auto& [token, bias] : logit_bias) {
    if (token < 0 || (vocab > 0 && token >= vocab)) {
      return absl::InvalidArgumentError(
          vocab > 0 ? absl::StrCat("logit_bias: token id ", token, " is out of range [0, ", vocab, ")")
                    : absl::StrCat("logit_bias: token id ", token, " must be >= 0"));
    }
    if (!(bias >= -100.0f && bias <= 100.0f)) {
      return absl::InvalidArgumentError(absl::StrCat("logit_bias: bias ", bias, " for token id ",
                                                     token, " must be in [-100, 100]"));
    }
  }
  return absl::OkStatus();
}

// Greedy, or a draw over every token at a temperature: what the device sampler does.
bool PlainSampling(const SamplingParams& p, int64_t vocab) {
  return p.temperature == 0.0f || p.top_k == 1 ||
         ((p.top_k == 0 || p.top_k >= vocab) && p.top_p >= 1.0f);
}

}  // namespace

absl::Status SamplingParams::Validate(int64_t vocab) const {
  if (!(temperature >= 0.0f) || !std::isfinite(temperature)) {
    return absl::InvalidArgumentError("temperature must be a finite number >= 0");
  }
  if (!(top_p > 0.0f && top_p <= 1.0f)) return absl::InvalidArgumentError("top_p must be in (0, 1]");
  if (top_k < 0) return absl::InvalidArgumentError("top_k must be >= 0");
  if (max_tokens < 1) return absl::InvalidArgumentError("max_tokens must be >= 1");
  RETURN_IF_ERROR(CheckPenalty("presence_penalty", presence_penalty, -2.0f, 2.0f));
  RETURN_IF_ERROR(CheckPenalty("frequency_penalty", frequency_penalty, -2.0f, 2.0f));
  if (!(repetition_penalty > 0.0f) || !std::isfinite(repetition_penalty)) {
    return absl::InvalidArgumentError(
        absl::StrCat("repetition_penalty: must be > 0 (1: off), got ", repetition_penalty));
  }
  RETURN_IF_ERROR(CheckLogitBias(logit_bias, vocab));
  if (top_logprobs < 0 || top_logprobs > kMaxTopLogprobs) {
    return absl::InvalidArgumentError(absl::StrCat("top_logprobs: must be in [0, ", kMaxTopLogprobs,
                                                   "], got ", top_logprobs));
  }
  if (top_logprobs > 0 && !logprobs && !prompt_logprobs) {
    return absl::InvalidArgumentError("top_logprobs: needs logprobs (or prompt_logprobs)");
  }
  return absl::OkStatus();
}

bool SamplingParams::ProcessesLogits() const {
  return presence_penalty != 0.0f || frequency_penalty != 0.0f || repetition_penalty != 1.0f ||
         !logit_bias.empty();
}

bool SamplingParams::NeedsHostLogits() const {
  return ProcessesLogits() || logprobs || prompt_logprobs;
}

uint64_t SamplerRng::Next() {
  uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

double SamplerRng::Uniform() { return static_cast<double>(Next() >> 11) * 0x1.0p-53; }

void TokenHistory::AddPrompt(std::span<const int32_t> tokens) {
  seen_.insert(tokens.begin(), tokens.end());
}

void TokenHistory::AddGenerated(int32_t token) {
  ++generated_[token];
  seen_.insert(token);
}

void ProcessLogits(float* logits, int64_t vocab, const SamplingParams& p,
                   const TokenHistory& history) {
  for (const auto& [token, bias] : p.logit_bias) {
    if (token < vocab) logits[token] += bias;  // the engine checked the ids against its vocabulary
  }
  if (p.repetition_penalty != 1.0f) {
    const float r = p.repetition_penalty;
    for (int32_t t : history.seen()) logits[t] = logits[t] > 0.0f ? logits[t] / r : logits[t] * r;
  }
  if (p.frequency_penalty != 0.0f || p.presence_penalty != 0.0f) {
    for (const auto& [t, count] : history.generated()) {
      logits[t] -= p.frequency_penalty * static_cast<float>(count);
      logits[t] -= p.presence_penalty;
    }
  }
}

int DrawsPerToken(const SamplingParams& p) {
  return p.temperature == 0.0f || p.top_k == 1 ? 0 : 1;
}

bool SamplesOnDevice(const SamplingParams& p, int64_t vocab) {
  return PlainSampling(p, vocab) && !p.NeedsHostLogits();
}

float DeviceTemperature(const SamplingParams& p) {
  return p.temperature == 0.0f || p.top_k == 1 ? 0.0f : p.temperature;
}

int32_t SampleToken(const float* logits, int64_t vocab, const SamplingParams& p, SamplerRng* rng,
                    std::vector<std::pair<float, int32_t>>* scratch) {
  if (PlainSampling(p, vocab)) {
    // Greedy (the first maximum, as torch.argmax) or every token a candidate:
    // the device sampler's arithmetic (kernels/params/sampling.h), no sort.
    const float t = DeviceTemperature(p);
    thread_local std::vector<float> exps;
    return kernels::cpu::SampleRow(logits, vocab, t, t == 0.0f ? 0.0 : rng->Uniform(), &exps);
  }
  // Top-k or top-p: candidates sorted by logit.
  auto& cand = *scratch;
  cand.resize(vocab);
  for (int64_t i = 0; i < vocab; ++i) cand[i] = {logits[i] / p.temperature, static_cast<int32_t>(i)};
  auto by_logit = [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  int64_t n = vocab;
  if (p.top_k > 0 && p.top_k < vocab) {
    std::partial_sort(cand.begin(), cand.begin() + p.top_k, cand.end(), by_logit);
    n = p.top_k;
  } else {
    std::sort(cand.begin(), cand.end(), by_logit);
  }
  // Softmax over the survivors (sorted descending).
  const float max_logit = cand[0].first;
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    cand[i].first = std::exp(cand[i].first - max_logit);
    total += cand[i].first;
  }
  // Nucleus: the smallest prefix whose mass reaches top_p.
  if (p.top_p < 1.0f) {
    double mass = 0.0;
    int64_t keep = 0;
    while (keep < n) {
      mass += cand[keep].first / total;
      ++keep;
      if (mass >= p.top_p) break;
    }
    n = keep;
    total = 0.0;
    for (int64_t i = 0; i < n; ++i) total += cand[i].first;
  }
  double u = rng->Uniform() * total;
  for (int64_t i = 0; i < n; ++i) {
    u -= cand[i].first;
    if (u < 0.0) return cand[i].second;
  }
  return cand[n - 1].second;
}

TokenLogprob ComputeLogprob(const float* logits, int64_t vocab, float temperature, int32_t token,
                            int top, std::vector<std::pair<float, int32_t>>* scratch) {
  // Scaled as the samplers scale (x / T in F32), exponentials in F32 as
  // theirs, the normalizer summed in F64.
  const float t = temperature > 0.0f ? temperature : 1.0f;
  auto& scaled = *scratch;
  scaled.resize(vocab);
  float max_scaled = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < vocab; ++i) {
    scaled[i] = {logits[i] / t, static_cast<int32_t>(i)};
    max_scaled = std::max(max_scaled, scaled[i].first);
  }
  double total = 0.0;
  for (int64_t i = 0; i < vocab; ++i) total += std::exp(scaled[i].first - max_scaled);
  const double log_normalizer = max_scaled + std::log(total);
  auto logprob = [&](float x) { return static_cast<float>(x - log_normalizer); };
  TokenLogprob out{.token = token, .logprob = logprob(scaled[token].first)};
  const int64_t n = std::min<int64_t>(top, vocab);
  if (n <= 0) return out;
  std::partial_sort(scaled.begin(), scaled.begin() + n, scaled.end(), [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
  out.top.reserve(n);
  for (int64_t k = 0; k < n; ++k) out.top.push_back({scaled[k].second, logprob(scaled[k].first)});
  return out;
}

}  // namespace joule
