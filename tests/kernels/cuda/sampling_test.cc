// The device sampler against the CPU's (kernels/params/sampling.h): greedy
// picks the same first maximum; a temperature draw picks the same token for
// the same uniform, unless the uniform lands within rounding of the boundary
// between two tokens (the F64 totals are summed in another order), and the
// same inputs give the same tokens on every run.
#include <cmath>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/sampling.h"
#include "kernels/cuda/sampling.h"
#include "tests/kernels/cuda/cuda_test_util.h"

namespace joule::kernels::cuda {
namespace {

// Whether `target` (u * the row's total) lies within rounding of the end of
// token `t`'s share, where the CPU and the GPU may legitimately split.
bool NearBoundary(const std::vector<float>& logits, int64_t vocab, float temperature, double u,
                  int32_t t) {
  float max_scaled = -INFINITY;
  for (int64_t i = 0; i < vocab; ++i) max_scaled = std::max(max_scaled, logits[i] / temperature);
  std::vector<double> e(vocab);
  double total = 0;
  for (int64_t i = 0; i < vocab; ++i) total += e[i] = std::exp(logits[i] / temperature - max_scaled);
  double through = 0;
  for (int64_t i = 0; i <= t; ++i) through += e[i];
  return std::abs(through - u * total) <= 1e-9 * total;
}

TEST_F(CudaKernelTest, SampleMatchesTheCpuSampler) {
  for (const int64_t vocab : {int64_t{7}, int64_t{300}, int64_t{151936}}) {
    SCOPED_TRACE(vocab);
    const int64_t rows = 24;
    std::vector<float> logits = RandomFloats(rows * vocab, 5 + vocab, -8.f, 8.f);
    logits[3 * vocab + vocab / 2] = logits[3 * vocab + 1] = 50.f;  // a tie: the first wins
    std::vector<float> temperature(rows);
    std::vector<double> uniform(rows);
    std::mt19937_64 rng(vocab);
    for (int64_t r = 0; r < rows; ++r) {
      const float temperatures[] = {0.0f, 0.7f, 1.0f, 1.6f, -1.0f, 0.05f};
      temperature[r] = temperatures[r % 6];
      uniform[r] = std::uniform_real_distribution<double>(0.0, 1.0)(rng);
    }
    uniform[1] = 0.0;            // the first token with any mass
    uniform[2] = 1.0 - 1e-12;    // the last tokens with any mass
    std::vector<int32_t> want(rows);
    cpu::LaunchSample({.logits = logits.data(), .rows = rows, .vocab = vocab,
                       .temperature = temperature.data(), .uniform = uniform.data(),
                       .tokens = want.data()},
                      cpu::CpuStream{});
    DeviceBuffer<float> dlogits(logits), dtemperature(temperature);
    DeviceBuffer<double> duniform(uniform);
    for (int run = 0; run < 2; ++run) {
      DeviceBuffer<int32_t> dtokens(std::vector<int32_t>(rows, 12345));
      ASSERT_TRUE(LaunchSample({.logits = dlogits.get(), .rows = rows, .vocab = vocab,
                                .temperature = dtemperature.get(), .uniform = duniform.get(),
                                .tokens = dtokens.get()},
                               stream_)
                      .ok());
      Sync();
      const std::vector<int32_t> got = dtokens.Download();
      for (int64_t r = 0; r < rows; ++r) {
        if (temperature[r] < 0) {
          EXPECT_EQ(got[r], -1) << "row " << r << " is the host's";
          continue;
        }
        if (got[r] == want[r]) continue;
        ASSERT_GT(temperature[r], 0.0f) << "greedy row " << r << ": got " << got[r] << ", want " << want[r];
        const std::vector<float> row(logits.begin() + r * vocab, logits.begin() + (r + 1) * vocab);
        EXPECT_TRUE(NearBoundary(row, vocab, temperature[r], uniform[r], std::min(got[r], want[r])))
            << "row " << r << ": got " << got[r] << ", want " << want[r];
      }
    }
  }
}

TEST(CudaSampleValidation, RejectsBadShapes) {
  EXPECT_EQ(LaunchSample({.rows = -1, .vocab = 5}, nullptr).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(LaunchSample({.rows = 1, .vocab = 0}, nullptr).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(LaunchSample({.rows = 2, .vocab = 5}, nullptr).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(LaunchSample({.rows = 0, .vocab = 5}, nullptr).ok());
}

}  // namespace
}  // namespace joule::kernels::cuda
