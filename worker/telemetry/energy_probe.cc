// joule-energy-probe: prints readings from the energy meter a worker would pick
// (or the one named), to check a machine's telemetry before a benchmark:
//   joule-energy-probe [--energy-source auto|nvml|rapl|model] [--nvml-pci-bus-id ID | --nvml-device 0]
//                      [--samples 10] [--interval-ms 500]
// Each line: elapsed seconds, cumulative joules, average watts over the
// interval (from the counter), and instant watts where the meter has them.
#include <chrono>
#include <cstdio>
#include <thread>

#include "common/options.h"
#include "worker/telemetry/make_energy_meter.h"

namespace joule::telemetry {
namespace {

#define JOULE_PROBE_FLAGS(X)                                   \
  JOULE_ENERGY_METER_FLAGS(X)                                  \
  X(int, samples, 10, "readings to print")                     \
  X(int, interval_ms, 500, "milliseconds between readings")

struct ProbeConfig {
  JOULE_PROBE_FLAGS(JOULE_OPTION_FIELD)
  std::vector<Option> Options() { return {JOULE_PROBE_FLAGS(JOULE_OPTION_BIND)}; }
  absl::Status Validate() const {
    if (samples < 1) return absl::InvalidArgumentError("samples must be >= 1");
    if (interval_ms < 1) return absl::InvalidArgumentError("interval_ms must be >= 1");
    return absl::OkStatus();
  }
};

int Main(int argc, char** argv) {
  absl::StatusOr<ProbeConfig> config = ParseConfig<ProbeConfig>(
      "usage: joule-energy-probe [--energy-source auto|nvml|rapl|model] [flags]", "JOULE_", argc, argv);
  if (!config.ok()) return ReportOptionsError("joule-energy-probe", config.status());
  const EnergyMeterOptions options = EnergyMeterOptionsFrom(*config);
  absl::StatusOr<std::unique_ptr<EnergyMeter>> meter = MakeEnergyMeter(options);
  if (!meter.ok()) {
    std::fprintf(stderr, "joule-energy-probe: %s\n", std::string(meter.status().ToString()).c_str());
    return 1;
  }
  EnergyMeter& m = **meter;
  std::printf("source=%s  %s%s\n", std::string(m.source()).c_str(), m.Describe().c_str(),
              m.source() == kSourceModel ? "  [ESTIMATE]" : "");
  std::printf("%8s %14s %10s %10s\n", "t_s", "joules", "avg_W", "instant_W");
  using Clock = std::chrono::steady_clock;
  const Clock::time_point start = Clock::now();
  double last_j = 0, last_t = 0;
  for (int i = 0; i < config->samples; ++i) {
    if (i > 0) std::this_thread::sleep_for(std::chrono::milliseconds(config->interval_ms));
    const double t = std::chrono::duration<double>(Clock::now() - start).count();
    absl::StatusOr<double> j = m.ReadJoules();
    if (!j.ok()) {
      std::fprintf(stderr, "read failed: %s\n", std::string(j.status().ToString()).c_str());
      return 1;
    }
    absl::StatusOr<double> w = m.ReadPowerWatts();
    char avg[32] = "-", inst[32] = "-";
    if (i > 0 && t > last_t) std::snprintf(avg, sizeof(avg), "%.2f", (*j - last_j) / (t - last_t));
    if (w.ok()) std::snprintf(inst, sizeof(inst), "%.2f", *w);
    std::printf("%8.3f %14.3f %10s %10s\n", t, *j, avg, inst);
    std::fflush(stdout);
    last_j = *j;
    last_t = t;
  }
  return 0;
}

}  // namespace
}  // namespace joule::telemetry

int main(int argc, char** argv) { return joule::telemetry::Main(argc, argv); }
