// EnergyMeter: cumulative energy of one worker's device (GPU, CPU package, or
// an estimate of them), read cheaply from the step loop and from /metrics.
//
// Readings are joules since an arbitrary origin (the meter's first read, or the
// driver's load): only differences between two reads of the same meter mean
// anything. They never decrease, so a delta over a step or a benchmark window is
// always >= 0 (counter wrap-around is handled inside the meter).
//
// Implementations: NvmlEnergyMeter (source "nvml", GPU total-energy counter),
// RaplEnergyMeter ("rapl", powercap package counters) and ModelEnergyMeter
// ("model", an estimate from wall time and process CPU time for machines
// without counters). MakeEnergyMeter (make_energy_meter.h) picks one.
// Implementations are thread-safe: the step loop and a metrics scrape may read
// the same meter concurrently.
#pragma once

#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace joule::telemetry {

// The `source` label values, also used by --energy-source and in metrics.
inline constexpr std::string_view kSourceNvml = "nvml";
inline constexpr std::string_view kSourceRapl = "rapl";
inline constexpr std::string_view kSourceModel = "model";

class EnergyMeter {
 public:
  virtual ~EnergyMeter() = default;

  // Cumulative joules since this meter's origin; monotonic non-decreasing.
  // A failed read (driver gone, file unreadable) is an error, never a guess.
  virtual absl::StatusOr<double> ReadJoules() = 0;

  // Instantaneous power in watts where the hardware has it (NVML field 186).
  // Unimplemented where it does not: derive power from two ReadJoules() instead.
  virtual absl::StatusOr<double> ReadPowerWatts() {
    return absl::UnimplementedError(std::string("instant power is not available from the ") +
                                    std::string(source()) + " energy meter");
  }

  // "nvml", "rapl" or "model": which kind of number this is. "model" is an
  // estimate and must be labelled as such wherever it is reported.
  virtual std::string_view source() const = 0;

  // What is measured, for the start-up log: "GPU 0 (NVIDIA H100 80GB HBM3)",
  // "2 RAPL packages (package-0, package-1)", "model: 20 W idle + 15 J/CPU-s".
  virtual std::string Describe() const = 0;
};

}  // namespace joule::telemetry
