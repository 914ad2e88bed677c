// A meter that reports what the test tells it: energy moves only on Add(),
// reads can be made to fail, and every read is counted.
#pragma once

#include <string>

#include "absl/synchronization/mutex.h"
#include "worker/telemetry/energy_meter.h"

namespace joule::telemetry {

class FakeEnergyMeter final : public EnergyMeter {
 public:
  explicit FakeEnergyMeter(std::string source = "model") : source_(std::move(source)) {}

  // Adds energy (joules >= 0; the meter is monotonic like the real ones).
  void Add(double joules) {
    absl::MutexLock lock(&mu_);
    if (joules > 0) joules_ += joules;
  }
  void SetPowerWatts(double watts) {
    absl::MutexLock lock(&mu_);
    power_watts_ = watts;
    has_power_ = true;
  }
  // While set, every read fails with this status.
  void FailReads(absl::Status status) {
    absl::MutexLock lock(&mu_);
    failure_ = std::move(status);
  }
  int reads() const {
    absl::MutexLock lock(&mu_);
    return reads_;
  }

  absl::StatusOr<double> ReadJoules() override {
    absl::MutexLock lock(&mu_);
    ++reads_;
    if (!failure_.ok()) return failure_;
    return joules_;
  }
  absl::StatusOr<double> ReadPowerWatts() override {
    absl::MutexLock lock(&mu_);
    if (!failure_.ok()) return failure_;
    if (!has_power_) return absl::UnimplementedError("fake meter has no instant power");
    return power_watts_;
  }
  std::string_view source() const override { return source_; }
  std::string Describe() const override { return "fake energy meter"; }

 private:
  const std::string source_;
  mutable absl::Mutex mu_;
  double joules_ ABSL_GUARDED_BY(mu_) = 0;
  double power_watts_ ABSL_GUARDED_BY(mu_) = 0;
  bool has_power_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status failure_ ABSL_GUARDED_BY(mu_);
  int reads_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace joule::telemetry
