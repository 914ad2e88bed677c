#include "kernels/cpu/attention.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels/cpu/attention_internal.h"
#include "kernels/cpu/attention_item.h"
#include "kernels/cpu/cpu_isa.h"
#include "kernels/cpu/simd_scalar.h"

namespace joule::kernels::cpu {
namespace {

using AttendFn = void (*)(const AttentionItem&);

AttendFn SelectAttendFn() {
  switch (ActiveIsa()) {
#if defined(JOULE_CPU_X86)
    case Isa::kAvx512: return &AttendAvx512;
    case Isa::kAvx2: return &AttendAvx2;
#endif
    default: return &AttendScalar;
  }
}

}  // namespace

void AttendScalar(const AttentionItem& a) { AttendImpl<Scalar>(a); }

void LaunchKvCacheWrite(const KvCacheWriteParams& p, CpuStream stream) {
  const int64_t row = static_cast<int64_t>(p.num_kv_heads) * p.head_dim;
  ParallelFor(stream, p.tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = p.slots[t];
      if (slot < 0) continue;  // padding token (vLLM's convention): nothing to store
      std::memcpy(static_cast<float*>(p.k_cache) + slot * row, p.k + t * row, sizeof(float) * row);
      if (p.v == nullptr) continue;  // MLA: the latent row is both
      std::memcpy(static_cast<float*>(p.v_cache) + slot * row, p.v + t * row, sizeof(float) * row);
    }
  });
}

void LaunchPagedAttention(const PagedAttentionParams& p, CpuStream stream) {
  if (p.num_seqs <= 0 || p.num_kv_heads <= 0) return;
  const int32_t row0 = p.query_start[0];
  const int64_t rows = p.query_start[p.num_seqs] - row0;
  if (rows <= 0) return;
  const int group = p.num_q_heads / p.num_kv_heads;
  const int hd = p.head_dim;
  const int vd = p.v_head_dim > 0 ? p.v_head_dim : hd;
  const int64_t kv_stride = static_cast<int64_t>(p.num_kv_heads) * hd;

  // Sequence of each query row, so a flat item index maps to (row, KV head).
  std::vector<int32_t> row_seq(rows);
  for (int s = 0; s < p.num_seqs; ++s) {
    for (int32_t r = p.query_start[s]; r < p.query_start[s + 1]; ++r) row_seq[r - row0] = s;
  }
  const AttendFn attend = SelectAttendFn();

  ParallelFor(stream, rows * p.num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> scratch;
    thread_local std::vector<int64_t> key_rows;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / p.num_kv_heads;
      const int h = static_cast<int>(item % p.num_kv_heads);
      const int s = row_seq[r];
      const int64_t q_len = p.query_start[s + 1] - p.query_start[s];
      const int64_t i = r + row0 - p.query_start[s];
      const int64_t pos = p.context_lens[s] - q_len + i;  // this query's position

      AttentionItem a;
      a.q = p.q + (r + row0) * p.num_q_heads * static_cast<int64_t>(hd) + h * group * hd;
      a.out = p.out + (r + row0) * p.num_q_heads * static_cast<int64_t>(vd) + h * group * vd;
      a.group = group;
      a.head_dim = hd;
      a.v_dim = vd;
      a.scale = p.scale;
      a.k_cache = static_cast<const float*>(p.k_cache) + h * hd;
      a.v_cache = static_cast<const float*>(p.v_cache) + h * hd;
      a.kv_stride = kv_stride;
      a.block_size = p.block_size;
      a.block_table = p.block_tables + static_cast<int64_t>(s) * p.max_blocks_per_seq;
      a.key_end = pos + 1;
      a.key_begin = p.sliding_window > 0 ? std::max<int64_t>(0, a.key_end - p.sliding_window) : 0;
      const int64_t nkeys = std::max<int64_t>(0, a.key_end - a.key_begin);
      scratch.resize(static_cast<size_t>(group) * (nkeys + 1));
      a.scores = scratch.data();
      key_rows.resize(static_cast<size_t>(nkeys));
      a.rows = key_rows.data();
      attend(a);
    }
  });
}

}  // namespace joule::kernels::cpu
