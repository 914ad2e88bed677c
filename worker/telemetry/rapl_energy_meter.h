// CPU package energy from the Linux powercap RAPL counters, summed over packages:
//   <root>/class/powercap/intel-rapl:N/{name,energy_uj,max_energy_range_uj}
// (AMD Zen CPUs use the same driver and names; "amd-rapl:N" zones are also taken),
// and, where the out-of-tree amd_energy hwmon driver is loaded instead,
//   <root>/class/hwmon/hwmonK/{name=amd_energy, energyM_label=Esocket*, energyM_input}.
// Only top-level "package-*" zones count: sub-zones (core, uncore, dram) are
// parts of or beside the package and psys overlaps it.
//
// energy_uj is a 32-bit-ish counter that wraps at max_energy_range_uj (minutes at
// full power): every read adds the per-package delta, adding the range back on a
// wrap. Reads must come at least once per wrap period (the worker reads every step).
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "worker/telemetry/energy_meter.h"

namespace joule::telemetry {

// Reads one sysfs file whole; injectable so tests can make reads fail.
using SysfsReader = std::function<absl::StatusOr<std::string>(const std::string& path)>;

// Reads a file, mapping errno to a status: EACCES/EPERM -> PERMISSION_DENIED
// (energy_uj is root-only since Linux 5.10), ENOENT -> NOT_FOUND, else UNAVAILABLE.
absl::StatusOr<std::string> ReadSysfsFile(const std::string& path);

struct RaplOptions {
  std::string sysfs_root = "/sys";  // tests point this at a fake tree
  SysfsReader reader;               // empty: ReadSysfsFile
};

class RaplEnergyMeter final : public EnergyMeter {
 public:
  // UNAVAILABLE when no package counter exists under the root; PERMISSION_DENIED
  // (with the file and a hint) when one exists but cannot be read.
  static absl::StatusOr<std::unique_ptr<RaplEnergyMeter>> Create(const RaplOptions& options);

  absl::StatusOr<double> ReadJoules() override;
  std::string_view source() const override { return kSourceRapl; }
  std::string Describe() const override;

  struct Counter {
    std::string name;         // "package-0", "Esocket0"
    std::string energy_path;  // microjoules
    uint64_t max_range_uj = 0;  // 0: no wrap (64-bit hwmon counter)
    uint64_t last_uj = 0;
  };

 private:
  RaplEnergyMeter(SysfsReader reader, std::vector<Counter> counters);

  const SysfsReader reader_;
  mutable absl::Mutex mu_;
  std::vector<Counter> counters_ ABSL_GUARDED_BY(mu_);
  double total_joules_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace joule::telemetry
