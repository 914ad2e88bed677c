// The per-ISA attention entry points behind LaunchPagedAttention (internal).
#pragma once

#include <cstdint>

namespace joule::kernels::cpu {

// One query token against one KV head: the `group` query heads that share the
// KV head (GQA) are done together so every key and value row is read once.
// Plain types only: this crosses from ISA-specific translation units.
struct AttentionItem {
  const float* q = nullptr;  // [group, head_dim]
  float* out = nullptr;      // [group, v_dim]
  int group = 1;
  int head_dim = 0;
  int v_dim = 0;  // a value row: the first v_dim elements of its cache row
  float scale = 1.0f;
  // Key/value row of cache slot s: k_cache + s * kv_stride (already offset to the head).
  const float* k_cache = nullptr;
  const float* v_cache = nullptr;
  int64_t kv_stride = 0;
  int block_size = 0;
  const int32_t* block_table = nullptr;  // this sequence's blocks
  int64_t key_begin = 0;                 // attends to positions [key_begin, key_end)
  int64_t key_end = 0;
  float* scores = nullptr;  // scratch [group * (key_end - key_begin) + group]
  int64_t* rows = nullptr;  // scratch [key_end - key_begin]
};

void AttendScalar(const AttentionItem& a);
#if defined(JOULE_CPU_X86)
void AttendAvx2(const AttentionItem& a);
void AttendAvx512(const AttentionItem& a);
#endif

}  // namespace joule::kernels::cpu
