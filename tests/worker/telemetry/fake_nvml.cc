// A stand-in for libnvidia-ml.so.1 with the entry points NvmlEnergyMeter uses,
// so the dlopen/dlsym path and the power fallback are tested without a GPU.
// The test drives it through the FakeNvml* functions (same dlopen handle).
#include <cstdint>

namespace {
unsigned long long g_energy_mj = 5000;
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
}  // namespace

extern "C" {
void FakeNvmlSetEnergyMj(unsigned long long mj) { g_energy_mj = mj; }
void FakeNvmlSetInstantField(bool supported) { g_instant_field = supported; }
void FakeNvmlSetInitResult(int r) { g_init_result = r; }
int FakeNvmlFieldCalls() { return g_field_calls; }

int nvmlInit_v2() { return g_init_result; }
int nvmlShutdown() { return 0; }
const char* nvmlErrorString(int r) { return r == 0 ? "Success" : "Fake NVML error"; }
int nvmlDeviceGetHandleByIndex_v2(unsigned int index, void** device) {
  if (index != 0) return 2;  // NVML_ERROR_INVALID_ARGUMENT
  static int dev;
  *device = &dev;
  return 0;
}
int nvmlDeviceGetName(void*, char* name, unsigned int len) {
  const char kName[] = "Fake GPU";
  for (unsigned int i = 0; i < len && i < sizeof(kName); ++i) name[i] = kName[i];
  return 0;
}
int nvmlDeviceGetTotalEnergyConsumption(void*, unsigned long long* mj) {
  *mj = g_energy_mj;
  return 0;
}
int nvmlDeviceGetFieldValues(void*, int count, FieldValue* values) {
  ++g_field_calls;
  for (int i = 0; i < count; ++i) {
    if (g_instant_field && values[i].fieldId == 186) {
      values[i].nvmlReturn = 0;
      values[i].valueType = 1;  // unsigned int, milliwatts
      values[i].value.uiVal = 312500;
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
