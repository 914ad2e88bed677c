// Next-token sampling on the CPU (SampleParams: kernels/params/sampling.h).
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/cpu/thread_pool.h"
#include "kernels/params/sampling.h"

namespace joule::kernels::cpu {

using ::joule::kernels::SampleParams;

// One row: greedy for temperature 0, else the inverse-CDF draw with
// `uniform`. `scratch` holds the row's exponentials (grown as needed).
int32_t SampleRow(const float* logits, int64_t vocab, float temperature, double uniform,
                  std::vector<float>* scratch);

void LaunchSample(const SampleParams& p, CpuStream stream);

}  // namespace joule::kernels::cpu
