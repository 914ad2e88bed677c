#include "worker/telemetry/nvml_energy_meter.h"

#include <dlfcn.h>

#include <cstdint>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/status.h"

namespace joule::telemetry {
namespace {

// The few NVML declarations we use, copied from nvml.h (same values and layouts)
// so the build needs neither the CUDA toolkit nor the driver.
using nvmlReturn_t = int;
constexpr nvmlReturn_t NVML_SUCCESS = 0;
using nvmlDevice_t = void*;
constexpr unsigned int NVML_FI_DEV_POWER_INSTANT = 186;  // milliwatts
enum nvmlValueType_t : int {
  NVML_VALUE_TYPE_DOUBLE = 0,
  NVML_VALUE_TYPE_UNSIGNED_INT = 1,
  NVML_VALUE_TYPE_UNSIGNED_LONG = 2,
  NVML_VALUE_TYPE_UNSIGNED_LONG_LONG = 3,
  NVML_VALUE_TYPE_SIGNED_LONG_LONG = 4,
  NVML_VALUE_TYPE_SIGNED_INT = 5,
  NVML_VALUE_TYPE_UNSIGNED_SHORT = 6,
};
union nvmlValue_t {
  double dVal;
  unsigned int uiVal;
  unsigned long ulVal;
  unsigned long long ullVal;
  long long sllVal;
  int siVal;
  unsigned short usVal;
};
struct nvmlFieldValue_t {
  unsigned int fieldId;
  unsigned int scopeId;
  long long timestamp;
  long long latencyUsec;
  nvmlValueType_t valueType;
  nvmlReturn_t nvmlReturn;
  nvmlValue_t value;
};

double FieldAsDouble(const nvmlFieldValue_t& f) {
  switch (f.valueType) {
    case NVML_VALUE_TYPE_DOUBLE: return f.value.dVal;
    case NVML_VALUE_TYPE_UNSIGNED_INT: return f.value.uiVal;
    case NVML_VALUE_TYPE_UNSIGNED_LONG: return static_cast<double>(f.value.ulVal);
    case NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: return static_cast<double>(f.value.ullVal);
    case NVML_VALUE_TYPE_SIGNED_LONG_LONG: return static_cast<double>(f.value.sllVal);
    case NVML_VALUE_TYPE_SIGNED_INT: return f.value.siVal;
    case NVML_VALUE_TYPE_UNSIGNED_SHORT: return f.value.usVal;
  }
  return -1;
}

// One hex field of a PCI bus id: 1..max_digits hex digits, value <= max.
bool ParseHexField(absl::string_view text, size_t max_digits, uint32_t max, uint32_t* value) {
  if (text.empty() || text.size() > max_digits) return false;
  for (char c : text) {
    if (!absl::ascii_isxdigit(static_cast<unsigned char>(c))) return false;
  }
  return absl::SimpleHexAtoi(text, value) && *value <= max;
}

}  // namespace

absl::StatusOr<std::string> CanonicalPciBusId(absl::string_view text) {
  auto bad = [&] {
    return absl::InvalidArgumentError(absl::StrCat(
        "nvml_pci_bus_id: '", text,
        "' is not a PCI bus id (domain:bus:device.function in hex, e.g. 00000000:1B:00.0)"));
  };
  std::vector<absl::string_view> parts = absl::StrSplit(text, ':');
  if (parts.size() != 2 && parts.size() != 3) return bad();
  uint32_t domain = 0, bus = 0, device = 0, function = 0;
  if (parts.size() == 3 && !ParseHexField(parts[0], 8, 0xFFFFFFFFu, &domain)) return bad();
  const absl::string_view bus_text = parts[parts.size() - 2];
  const absl::string_view devfn = parts.back();
  if (!ParseHexField(bus_text, 2, 0xFF, &bus)) return bad();
  const size_t dot = devfn.find('.');
  if (dot == absl::string_view::npos) {
    // "domain:bus:device" only: "bus:device" would be ambiguous with "domain:bus".
    if (parts.size() != 3 || !ParseHexField(devfn, 2, 0x1F, &device)) return bad();
  } else if (!ParseHexField(devfn.substr(0, dot), 2, 0x1F, &device) ||
             !ParseHexField(devfn.substr(dot + 1), 1, 7, &function)) {
    return bad();
  }
  return absl::StrFormat("%08X:%02X:%02X.%X", domain, bus, device, function);
}

struct NvmlEnergyMeter::Api {
  nvmlReturn_t (*init)() = nullptr;
  nvmlReturn_t (*shutdown)() = nullptr;
  const char* (*error_string)(nvmlReturn_t) = nullptr;
  nvmlReturn_t (*get_handle)(unsigned int, nvmlDevice_t*) = nullptr;
  nvmlReturn_t (*get_handle_by_bus_id)(const char*, nvmlDevice_t*) = nullptr;  // by bus id only
  nvmlReturn_t (*get_index)(nvmlDevice_t, unsigned int*) = nullptr;           // optional
  nvmlReturn_t (*get_name)(nvmlDevice_t, char*, unsigned int) = nullptr;  // optional
  nvmlReturn_t (*total_energy)(nvmlDevice_t, unsigned long long*) = nullptr;
  nvmlReturn_t (*field_values)(nvmlDevice_t, int, nvmlFieldValue_t*) = nullptr;  // optional
  nvmlReturn_t (*power_usage)(nvmlDevice_t, unsigned int*) = nullptr;  // optional

  std::string Error(nvmlReturn_t r) const {
    const char* s = error_string ? error_string(r) : nullptr;
    return s ? absl::StrCat(s, " (", r, ")") : absl::StrCat("NVML error ", r);
  }
};

absl::StatusOr<std::unique_ptr<NvmlEnergyMeter>> NvmlEnergyMeter::Create(const NvmlOptions& options) {
  const bool by_bus_id = !options.pci_bus_id.empty();
  std::string bus_id;
  if (by_bus_id) {
    ASSIGN_OR_RETURN(bus_id, CanonicalPciBusId(options.pci_bus_id));
  } else if (options.device_index < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("nvml_device must be >= 0, got ", options.device_index));
  }
  // How the GPU is named in messages: by what the caller asked for.
  const std::string gpu = by_bus_id ? absl::StrCat("GPU ", bus_id) : absl::StrCat("GPU ", options.device_index);
  void* lib = dlopen(options.library.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    const char* why = dlerror();
    return absl::UnavailableError(absl::StrCat("NVML not available: cannot load ", options.library,
                                               ": ", why ? why : "unknown dlopen error"));
  }
  auto api = std::make_unique<Api>();
  auto fail = [&](std::string message) {
    dlclose(lib);
    return absl::UnavailableError(absl::StrCat("NVML not available (", options.library, "): ", message));
  };
  auto sym = [&](auto* fn, const char* name) {
    *fn = reinterpret_cast<std::remove_pointer_t<decltype(fn)>>(dlsym(lib, name));
    return *fn != nullptr;
  };
  if (!sym(&api->init, "nvmlInit_v2")) return fail("missing symbol nvmlInit_v2");
  if (!sym(&api->shutdown, "nvmlShutdown")) return fail("missing symbol nvmlShutdown");
  if (by_bus_id) {
    if (!sym(&api->get_handle_by_bus_id, "nvmlDeviceGetHandleByPciBusId_v2")) {
      return fail("missing symbol nvmlDeviceGetHandleByPciBusId_v2");
    }
  } else if (!sym(&api->get_handle, "nvmlDeviceGetHandleByIndex_v2")) {
    return fail("missing symbol nvmlDeviceGetHandleByIndex_v2");
  }
  if (!sym(&api->total_energy, "nvmlDeviceGetTotalEnergyConsumption")) {
    return fail("missing symbol nvmlDeviceGetTotalEnergyConsumption (driver too old)");
  }
  sym(&api->error_string, "nvmlErrorString");
  sym(&api->get_name, "nvmlDeviceGetName");
  sym(&api->get_index, "nvmlDeviceGetIndex");
  sym(&api->field_values, "nvmlDeviceGetFieldValues");
  sym(&api->power_usage, "nvmlDeviceGetPowerUsage");

  if (nvmlReturn_t r = api->init(); r != NVML_SUCCESS) return fail("nvmlInit_v2: " + api->Error(r));
  auto fail_after_init = [&](std::string message) {
    api->shutdown();
    return fail(std::move(message));
  };
  nvmlDevice_t device = nullptr;
  if (by_bus_id) {
    if (nvmlReturn_t r = api->get_handle_by_bus_id(bus_id.c_str(), &device); r != NVML_SUCCESS) {
      return fail_after_init(absl::StrCat("no GPU at PCI bus id ", bus_id, ": ", api->Error(r)));
    }
  } else if (nvmlReturn_t r = api->get_handle(static_cast<unsigned int>(options.device_index), &device);
             r != NVML_SUCCESS) {
    return fail_after_init(
        absl::StrCat("no GPU at NVML index ", options.device_index, ": ", api->Error(r)));
  }
  // Probe the counter now, so a GPU without one (pre-Volta) is rejected at start-up.
  unsigned long long mj = 0;
  if (nvmlReturn_t r = api->total_energy(device, &mj); r != NVML_SUCCESS) {
    return fail_after_init(absl::StrCat(gpu, " has no total-energy counter: ", api->Error(r)));
  }
  std::vector<std::string> about;
  char name[96] = {};
  if (api->get_name && api->get_name(device, name, sizeof(name)) == NVML_SUCCESS) about.push_back(name);
  unsigned int index = 0;
  if (by_bus_id && api->get_index && api->get_index(device, &index) == NVML_SUCCESS) {
    about.push_back(absl::StrCat("NVML index ", index));
  }
  std::string description = gpu;
  if (!about.empty()) absl::StrAppend(&description, " (", absl::StrJoin(about, ", "), ")");
  return std::unique_ptr<NvmlEnergyMeter>(
      new NvmlEnergyMeter(lib, std::move(api), device, std::move(description)));
}

NvmlEnergyMeter::NvmlEnergyMeter(void* library, std::unique_ptr<Api> api, void* device,
                                 std::string description)
    : library_(library), api_(std::move(api)), device_(device), description_(std::move(description)) {}

NvmlEnergyMeter::~NvmlEnergyMeter() {
  api_->shutdown();
  dlclose(library_);
}

absl::StatusOr<double> NvmlEnergyMeter::ReadJoules() {
  unsigned long long mj = 0;
  if (nvmlReturn_t r = api_->total_energy(device_, &mj); r != NVML_SUCCESS) {
    return absl::UnavailableError(
        absl::StrCat("nvmlDeviceGetTotalEnergyConsumption(", description_, "): ", api_->Error(r)));
  }
  // The driver's counter is 64-bit millijoules since it loaded: monotonic as is.
  return static_cast<double>(mj) / 1000.0;
}

absl::StatusOr<double> NvmlEnergyMeter::ReadPowerWatts() {
  absl::MutexLock lock(&mu_);
  if (instant_power_works_ && api_->field_values) {
    nvmlFieldValue_t f{};
    f.fieldId = NVML_FI_DEV_POWER_INSTANT;
    const nvmlReturn_t r = api_->field_values(device_, 1, &f);
    if (r == NVML_SUCCESS && f.nvmlReturn == NVML_SUCCESS) {
      const double mw = FieldAsDouble(f);
      if (mw >= 0) return mw / 1000.0;
    }
    // Older drivers do not know field 186; do not ask again on every read.
    instant_power_works_ = false;
  }
  if (!api_->power_usage) {
    return absl::UnimplementedError(absl::StrCat(description_, ": NVML has no power reading"));
  }
  unsigned int mw = 0;
  if (nvmlReturn_t r = api_->power_usage(device_, &mw); r != NVML_SUCCESS) {
    return absl::UnavailableError(
        absl::StrCat("nvmlDeviceGetPowerUsage(", description_, "): ", api_->Error(r)));
  }
  return mw / 1000.0;
}

}  // namespace joule::telemetry
