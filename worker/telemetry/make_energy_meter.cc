#include "worker/telemetry/make_energy_meter.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status.h"
#include "worker/telemetry/model_energy_meter.h"
#include "worker/telemetry/nvml_energy_meter.h"
#include "worker/telemetry/rapl_energy_meter.h"

namespace joule::telemetry {

absl::Status EnergyMeterOptions::Validate() const {
  if (energy_source != "auto" && energy_source != kSourceNvml && energy_source != kSourceRapl &&
      energy_source != kSourceModel) {
    return absl::InvalidArgumentError(absl::StrCat(
        "energy_source must be one of auto, nvml, rapl, model; got '", energy_source, "'"));
  }
  if (!nvml_pci_bus_id.empty()) RETURN_IF_ERROR(CanonicalPciBusId(nvml_pci_bus_id).status());
  if (nvml_device < 0) {
    return absl::InvalidArgumentError(absl::StrCat("nvml_device must be >= 0, got ", nvml_device));
  }
  if (!std::isfinite(energy_model_idle_watts) || energy_model_idle_watts < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("energy_model_idle_watts must be >= 0, got ", energy_model_idle_watts));
  }
  if (!std::isfinite(energy_model_joules_per_cpu_second) || energy_model_joules_per_cpu_second < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "energy_model_joules_per_cpu_second must be >= 0, got ", energy_model_joules_per_cpu_second));
  }
  return absl::OkStatus();
}

EnergyMeterOptions ForComputeDevice(EnergyMeterOptions options, std::string_view compute_pci_bus_id) {
  if (options.nvml_pci_bus_id.empty()) options.nvml_pci_bus_id = std::string(compute_pci_bus_id);
  return options;
}

absl::StatusOr<std::unique_ptr<EnergyMeter>> MakeEnergyMeter(const EnergyMeterOptions& options) {
  RETURN_IF_ERROR(options.Validate());
  const bool any = options.energy_source == "auto";
  auto chosen = [](std::unique_ptr<EnergyMeter> m) -> std::unique_ptr<EnergyMeter> {
    JOULE_LOG(Info) << "energy meter: source=" << m->source() << ", " << m->Describe()
                    << (m->source() == kSourceModel ? " (an ESTIMATE, not a measurement)" : "");
    return m;
  };
  if (any || options.energy_source == kSourceNvml) {
    auto m = NvmlEnergyMeter::Create({.library = options.nvml_library,
                                      .pci_bus_id = options.nvml_pci_bus_id,
                                      .device_index = options.nvml_device});
    if (m.ok()) return chosen(std::move(*m));
    if (!any) return m.status();
    if (options.nvml_pci_bus_id.empty()) {
      JOULE_LOG(Info) << "energy meter: no nvml: " << m.status().message();
    } else {
      // A GPU this worker computes on, whose energy the fallback will not see.
      JOULE_LOG(Warning) << "energy meter: no nvml for the GPU at " << options.nvml_pci_bus_id
                         << ", metering the next best source instead: " << m.status().message();
    }
  }
  if (any || options.energy_source == kSourceRapl) {
    auto m = RaplEnergyMeter::Create({.sysfs_root = options.rapl_sysfs_root});
    if (m.ok()) return chosen(std::move(*m));
    if (!any) return m.status();
    JOULE_LOG(Info) << "energy meter: no rapl: " << m.status().message();
  }
  ASSIGN_OR_RETURN(auto m, ModelEnergyMeter::Create(
                               {.idle_watts = options.energy_model_idle_watts,
                                .joules_per_cpu_second = options.energy_model_joules_per_cpu_second}));
  return chosen(std::move(m));
}

}  // namespace joule::telemetry
