// Shared by the CUDA kernel tests: random data, BF16 rounding as PyTorch
// does it, a device allocation that frees itself, and a fixture that skips
// where there is no GPU (and fails instead on a GPU host: tests/gpu/run.sh
// sets JOULE_REQUIRE_GPU=1, so a broken driver cannot pass as "no device").
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cuda/cuda_check.h"

namespace joule::kernels::cuda {

// Set by tests/gpu/run.sh on a GPU host.
inline bool GpuRequired() {
  const char* require = std::getenv("JOULE_REQUIRE_GPU");
  return require != nullptr && std::string(require) == "1";
}

}  // namespace joule::kernels::cuda

// Skips the test where no CUDA device is usable; under JOULE_REQUIRE_GPU=1
// fails it instead, fatally, so a fixture's test body never runs on a device
// that is not there. For a test body or a fixture's SetUp.
#define JOULE_SKIP_WITHOUT_CUDA_DEVICE()                                                        \
  do {                                                                                          \
    const absl::Status joule_device_ = ::joule::kernels::cuda::CheckDeviceAvailable();          \
    if (!joule_device_.ok()) {                                                                  \
      if (::joule::kernels::cuda::GpuRequired()) {                                              \
        GTEST_FAIL() << "JOULE_REQUIRE_GPU=1 but " << joule_device_.message();                  \
      }                                                                                         \
      GTEST_SKIP() << joule_device_.message();                                                  \
    }                                                                                           \
  } while (0)

namespace joule::kernels::cuda {

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

inline std::vector<float> RandomFloats(size_t n, uint32_t seed, float lo = -1.f, float hi = 1.f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

inline uint16_t ToBf16(float f) {  // round to nearest even, as PyTorch does
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

inline float FromBf16(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Owns a device allocation of n T's.
template <typename T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t n) : n_(n) {
    EXPECT_EQ(cudaMalloc(&ptr_, std::max<size_t>(1, n) * sizeof(T)), cudaSuccess);
  }
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) {
    EXPECT_EQ(cudaMemcpy(ptr_, host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  T* get() const { return ptr_; }
  std::vector<T> Download() const {
    std::vector<T> host(n_);
    EXPECT_EQ(cudaMemcpy(host.data(), ptr_, n_ * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return host;
  }

 private:
  T* ptr_ = nullptr;
  size_t n_;
};

class CudaKernelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    JOULE_SKIP_WITHOUT_CUDA_DEVICE();
    ASSERT_EQ(cudaStreamCreate(&stream_), cudaSuccess);
  }
  void TearDown() override {
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }
  // Waits for the stream and surfaces asynchronous kernel faults.
  void Sync() { ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess) << cudaGetErrorString(cudaGetLastError()); }

  cudaStream_t stream_ = nullptr;
};

inline void ExpectNear(const std::vector<float>& got, const std::vector<float>& want, float rel,
                float abs, const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int reported = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const float tol = abs + rel * std::fabs(want[i]);
    if (!(std::fabs(got[i] - want[i]) <= tol) && reported++ < 10) {
      ADD_FAILURE() << what << "[" << i << "]: got " << got[i] << ", want " << want[i];
    }
  }
}

}  // namespace joule::kernels::cuda
