// Shared helpers for the CPU kernel tests: random data, BF16 rounding, and the
// (ISA, threads) parameter grid every kernel is checked on.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/cpu/cpu_isa.h"
#include "kernels/cpu/thread_pool.h"

namespace joule::kernels::cpu::testing {

inline std::vector<float> RandomFloats(size_t n, uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// Round-to-nearest-even F32 -> BF16 bits (finite inputs).
inline uint16_t ToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  u += 0x7fff + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}

inline float FromBf16(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Every ISA this CPU runs (called before any test cap is set), from the fallback up.
inline std::vector<Isa> SupportedIsas() {
  std::vector<Isa> out;
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    if (isa <= ActiveIsa()) out.push_back(isa);  // honours a JOULE_CPU_ISA cap
  }
  return out;
}

// Parameter: (ISA cap, threads); threads == 0 runs with a null pool (inline).
using IsaThreads = std::tuple<Isa, int>;

inline std::string IsaThreadsName(const ::testing::TestParamInfo<IsaThreads>& info) {
  return std::string(IsaName(std::get<0>(info.param))) + "_threads" +
         std::to_string(std::get<1>(info.param));
}

// Fixture base: caps the ISA for the test and provides the stream.
class IsaThreadsTest : public ::testing::TestWithParam<IsaThreads> {
 protected:
  void SetUp() override {
    SetIsaCapForTesting(std::get<0>(GetParam()));
    ASSERT_EQ(ActiveIsa(), std::get<0>(GetParam()));
    if (std::get<1>(GetParam()) > 0) pool_ = std::make_unique<ThreadPool>(std::get<1>(GetParam()));
  }
  void TearDown() override { SetIsaCapForTesting(Isa::kAvx512); }
  CpuStream stream() const { return CpuStream{pool_.get()}; }

 private:
  std::unique_ptr<ThreadPool> pool_;
};

#define JOULE_INSTANTIATE_ISA_THREADS(Suite)                                                   \
  INSTANTIATE_TEST_SUITE_P(                                                                    \
      All, Suite,                                                                              \
      ::testing::Combine(::testing::ValuesIn(::joule::kernels::cpu::testing::SupportedIsas()), \
                         ::testing::Values(0, 2)),                                             \
      ::joule::kernels::cpu::testing::IsaThreadsName)

}  // namespace joule::kernels::cpu::testing
