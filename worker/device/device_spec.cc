#include "worker/device/device_spec.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"

namespace joule::device {

std::string DeviceSpec::ToString() const {
  switch (kind) {
    case DeviceKind::kCuda: return absl::StrCat("cuda:", index);
    case DeviceKind::kFake: return "fake";
    case DeviceKind::kCpu: break;
  }
  return "cpu";
}

absl::StatusOr<DeviceSpec> ParseDeviceSpec(std::string_view text_in) {
  // Debian's Abseil has its own string_view type.
  const absl::string_view text(text_in.data(), text_in.size());
  if (text == "cpu") return DeviceSpec{};
  if (text == "cuda") return DeviceSpec{.kind = DeviceKind::kCuda, .index = 0};
  if (text == "fake") return DeviceSpec{.kind = DeviceKind::kFake};
  absl::string_view ordinal = text;
  int index = -1;
  if (absl::ConsumePrefix(&ordinal, "cuda:") && !ordinal.empty() &&
      ordinal.find_first_not_of("0123456789") == absl::string_view::npos &&
      absl::SimpleAtoi(ordinal, &index)) {
    return DeviceSpec{.kind = DeviceKind::kCuda, .index = index};
  }
  return absl::InvalidArgumentError(
      absl::StrCat("--device: expected cpu, cuda or cuda:N (N >= 0), got \"", text, "\""));
}

}  // namespace joule::device
