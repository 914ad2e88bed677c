// Runtime choice of the instruction set used by the CPU kernels (internal).
//
// Kernels are built for several ISAs in separate translation units and the
// best one the CPU supports is picked at run time, so one binary runs on
// AVX-512, AVX2-only and plain x86-64 machines. JOULE_CPU_ISA=scalar|avx2|avx512
// (read once) caps the choice; tests cap it programmatically to cover every path.
#pragma once

namespace joule::kernels::cpu {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// The best ISA this CPU (and this build) supports.
Isa DetectedIsa();

// The ISA kernels use now: DetectedIsa() capped by JOULE_CPU_ISA and by
// SetIsaCapForTesting.
Isa ActiveIsa();

// Caps ActiveIsa() at `cap` (never raises it above DetectedIsa()); pass
// Isa::kAvx512 to remove the cap. Not for production code.
void SetIsaCapForTesting(Isa cap);

const char* IsaName(Isa isa);

}  // namespace joule::kernels::cpu
