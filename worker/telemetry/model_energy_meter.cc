#include "worker/telemetry/model_energy_meter.h"

#include <time.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status.h"

namespace joule::telemetry {

double RealProcessClock::WallSeconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

absl::StatusOr<double> RealProcessClock::CpuSeconds() {
  timespec ts{};
  if (clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts) != 0) {
    return absl::UnavailableError(
        absl::StrCat("clock_gettime(CLOCK_PROCESS_CPUTIME_ID): ", std::strerror(errno)));
  }
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

absl::StatusOr<std::unique_ptr<ModelEnergyMeter>> ModelEnergyMeter::Create(
    const ModelEnergyOptions& options, std::unique_ptr<ProcessClock> clock) {
  if (!std::isfinite(options.idle_watts) || options.idle_watts < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("energy_model_idle_watts must be a finite number >= 0, got ", options.idle_watts));
  }
  if (!std::isfinite(options.joules_per_cpu_second) || options.joules_per_cpu_second < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "energy_model_joules_per_cpu_second must be a finite number >= 0, got ",
        options.joules_per_cpu_second));
  }
  if (!clock) clock = std::make_unique<RealProcessClock>();
  const double wall0 = clock->WallSeconds();
  ASSIGN_OR_RETURN(const double cpu0, clock->CpuSeconds());
  return std::unique_ptr<ModelEnergyMeter>(new ModelEnergyMeter(options, std::move(clock), wall0, cpu0));
}

ModelEnergyMeter::ModelEnergyMeter(const ModelEnergyOptions& options,
                                   std::unique_ptr<ProcessClock> clock, double wall0, double cpu0)
    : options_(options), clock_(std::move(clock)), wall0_(wall0), cpu0_(cpu0) {}

absl::StatusOr<double> ModelEnergyMeter::ReadJoules() {
  absl::MutexLock lock(&mu_);
  const double wall = clock_->WallSeconds() - wall0_;
  ASSIGN_OR_RETURN(const double cpu_now, clock_->CpuSeconds());
  const double cpu = cpu_now - cpu0_;
  const double joules = options_.idle_watts * wall + options_.joules_per_cpu_second * cpu;
  // Both clocks are monotonic; the max only guards against a clock's rounding.
  last_ = std::max(last_, joules);
  return last_;
}

std::string ModelEnergyMeter::Describe() const {
  return absl::StrFormat("estimate: %.1f W idle + %.1f J per process CPU-second", options_.idle_watts,
                         options_.joules_per_cpu_second);
}

}  // namespace joule::telemetry
