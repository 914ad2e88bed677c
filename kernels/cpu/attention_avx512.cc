// Attention items for AVX-512 CPUs (this file is compiled with AVX-512 flags).
#include "kernels/cpu/attention_internal.h"
#include "kernels/cpu/attention_item.h"
#include "kernels/cpu/simd_avx512.h"

namespace joule::kernels::cpu {

void AttendAvx512(const AttentionItem& a) { AttendImpl<Avx512>(a); }

}  // namespace joule::kernels::cpu
