// A stand-in for libnvidia-ml.so.1 with the entry points NvmlEnergyMeter uses,
// so the dlopen/dlsym path, the lookup by index and by PCI bus id, and the power
// fallback are tested without a GPU. Two GPUs with their own counters and bus ids,
// so a test can tell which one a meter reads. The test drives it through the
// FakeNvml* functions (same dlopen handle).
#include <cstring>

namespace {

struct FakeGpu {
  const char* name;
  const char* bus_id;  // as NVML spells it
  unsigned long long energy_mj;
  unsigned int instant_mw;
};
FakeGpu g_gpus[] = {
    {"Fake GPU", "00000000:1B:00.0", 5000, 312500},
    {"Fake GPU B", "00000000:3D:00.0", 90000, 420000},
};
constexpr unsigned int kGpus = sizeof(g_gpus) / sizeof(g_gpus[0]);
bool g_instant_field = true;
int g_init_result = 0;
int g_field_calls = 0;

struct FieldValue {  // nvmlFieldValue_t
  unsigned int fieldId;
  unsigned int scopeId;
  long long timestamp;
  long long latencyUsec;
  int valueType;
  int nvmlReturn;
  union {
    double dVal;
    unsigned int uiVal;
    unsigned long long ullVal;
  } value;
};

FakeGpu* Gpu(void* device) { return static_cast<FakeGpu*>(device); }

}  // namespace

extern "C" {
// GPU 0's counter (the one index 0 and bus id 00000000:1B:00.0 read).
void FakeNvmlSetEnergyMj(unsigned long long mj) { g_gpus[0].energy_mj = mj; }
void FakeNvmlSetGpuEnergyMj(unsigned int index, unsigned long long mj) {
  if (index < kGpus) g_gpus[index].energy_mj = mj;
}
void FakeNvmlSetInstantField(bool supported) { g_instant_field = supported; }
void FakeNvmlSetInitResult(int r) { g_init_result = r; }
int FakeNvmlFieldCalls() { return g_field_calls; }

int nvmlInit_v2() { return g_init_result; }
int nvmlShutdown() { return 0; }
const char* nvmlErrorString(int r) {
  switch (r) {
    case 0: return "Success";
    case 2: return "Invalid Argument";
    case 6: return "Not Found";
    default: return "Fake NVML error";
  }
}
int nvmlDeviceGetHandleByIndex_v2(unsigned int index, void** device) {
  if (index >= kGpus) return 2;  // NVML_ERROR_INVALID_ARGUMENT
  *device = &g_gpus[index];
  return 0;
}
// The real library also takes other spellings; the meter always passes NVML's own.
int nvmlDeviceGetHandleByPciBusId_v2(const char* bus_id, void** device) {
  for (FakeGpu& gpu : g_gpus) {
    if (std::strcmp(gpu.bus_id, bus_id) == 0) {
      *device = &gpu;
      return 0;
    }
  }
  return 6;  // NVML_ERROR_NOT_FOUND
}
int nvmlDeviceGetIndex(void* device, unsigned int* index) {
  *index = static_cast<unsigned int>(Gpu(device) - g_gpus);
  return 0;
}
int nvmlDeviceGetName(void* device, char* name, unsigned int len) {
  if (len == 0) return 2;
  std::strncpy(name, Gpu(device)->name, len - 1);
  name[len - 1] = '\0';
  return 0;
}
int nvmlDeviceGetTotalEnergyConsumption(void* device, unsigned long long* mj) {
  *mj = Gpu(device)->energy_mj;
  return 0;
}
int nvmlDeviceGetFieldValues(void* device, int count, FieldValue* values) {
  ++g_field_calls;
  for (int i = 0; i < count; ++i) {
    if (g_instant_field && values[i].fieldId == 186) {
      values[i].nvmlReturn = 0;
      values[i].valueType = 1;  // unsigned int, milliwatts
      values[i].value.uiVal = Gpu(device)->instant_mw;
    } else {
      values[i].nvmlReturn = 3;  // NVML_ERROR_NOT_SUPPORTED
    }
  }
  return 0;
}
int nvmlDeviceGetPowerUsage(void*, unsigned int* mw) {
  *mw = 150000;
  return 0;
}
}
