// The device sampler against the CPU's (kernels/params/sampling.h): greedy
// picks the same first maximum; a temperature draw picks the same token for
// the same uniform, unless the uniform lands within rounding of the boundary
// between two tokens (the F64 totals are summed in another order, and the
// device's expf differs from the host's exp by a few ulp), and the same
// inputs give the same tokens on every run.
#include <algorithm>
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

// One batch of rows through each sampler.
struct SampleRows {
  std::vector<float> logits;  // rows x vocab
  int64_t rows = 0, vocab = 0;
  std::vector<float> temperature;
  std::vector<double> uniform;
};

std::vector<int32_t> CpuTokens(const SampleRows& b) {
  std::vector<int32_t> tokens(b.rows);
  cpu::LaunchSample({.logits = b.logits.data(), .rows = b.rows, .vocab = b.vocab,
                     .temperature = b.temperature.data(), .uniform = b.uniform.data(),
                     .tokens = tokens.data()},
                    cpu::CpuStream{});
  return tokens;
}

class SampleTest : public CudaKernelTest {
 protected:
  // The device's tokens, every row first set to `stale` (a row left unwritten keeps it).
  std::vector<int32_t> DeviceTokens(const SampleRows& b, int32_t stale) {
    DeviceBuffer<float> dlogits(b.logits), dtemperature(b.temperature);
    DeviceBuffer<double> duniform(b.uniform);
    DeviceBuffer<int32_t> dtokens(std::vector<int32_t>(b.rows, stale));
    EXPECT_TRUE(LaunchSample({.logits = dlogits.get(), .rows = b.rows, .vocab = b.vocab,
                              .temperature = dtemperature.get(), .uniform = duniform.get(),
                              .tokens = dtokens.get()},
                             stream_)
                    .ok());
    Sync();
    return dtokens.Download();
  }
};

TEST_F(SampleTest, SampleMatchesTheCpuSampler) {
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
    const SampleRows batch{logits, rows, vocab, temperature, uniform};
    const std::vector<int32_t> want = CpuTokens(batch);
    for (int run = 0; run < 2; ++run) {
      const std::vector<int32_t> got = DeviceTokens(batch, 12345);
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

// Draws that land on (or a few ulp around) the boundaries between the
// threads' chunks of the vocabulary: each row is written exactly once, with a
// token in range that is the CPU's or within rounding of it. A chunk's upper
// bound rounded apart from the next chunk's start would leave some of these
// draws with no writer (the row keeps its stale value). A NaN row draws the
// last token, as on the CPU.
TEST_F(SampleTest, SampleDrawsAtChunkBoundariesAreWritten) {
  const int64_t vocab = 5000;  // chunks of 10 tokens over the block's 512 threads
  const int64_t chunk = 10;
  const std::vector<float> row = RandomFloats(vocab, 77, -3.f, 3.f);
  const float temperature = 1.0f;
  float max_scaled = -INFINITY;
  for (float x : row) max_scaled = std::max(max_scaled, x / temperature);
  std::vector<double> through(vocab);  // the CPU's running sum through each token
  double total = 0;
  for (int64_t i = 0; i < vocab; ++i) {
    total += std::exp(row[i] / temperature - max_scaled);  // float exp, as the CPU's
    through[i] = total;
  }
  std::vector<double> uniform;
  for (int64_t end = chunk; end < vocab; end += 37 * chunk) {  // a spread of chunk ends
    const double at = through[end - 1] / total;
    double u = at;
    for (int step = 0; step < 6; ++step) u = std::nextafter(u, 0.0);
    for (int step = 0; step <= 12; ++step, u = std::nextafter(u, 1.0)) uniform.push_back(u);
  }
  const int64_t nan_row = static_cast<int64_t>(uniform.size());
  uniform.push_back(0.5);
  const int64_t rows = static_cast<int64_t>(uniform.size());
  std::vector<float> logits;
  for (int64_t r = 0; r < rows; ++r) logits.insert(logits.end(), row.begin(), row.end());
  logits[nan_row * vocab + 123] = NAN;
  const std::vector<float> temperatures(rows, temperature);
  const SampleRows batch{logits, rows, vocab, temperatures, uniform};
  const std::vector<int32_t> want = CpuTokens(batch);
  EXPECT_EQ(want[nan_row], vocab - 1);
  const std::vector<int32_t> got = DeviceTokens(batch, -7);  // -7: stale
  EXPECT_EQ(got[nan_row], vocab - 1);
  for (int64_t r = 0; r < nan_row; ++r) {
    ASSERT_GE(got[r], 0) << "row " << r << " (u = " << uniform[r] << ") was not written";
    ASSERT_LT(got[r], vocab) << "row " << r;
    if (got[r] == want[r]) continue;
    // Otherwise the neighbour across the boundary the draw sits on (the
    // device's sums differ from the CPU's by far less than one token's share).
    const int32_t before = std::min(got[r], want[r]);
    EXPECT_EQ(std::abs(got[r] - want[r]), 1) << "row " << r;
    EXPECT_NEAR(through[before], uniform[r] * total, 1e-6 * total)
        << "row " << r << ": got " << got[r] << ", want " << want[r];
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
