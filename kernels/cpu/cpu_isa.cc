#include "kernels/cpu/cpu_isa.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

namespace joule::kernels::cpu {
namespace {

Isa Detect() {
#if defined(JOULE_CPU_X86)
  __builtin_cpu_init();
  // The AVX-512 kernels use BW/VL forms (16-bit masked loads, 256-bit ops).
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    return Isa::kAvx2;
  }
#endif
  return Isa::kScalar;
}

Isa EnvCap() {
  const char* v = std::getenv("JOULE_CPU_ISA");
  if (v == nullptr) return Isa::kAvx512;
  if (std::strcmp(v, "scalar") == 0) return Isa::kScalar;
  if (std::strcmp(v, "avx2") == 0) return Isa::kAvx2;
  return Isa::kAvx512;
}

std::atomic<int> test_cap{static_cast<int>(Isa::kAvx512)};

}  // namespace

Isa DetectedIsa() {
  static const Isa isa = Detect();
  return isa;
}

Isa ActiveIsa() {
  static const Isa base = std::min(DetectedIsa(), EnvCap());
  return std::min(base, static_cast<Isa>(test_cap.load(std::memory_order_relaxed)));
}

void SetIsaCapForTesting(Isa cap) { test_cap.store(static_cast<int>(cap), std::memory_order_relaxed); }

const char* IsaName(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
  }
  return "?";
}

}  // namespace joule::kernels::cpu
