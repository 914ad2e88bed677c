// An ESTIMATE of a worker's energy for machines without energy counters (no GPU,
// no readable RAPL): a constant idle power over wall time plus a fixed energy per
// second of this process's CPU time,
//   joules = idle_watts * wall_seconds + joules_per_cpu_second * cpu_seconds
// since the meter was made. Source "model": benchmarks and metrics must label
// it as an estimate. It ranks policies that trade CPU work for time sensibly,
// but its absolute numbers are only as good as the two parameters.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "worker/telemetry/energy_meter.h"

namespace joule::telemetry {

// Wall and process CPU time; injected so tests control both.
class ProcessClock {
 public:
  virtual ~ProcessClock() = default;
  virtual double WallSeconds() = 0;                 // monotonic
  virtual absl::StatusOr<double> CpuSeconds() = 0;  // this process, all threads
};

// steady_clock and CLOCK_PROCESS_CPUTIME_ID.
class RealProcessClock final : public ProcessClock {
 public:
  double WallSeconds() override;
  absl::StatusOr<double> CpuSeconds() override;
};

struct ModelEnergyOptions {
  // Per worker process: the share of the machine's idle power charged to it.
  double idle_watts = 20.0;
  // Energy per fully busy core-second above idle (a server core at load: ~5-15 W).
  double joules_per_cpu_second = 10.0;
};

class ModelEnergyMeter final : public EnergyMeter {
 public:
  // InvalidArgument naming the field for a negative or non-finite parameter.
  static absl::StatusOr<std::unique_ptr<ModelEnergyMeter>> Create(
      const ModelEnergyOptions& options, std::unique_ptr<ProcessClock> clock = nullptr);

  absl::StatusOr<double> ReadJoules() override;
  std::string_view source() const override { return kSourceModel; }
  std::string Describe() const override;

 private:
  ModelEnergyMeter(const ModelEnergyOptions& options, std::unique_ptr<ProcessClock> clock,
                   double wall0, double cpu0);

  const ModelEnergyOptions options_;
  absl::Mutex mu_;
  std::unique_ptr<ProcessClock> clock_ ABSL_GUARDED_BY(mu_);
  const double wall0_;
  const double cpu0_;
  double last_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace joule::telemetry
