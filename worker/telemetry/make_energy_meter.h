// Picks the energy meter of a worker: NVML if its GPU has a counter, else the
// CPU packages' RAPL counters, else the labelled estimate ("model"); or the one
// named by --energy-source. Logs which it took and why the better ones were not.
//
// A binary adds JOULE_ENERGY_METER_FLAGS(X) to its own flags table and fills
// EnergyMeterOptions from them (or embeds EnergyMeterOptions).
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/options.h"
#include "worker/telemetry/energy_meter.h"

namespace joule::telemetry {

#define JOULE_ENERGY_METER_FLAGS(X)                                                              \
  X(std::string, energy_source, "auto",                                                          \
    "energy meter: auto (nvml, else rapl, else model), nvml, rapl or model (an estimate)")      \
  X(std::string, nvml_pci_bus_id, "",                                                           \
    "PCI bus id of the GPU NVML meters (e.g. 00000000:1B:00.0); empty: a worker on cuda:N "      \
    "uses its GPU's, other binaries --nvml-device")                                             \
  X(int, nvml_device, 0,                                                                         \
    "NVML index of the GPU to meter when no PCI bus id is known (NVML ignores "                  \
    "CUDA_VISIBLE_DEVICES)")                                                                     \
  X(std::string, nvml_library, "libnvidia-ml.so.1", "NVML library to dlopen")                   \
  X(std::string, rapl_sysfs_root, "/sys", "sysfs root holding class/powercap (RAPL)")            \
  X(double, energy_model_idle_watts, 20.0, "model meter: idle watts charged to this worker")      \
  X(double, energy_model_joules_per_cpu_second, 10.0,                                           \
    "model meter: joules per second of this process's CPU time")

struct EnergyMeterOptions {
  JOULE_ENERGY_METER_FLAGS(JOULE_OPTION_FIELD)
  std::vector<Option> Options() { return {JOULE_ENERGY_METER_FLAGS(JOULE_OPTION_BIND)}; }
  // InvalidArgument naming the field: unknown source, malformed bus id, negative
  // device or parameter.
  absl::Status Validate() const;
};

// The meter options of a binary's config that embeds JOULE_ENERGY_METER_FLAGS.
template <typename Config>
EnergyMeterOptions EnergyMeterOptionsFrom(const Config& config) {
  EnergyMeterOptions options;
#define JOULE_ENERGY_METER_COPY(type, field, def, help) options.field = config.field;
  JOULE_ENERGY_METER_FLAGS(JOULE_ENERGY_METER_COPY)
#undef JOULE_ENERGY_METER_COPY
  return options;
}

// `options` for a worker that computes on the GPU with PCI bus id `compute_pci_bus_id`
// (device::Backend::pci_bus_id(); empty on the CPU): NVML then meters that GPU, unless
// the operator named one with --nvml-pci-bus-id.
EnergyMeterOptions ForComputeDevice(EnergyMeterOptions options, std::string_view compute_pci_bus_id);

// The chosen meter. With energy_source=auto it never fails for lack of hardware
// (the model always works); a named source that is unavailable is an error.
absl::StatusOr<std::unique_ptr<EnergyMeter>> MakeEnergyMeter(const EnergyMeterOptions& options);

}  // namespace joule::telemetry
