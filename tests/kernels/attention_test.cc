#include "kernels/cpu/attention.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <tuple>
#include <vector>

#include "tests/kernels/kernel_test_util.h"

namespace joule::kernels::cpu {
namespace {

using testing::RandomFloats;

struct SeqSpec {
  int context_len;
  int q_len;  // the last q_len tokens of the context are queries
};

struct Shape {
  int block_size;
  int num_kv_heads;
  int group;  // query heads per KV head
  int head_dim;
  int sliding_window;
};

// Builds a paged cache through LaunchKvCacheWrite (shuffled physical blocks),
// runs paged attention and compares with dense causal attention in double.
void RunAndCheck(const std::vector<SeqSpec>& seqs, const Shape& s, CpuStream stream,
                 float q_scale = 1.0f) {
  const int hd = s.head_dim, nkv = s.num_kv_heads, nq = nkv * s.group;
  const int64_t kv_row = static_cast<int64_t>(nkv) * hd;
  int max_blocks = 0, total_blocks = 0, total_q = 0;
  for (const auto& q : seqs) {
    const int b = (q.context_len + s.block_size - 1) / s.block_size;
    max_blocks = std::max(max_blocks, b);
    total_blocks += b;
    total_q += q.q_len;
  }
  // Physical blocks in shuffled order, plus spare ones that must not be read.
  const int num_blocks = total_blocks + 3;
  std::vector<int32_t> physical(num_blocks);
  std::iota(physical.begin(), physical.end(), 0);
  std::shuffle(physical.begin(), physical.end(), std::mt19937(42));
  std::vector<int32_t> block_tables(seqs.size() * max_blocks, -1);
  // NaN everywhere a correct kernel must not look.
  std::vector<float> k_cache(num_blocks * s.block_size * kv_row, std::nanf(""));
  std::vector<float> v_cache(k_cache.size(), std::nanf(""));

  std::vector<std::vector<float>> dense_k, dense_v;  // [context, nkv, hd] per sequence
  int next_block = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const int ctx = seqs[i].context_len;
    dense_k.push_back(RandomFloats(ctx * kv_row, 1000 + i));
    dense_v.push_back(RandomFloats(ctx * kv_row, 2000 + i));
    std::vector<int64_t> slots(ctx);
    for (int t = 0; t < ctx; ++t) {
      if (t % s.block_size == 0) block_tables[i * max_blocks + t / s.block_size] = physical[next_block++];
      slots[t] = static_cast<int64_t>(block_tables[i * max_blocks + t / s.block_size]) * s.block_size +
                 t % s.block_size;
    }
    KvCacheWriteParams w;
    w.k = dense_k.back().data();
    w.v = dense_v.back().data();
    w.slots = slots.data();
    w.tokens = ctx;
    w.num_kv_heads = nkv;
    w.head_dim = hd;
    w.k_cache = k_cache.data();
    w.v_cache = v_cache.data();
    LaunchKvCacheWrite(w, stream);
  }

  auto q = RandomFloats(static_cast<size_t>(total_q) * nq * hd, 77, -q_scale, q_scale);
  std::vector<float> out(q.size(), std::nanf(""));
  std::vector<int32_t> query_start = {0}, context_lens;
  for (const auto& sq : seqs) {
    query_start.push_back(query_start.back() + sq.q_len);
    context_lens.push_back(sq.context_len);
  }
  PagedAttentionParams p;
  p.q = q.data();
  p.out = out.data();
  p.num_q_heads = nq;
  p.num_kv_heads = nkv;
  p.head_dim = hd;
  p.scale = 1.0f / std::sqrt(static_cast<float>(hd));
  p.k_cache = k_cache.data();
  p.v_cache = v_cache.data();
  p.block_size = s.block_size;
  p.num_seqs = static_cast<int>(seqs.size());
  p.query_start = query_start.data();
  p.context_lens = context_lens.data();
  p.block_tables = block_tables.data();
  p.max_blocks_per_seq = max_blocks;
  p.sliding_window = s.sliding_window;
  LaunchPagedAttention(p, stream);

  for (size_t si = 0; si < seqs.size(); ++si) {
    const int ctx = seqs[si].context_len, ql = seqs[si].q_len;
    for (int i = 0; i < ql; ++i) {
      const int pos = ctx - ql + i;
      const int first = s.sliding_window > 0 ? std::max(0, pos + 1 - s.sliding_window) : 0;
      const int row = query_start[si] + i;
      for (int h = 0; h < nq; ++h) {
        const int kvh = h / s.group;
        const float* qv = q.data() + (static_cast<int64_t>(row) * nq + h) * hd;
        std::vector<double> score(pos + 1 - first);
        double mx = -INFINITY;
        for (int j = first; j <= pos; ++j) {
          const float* kv = dense_k[si].data() + j * kv_row + kvh * hd;
          double d = 0.0;
          for (int e = 0; e < hd; ++e) d += static_cast<double>(qv[e]) * kv[e];
          score[j - first] = d * p.scale;
          mx = std::max(mx, score[j - first]);
        }
        double sum = 0.0;
        for (auto& x : score) sum += (x = std::exp(x - mx));
        for (int e = 0; e < hd; ++e) {
          double ref = 0.0;
          for (int j = first; j <= pos; ++j)
            ref += score[j - first] * dense_v[si][j * kv_row + kvh * hd + e];
          ref /= sum;
          // F32 dot products and softmax: scores are off by ~hd * 2^-24 * |q||k|
          // (times the scale), which moves the O(1) output by well under 1e-5.
          const float got = out[(static_cast<int64_t>(row) * nq + h) * hd + e];
          ASSERT_NEAR(got, ref, 1e-5 * (1.0 + q_scale)) << "seq " << si << " q " << i << " head " << h << " dim " << e;
        }
      }
    }
  }
}

// (ISA, threads, block size, GQA group, sliding window)
using AttnParam = std::tuple<Isa, int, int, int, int>;

class PagedAttentionTest : public ::testing::TestWithParam<AttnParam> {
 protected:
  void SetUp() override {
    SetIsaCapForTesting(std::get<0>(GetParam()));
    if (std::get<1>(GetParam()) > 0) pool_ = std::make_unique<ThreadPool>(std::get<1>(GetParam()));
  }
  void TearDown() override { SetIsaCapForTesting(Isa::kAvx512); }
  CpuStream stream() const { return CpuStream{pool_.get()}; }
  Shape shape(int head_dim) const {
    return Shape{std::get<2>(GetParam()), 2, std::get<3>(GetParam()), head_dim, std::get<4>(GetParam())};
  }

 private:
  std::unique_ptr<ThreadPool> pool_;
};

TEST_P(PagedAttentionTest, MixedPrefillChunkAndDecodeMatchDenseReference) {
  // Full prefill, decode, a prefill chunk after cached context, a lone token.
  const std::vector<SeqSpec> seqs = {{37, 37}, {50, 1}, {20, 5}, {1, 1}, {33, 1}};
  RunAndCheck(seqs, shape(64), stream());
}

TEST_P(PagedAttentionTest, HeadDimWithVectorTail) {
  // 36 = 2*16 + 4 = 4*8 + 4: exercises the masked tails of both vector widths.
  RunAndCheck({{19, 4}, {9, 1}}, shape(36), stream());
}

TEST_P(PagedAttentionTest, LargeLogitsStayFinite) {
  // |q.k| * scale reaches hundreds: exp would overflow without the max shift.
  RunAndCheck({{40, 3}}, shape(64), stream(), /*q_scale=*/60.0f);
}

INSTANTIATE_TEST_SUITE_P(
    All, PagedAttentionTest,
    ::testing::Combine(::testing::ValuesIn(testing::SupportedIsas()), ::testing::Values(0, 2),
                       ::testing::Values(1, 4, 16), ::testing::Values(1, 2, 4),
                       ::testing::Values(0, 7)),
    [](const ::testing::TestParamInfo<AttnParam>& info) {
      return std::string(IsaName(std::get<0>(info.param))) + "_t" +
             std::to_string(std::get<1>(info.param)) + "_bs" + std::to_string(std::get<2>(info.param)) +
             "_gqa" + std::to_string(std::get<3>(info.param)) + "_win" +
             std::to_string(std::get<4>(info.param));
    });

// More query heads per KV head than one register block holds (8).
TEST(PagedAttentionWideGroupTest, TwelveQueryHeadsPerKvHead) {
  ThreadPool pool(2);
  RunAndCheck({{30, 6}, {70, 1}}, Shape{4, 1, 12, 64, 0}, CpuStream{&pool});
}

// MLA's latent cache: only keys are written; v_cache is neither read nor written.
TEST(KvCacheWriteTest, NullValuesWriteKeysOnly) {
  const int nkv = 2, hd = 6, num_slots = 9;
  const int64_t row = nkv * hd;
  const std::vector<int64_t> slots = {4, -1, 0, 7};  // -1: padding, stores nothing
  const auto k = RandomFloats(slots.size() * row, 51);
  const auto k_cache0 = RandomFloats(num_slots * row, 52);
  const auto v_cache0 = RandomFloats(num_slots * row, 53);
  auto k_cache = k_cache0, v_cache = v_cache0;
  KvCacheWriteParams w;
  w.k = k.data();
  w.v = nullptr;
  w.slots = slots.data();
  w.tokens = static_cast<int64_t>(slots.size());
  w.num_kv_heads = nkv;
  w.head_dim = hd;
  w.k_cache = k_cache.data();
  w.v_cache = v_cache.data();
  LaunchKvCacheWrite(w, CpuStream{});
  EXPECT_EQ(v_cache, v_cache0);
  auto want = k_cache0;
  for (size_t t = 0; t < slots.size(); ++t) {
    if (slots[t] >= 0) std::copy_n(k.begin() + t * row, row, want.begin() + slots[t] * row);
  }
  EXPECT_EQ(k_cache, want);
}

// Multi-head latent attention's absorbed form: one KV head whose key row is
// [latent (R), rope key] and whose value is that row's latent, from one cache
// (v_cache == k_cache), with values narrower than keys (v_head_dim = R).
class LatentAttentionTest : public testing::IsaThreadsTest {};

TEST_P(LatentAttentionTest, NarrowValuesFromTheKeyCacheMatchDenseReference) {
  // 52 = 3*16+4 = 6*8+4 and 40 = 2*16+8: vector tails in both dot products and
  // values. 10 query heads: one block of 8 and one of 2.
  const int R = 40, hd = R + 12, nq = 10, block_size = 4;
  const std::vector<SeqSpec> seqs = {{23, 23}, {17, 1}, {40, 6}, {1, 1}, {9, 2}};
  int max_blocks = 0, total_blocks = 0, total_q = 0;
  for (const auto& sq : seqs) {
    const int b = (sq.context_len + block_size - 1) / block_size;
    max_blocks = std::max(max_blocks, b);
    total_blocks += b;
    total_q += sq.q_len;
  }
  const int num_blocks = total_blocks + 2;  // spare blocks, never read
  std::vector<int32_t> physical(num_blocks);
  std::iota(physical.begin(), physical.end(), 0);
  std::shuffle(physical.begin(), physical.end(), std::mt19937(7));
  std::vector<int32_t> block_tables(seqs.size() * max_blocks, -1);
  std::vector<float> cache(static_cast<size_t>(num_blocks) * block_size * hd, std::nanf(""));

  std::vector<std::vector<float>> dense;  // [context, hd] per sequence
  int next_block = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const int ctx = seqs[i].context_len;
    dense.push_back(RandomFloats(static_cast<size_t>(ctx) * hd, 300 + i));
    std::vector<int64_t> slots(ctx);
    for (int t = 0; t < ctx; ++t) {
      int32_t& block = block_tables[i * max_blocks + t / block_size];
      if (t % block_size == 0) block = physical[next_block++];
      slots[t] = static_cast<int64_t>(block) * block_size + t % block_size;
    }
    KvCacheWriteParams w;
    w.k = dense.back().data();
    w.slots = slots.data();
    w.tokens = ctx;
    w.num_kv_heads = 1;
    w.head_dim = hd;
    w.k_cache = cache.data();
    LaunchKvCacheWrite(w, stream());
  }

  const auto q = RandomFloats(static_cast<size_t>(total_q) * nq * hd, 99, -2.0f, 2.0f);
  // Room for head_dim-wide rows, but only [tokens, nq, R] may be written.
  const int64_t out_size = static_cast<int64_t>(total_q) * nq * R;
  std::vector<float> out(static_cast<size_t>(total_q) * nq * hd, 12345.0f);
  std::fill(out.begin(), out.begin() + out_size, std::nanf(""));
  std::vector<int32_t> query_start = {0}, context_lens;
  for (const auto& sq : seqs) {
    query_start.push_back(query_start.back() + sq.q_len);
    context_lens.push_back(sq.context_len);
  }
  PagedAttentionParams p;
  p.q = q.data();
  p.out = out.data();
  p.num_q_heads = nq;
  p.num_kv_heads = 1;
  p.head_dim = hd;
  p.v_head_dim = R;
  p.scale = 1.0f / std::sqrt(static_cast<float>(hd));
  p.k_cache = cache.data();
  p.v_cache = cache.data();
  p.block_size = block_size;
  p.num_seqs = static_cast<int>(seqs.size());
  p.query_start = query_start.data();
  p.context_lens = context_lens.data();
  p.block_tables = block_tables.data();
  p.max_blocks_per_seq = max_blocks;
  LaunchPagedAttention(p, stream());

  for (size_t si = 0; si < seqs.size(); ++si) {
    const int ctx = seqs[si].context_len, ql = seqs[si].q_len;
    const float* kv = dense[si].data();
    for (int i = 0; i < ql; ++i) {
      const int pos = ctx - ql + i, row = query_start[si] + i;
      for (int h = 0; h < nq; ++h) {
        const float* qv = q.data() + (static_cast<int64_t>(row) * nq + h) * hd;
        std::vector<double> w(pos + 1);
        double mx = -INFINITY, sum = 0.0;
        for (int j = 0; j <= pos; ++j) {
          double d = 0.0;
          for (int e = 0; e < hd; ++e) d += double(qv[e]) * kv[j * hd + e];  // the whole row
          mx = std::max(mx, w[j] = d * p.scale);
        }
        for (auto& x : w) sum += (x = std::exp(x - mx));
        for (int e = 0; e < R; ++e) {
          double ref = 0.0;
          for (int j = 0; j <= pos; ++j) ref += w[j] * kv[j * hd + e];  // the latent only
          ASSERT_NEAR(out[(static_cast<int64_t>(row) * nq + h) * R + e], ref / sum, 2e-5)
              << "seq " << si << " q " << i << " head " << h << " dim " << e;
        }
      }
    }
  }
  for (size_t i = out_size; i < out.size(); ++i) ASSERT_EQ(out[i], 12345.0f) << "past the output " << i;
}

JOULE_INSTANTIATE_ISA_THREADS(LatentAttentionTest);

}  // namespace
}  // namespace joule::kernels::cpu
