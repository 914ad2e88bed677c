// Causal grouped-query attention over a paged KV cache (F32) on the CPU.
#pragma once

#include <cstdint>

#include "kernels/cpu/thread_pool.h"
#include "kernels/params/attention.h"

namespace joule::kernels::cpu {

using ::joule::kernels::KvCacheWriteParams;
using ::joule::kernels::PagedAttentionParams;

// F32 caches only (cache_type kF32); the parameter structs are in
// kernels/params/attention.h.

void LaunchKvCacheWrite(const KvCacheWriteParams& p, CpuStream stream);

void LaunchPagedAttention(const PagedAttentionParams& p, CpuStream stream);

}  // namespace joule::kernels::cpu
