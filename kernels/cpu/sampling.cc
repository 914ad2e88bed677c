#include "kernels/cpu/sampling.h"

#include <algorithm>
#include <cmath>

namespace joule::kernels::cpu {

int32_t SampleRow(const float* logits, int64_t vocab, float temperature, double uniform,
                  std::vector<float>* scratch) {
  if (temperature == 0.0f) {
    return static_cast<int32_t>(std::max_element(logits, logits + vocab) - logits);
  }
  std::vector<float>& e = *scratch;
  e.resize(static_cast<size_t>(vocab));
  float max_scaled = -INFINITY;
  for (int64_t i = 0; i < vocab; ++i) {
    e[i] = logits[i] / temperature;
    max_scaled = std::max(max_scaled, e[i]);
  }
  double total = 0.0;
  for (int64_t i = 0; i < vocab; ++i) {
    e[i] = std::exp(e[i] - max_scaled);
    total += e[i];
  }
  double left = uniform * total;
  for (int64_t i = 0; i < vocab; ++i) {
    left -= e[i];
    if (left < 0.0) return static_cast<int32_t>(i);
  }
  return static_cast<int32_t>(vocab - 1);  // rounding left a sliver: the last token
}

void LaunchSample(const SampleParams& p, CpuStream stream) {
  ParallelFor(stream, p.rows, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> scratch;
    for (int64_t r = begin; r < end; ++r) {
      p.tokens[r] = p.temperature[r] < 0.0f
                        ? -1
                        : SampleRow(p.logits + r * p.vocab, p.vocab, p.temperature[r],
                                    p.uniform[r], &scratch);
    }
  });
}

}  // namespace joule::kernels::cpu
