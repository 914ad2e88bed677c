// Energy of one NVIDIA GPU from NVML's total-energy counter
// (nvmlDeviceGetTotalEnergyConsumption: millijoules since the driver loaded,
// updated about every 100 ms; Volta and later).
//
// libnvidia-ml.so.1 is loaded at run time (dlopen), so the worker has no link-time
// dependency on the driver and the same binary runs on machines without a GPU:
// there Create() returns UNAVAILABLE and MakeEnergyMeter moves on to RAPL.
//
// The GPU is found by its PCI bus id when one is given (the worker passes its
// CUDA device's, so the meter reads the GPU it computes on whatever
// CUDA_VISIBLE_DEVICES says), else by NVML index.
#pragma once

#include <memory>
#include <string>
#include "absl/strings/string_view.h"

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "worker/telemetry/energy_meter.h"

namespace joule::telemetry {

struct NvmlOptions {
  std::string library = "libnvidia-ml.so.1";  // dlopen name or path
  // PCI bus id of the GPU ("0000:1b:00.0" as CUDA writes it, "00000000:1B:00.0" as NVML
  // does, or "1b:00.0"). When set, device_index is not used.
  std::string pci_bus_id;
  int device_index = 0;  // NVML index (CUDA_VISIBLE_DEVICES does not apply)
};

// A PCI bus id in NVML's spelling, "DDDDDDDD:BB:DD.F" (hex, upper case), from any of
// "domain:bus:device.function", "domain:bus:device" or "bus:device.function".
// InvalidArgument naming the text when it is none of them or a part is out of range.
absl::StatusOr<std::string> CanonicalPciBusId(absl::string_view text);

class NvmlEnergyMeter final : public EnergyMeter {
 public:
  // UNAVAILABLE when the library cannot be loaded, lacks a needed symbol, NVML does
  // not initialize, or the device (index or bus id, named in the message) does not
  // exist or has no energy counter. InvalidArgument for a malformed bus id or a
  // negative index.
  static absl::StatusOr<std::unique_ptr<NvmlEnergyMeter>> Create(const NvmlOptions& options);
  ~NvmlEnergyMeter() override;

  absl::StatusOr<double> ReadJoules() override;
  // Instant power (field NVML_FI_DEV_POWER_INSTANT, 186), else nvmlDeviceGetPowerUsage,
  // which on Hopper is a 1 s average: fine for a gauge, too slow for attribution.
  absl::StatusOr<double> ReadPowerWatts() override;
  std::string_view source() const override { return kSourceNvml; }
  // "GPU 0 (NVIDIA H200)" by index; "GPU 00000000:1B:00.0 (NVIDIA H200, NVML index 3)"
  // by bus id.
  std::string Describe() const override { return description_; }

  struct Api;  // the NVML entry points, resolved with dlsym

 private:
  NvmlEnergyMeter(void* library, std::unique_ptr<Api> api, void* device, std::string description);

  void* library_;  // dlopen handle
  std::unique_ptr<Api> api_;
  void* device_;  // nvmlDevice_t
  const std::string description_;
  absl::Mutex mu_;
  bool instant_power_works_ ABSL_GUARDED_BY(mu_) = true;
};

}  // namespace joule::telemetry
