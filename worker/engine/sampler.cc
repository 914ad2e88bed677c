#include "worker/engine/sampler.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/sampling.h"

namespace joule {

absl::Status SamplingParams::Validate() const {
  if (!(temperature >= 0.0f) || !std::isfinite(temperature)) {
    return absl::InvalidArgumentError("temperature must be a finite number >= 0");
  }
  if (!(top_p > 0.0f && top_p <= 1.0f)) return absl::InvalidArgumentError("top_p must be in (0, 1]");
  if (top_k < 0) return absl::InvalidArgumentError("top_k must be >= 0");
  if (max_tokens < 1) return absl::InvalidArgumentError("max_tokens must be >= 1");
  return absl::OkStatus();
}

uint64_t SamplerRng::Next() {
  uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

double SamplerRng::Uniform() { return static_cast<double>(Next() >> 11) * 0x1.0p-53; }

int DrawsPerToken(const SamplingParams& p) {
  return p.temperature == 0.0f || p.top_k == 1 ? 0 : 1;
}

bool SamplesOnDevice(const SamplingParams& p, int64_t vocab) {
  return p.temperature == 0.0f || p.top_k == 1 ||
         ((p.top_k == 0 || p.top_k >= vocab) && p.top_p >= 1.0f);
}

float DeviceTemperature(const SamplingParams& p) {
  return p.temperature == 0.0f || p.top_k == 1 ? 0.0f : p.temperature;
}

int32_t SampleToken(const float* logits, int64_t vocab, const SamplingParams& p, SamplerRng* rng,
                    std::vector<std::pair<float, int32_t>>* scratch) {
  if (SamplesOnDevice(p, vocab)) {
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

}  // namespace joule
