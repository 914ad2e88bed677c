// Which device a worker computes on, chosen once (--device cpu | cuda | cuda:N;
// fake: the CPU's kernels behind a GPU-like asynchronous backend, in test
// builds only — worker/device/fake_device_backend.h).
#pragma once

#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace joule::device {

enum class DeviceKind { kCpu, kCuda, kFake };

struct DeviceSpec {
  DeviceKind kind = DeviceKind::kCpu;
  int index = 0;  // CUDA ordinal, as the CUDA runtime numbers them (after CUDA_VISIBLE_DEVICES)

  bool is_cuda() const { return kind == DeviceKind::kCuda; }
  std::string ToString() const;  // "cpu", "cuda:0", "fake"
  bool operator==(const DeviceSpec&) const = default;
};

// "cpu", "cuda" (= cuda:0), "cuda:N" or "fake"; InvalidArgument naming --device otherwise.
absl::StatusOr<DeviceSpec> ParseDeviceSpec(std::string_view text);

}  // namespace joule::device
