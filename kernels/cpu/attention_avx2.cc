// Attention items for AVX2 + FMA CPUs (this file is compiled with AVX2 flags).
#include "kernels/cpu/attention_internal.h"
#include "kernels/cpu/attention_item.h"
#include "kernels/cpu/simd_avx2.h"

namespace joule::kernels::cpu {

void AttendAvx2(const AttentionItem& a) { AttendImpl<Avx2>(a); }

}  // namespace joule::kernels::cpu
