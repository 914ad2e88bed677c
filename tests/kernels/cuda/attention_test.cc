// The CUDA paged attention and KV cache write against kernels::cpu on the same
// data. The cache is filled through the CUDA LaunchKvCacheWrite (scrambled
// physical blocks, padding tokens with negative slots, NaN in every slot no
// sequence owns); the CPU reference gets an F32 cache written with the same
// slots from the same rows, rounded to BF16 first when the GPU cache is BF16,
// so both attend over identical numbers. Multi-head latent attention (MLA)
// cases write keys only into one cache that is both k_cache and v_cache, and
// read values as the first v_head_dim columns of each row.
//
// Tolerance: |got - want| <= 2e-5 * (1 + q_scale) + 1e-4 * |want|. Both sides
// compute in F32 and differ only in summation order (head_dim products, up to
// 5000 softmax terms, the split merge) and expf's last bit: the outputs are
// weighted means of values in [-1, 1], which that moves by about 1e-6. A key
// read from the wrong slot, a dropped tile or split, or a wrong rescale moves
// them by 1e-4 (one key in 5000) to O(1), and NaN from an unowned slot fails.
// Validation tests need no device; the others skip without one.
#include "kernels/cuda/attention.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/cpu/attention.h"
#include "kernels/cuda/attention_math.h"
#include "tests/kernels/cuda/cuda_test_util.h"

namespace joule::kernels::cuda {
namespace {

using ::testing::HasSubstr;

struct SeqSpec {
  int context_len;
  int q_len;  // the last q_len tokens of the context are queries
};

struct CacheShape {
  int num_kv_heads = 2;
  int head_dim = 64;
  int block_size = 16;
  DType cache_type = DType::kBF16;
  // MLA: one cache of latent rows (written without v) is k_cache and v_cache.
  bool latent = false;
};

struct AttentionCase {
  std::vector<SeqSpec> seqs;
  CacheShape cache;
  int group = 4;  // query heads per KV head
  int v_head_dim = 0;  // 0: head_dim
  int sliding_window = 0;
  int64_t max_context_len = 0;  // 0: max_blocks_per_seq * block_size
  int padding_rows = 0;         // query rows after the last sequence's (graph padding)
  int extra_table_columns = 0;  // block table wider than the longest context needs
  float q_scale = 1.f;
  bool expect_split = false;  // which path the case is for: split-K or one pass
};

// A paged cache on the device (cache_type) and its F32 twin for the CPU.
struct PagedCache {
  CacheShape shape;
  int max_blocks_per_seq = 0;
  std::vector<int32_t> block_tables;  // [num_seqs, max_blocks_per_seq], -1 where unused
  std::vector<float> host_k, host_v;  // NaN in unowned slots, like the device caches
  std::unique_ptr<DeviceBuffer<uint8_t>> k, v;  // v null when latent

  const float* host_values() const { return shape.latent ? host_k.data() : host_v.data(); }
  const void* device_values() const { return shape.latent ? k->get() : v->get(); }
};

// One launch's metadata on the host.
struct Batch {
  std::vector<int32_t> query_start = {0};
  std::vector<int32_t> context_lens;
  int64_t num_tokens = 0;  // query_start.back() plus padding rows
};

Batch MakeBatch(const std::vector<SeqSpec>& seqs, int padding_rows) {
  Batch batch;
  for (const SeqSpec& s : seqs) {
    batch.query_start.push_back(batch.query_start.back() + s.q_len);
    batch.context_lens.push_back(s.context_len);
  }
  batch.num_tokens = batch.query_start.back() + padding_rows;
  return batch;
}

float RoundThroughCache(float x, DType cache_type) {
  return cache_type == DType::kBF16 ? FromBf16(ToBf16(x)) : x;
}

std::unique_ptr<DeviceBuffer<uint8_t>> NanFilledDeviceBytes(size_t bytes) {
  auto buffer = std::make_unique<DeviceBuffer<uint8_t>>(bytes);
  EXPECT_EQ(cudaMemset(buffer->get(), 0xff, bytes), cudaSuccess);  // NaN in F32 and in BF16
  return buffer;
}

int ValueDim(const PagedAttentionParams& p) { return p.v_head_dim > 0 ? p.v_head_dim : p.head_dim; }

// Elements of out: [num_tokens, num_q_heads, v_head_dim].
size_t OutputSize(const PagedAttentionParams& p) {
  return static_cast<size_t>(p.num_tokens) * p.num_q_heads * ValueDim(p);
}

class CudaAttentionTest : public CudaKernelTest {
 protected:
  // Random keys and values for every context token of sequences of the given
  // lengths, in scrambled physical blocks (plus spare ones nobody owns),
  // written by the CUDA KvCacheWrite; every 5th row written is a padding token
  // (slot -1) whose huge values must land nowhere.
  void FillCache(const std::vector<int>& context_lens, const CacheShape& shape, int extra_columns,
                 PagedCache* cache) {
    cache->shape = shape;
    const int bs = shape.block_size;
    const int64_t row = static_cast<int64_t>(shape.num_kv_heads) * shape.head_dim;
    int total_blocks = 0, max_blocks = 0;
    for (int ctx : context_lens) {
      total_blocks += (ctx + bs - 1) / bs;
      max_blocks = std::max(max_blocks, (ctx + bs - 1) / bs);
    }
    cache->max_blocks_per_seq = std::max(1, max_blocks + extra_columns);
    const int num_blocks = total_blocks + 3;
    std::vector<int32_t> physical(num_blocks);
    std::iota(physical.begin(), physical.end(), 0);
    std::shuffle(physical.begin(), physical.end(), std::mt19937(42));
    cache->block_tables.assign(context_lens.size() * cache->max_blocks_per_seq, -1);

    std::vector<int64_t> slots;
    int next_block = 0;
    for (size_t s = 0; s < context_lens.size(); ++s) {
      int32_t* table = cache->block_tables.data() + s * cache->max_blocks_per_seq;
      for (int t = 0; t < context_lens[s]; ++t) {
        if (slots.size() % 5 == 4) slots.push_back(-1);
        if (t % bs == 0) table[t / bs] = physical[next_block++];
        slots.push_back(static_cast<int64_t>(table[t / bs]) * bs + t % bs);
      }
    }
    std::vector<float> k = RandomFloats(slots.size() * row, 1000 + slots.size());
    std::vector<float> v = RandomFloats(slots.size() * row, 2000 + slots.size());
    for (size_t t = 0; t < slots.size(); ++t) {
      if (slots[t] >= 0) continue;
      std::fill_n(k.begin() + t * row, row, 1e4f);
      std::fill_n(v.begin() + t * row, row, 1e4f);
    }

    const size_t cache_elements = static_cast<size_t>(num_blocks) * bs * row;
    const size_t cache_bytes = cache_elements * ElementBytes(shape.cache_type);
    cache->k = NanFilledDeviceBytes(cache_bytes);
    if (!shape.latent) cache->v = NanFilledDeviceBytes(cache_bytes);
    DeviceBuffer<float> d_k(k), d_v(v);
    DeviceBuffer<int64_t> d_slots(slots);
    // Latent: keys only, and no v_cache at all (as the MLA layer launches it).
    KvCacheWriteParams w{.k = d_k.get(), .v = shape.latent ? nullptr : d_v.get(),
                         .slots = d_slots.get(), .tokens = static_cast<int64_t>(slots.size()),
                         .num_kv_heads = shape.num_kv_heads, .head_dim = shape.head_dim,
                         .k_cache = cache->k->get(),
                         .v_cache = shape.latent ? nullptr : cache->v->get(),
                         .cache_type = shape.cache_type};
    const absl::Status written = LaunchKvCacheWrite(w, stream_);
    ASSERT_TRUE(written.ok()) << written;
    Sync();

    for (float& x : k) x = RoundThroughCache(x, shape.cache_type);
    for (float& x : v) x = RoundThroughCache(x, shape.cache_type);
    cache->host_k.assign(cache_elements, std::nanf(""));
    if (!shape.latent) cache->host_v.assign(cache_elements, std::nanf(""));
    w.k = k.data();
    w.v = shape.latent ? nullptr : v.data();
    w.slots = slots.data();
    w.k_cache = cache->host_k.data();
    w.v_cache = shape.latent ? nullptr : cache->host_v.data();
    w.cache_type = DType::kF32;
    kernels::cpu::LaunchKvCacheWrite(w, kernels::cpu::CpuStream{});
  }

  static PagedAttentionParams Params(const AttentionCase& c, const PagedCache& cache,
                                     const Batch& batch) {
    PagedAttentionParams p;
    p.num_q_heads = cache.shape.num_kv_heads * c.group;
    p.num_kv_heads = cache.shape.num_kv_heads;
    p.head_dim = cache.shape.head_dim;
    p.v_head_dim = c.v_head_dim;
    p.scale = 1.0f / std::sqrt(static_cast<float>(p.head_dim));
    p.cache_type = cache.shape.cache_type;
    p.block_size = cache.shape.block_size;
    p.num_seqs = static_cast<int>(batch.context_lens.size());
    p.max_blocks_per_seq = cache.max_blocks_per_seq;
    p.sliding_window = c.sliding_window;
    p.num_tokens = batch.num_tokens;
    p.max_context_len = c.max_context_len;
    return p;
  }

  // kernels::cpu over the F32 twin; rows it does not write stay 0.
  static std::vector<float> RunCpu(PagedAttentionParams p, const PagedCache& cache,
                                   const Batch& batch, const std::vector<float>& q) {
    std::vector<float> out(OutputSize(p), 0.f);
    p.q = q.data();
    p.out = out.data();
    p.k_cache = cache.host_k.data();
    p.v_cache = cache.host_values();
    p.cache_type = DType::kF32;
    p.query_start = batch.query_start.data();
    p.context_lens = batch.context_lens.data();
    p.block_tables = cache.block_tables.data();
    kernels::cpu::LaunchPagedAttention(p, kernels::cpu::CpuStream{});
    return out;
  }

  // The CUDA launch, with the output and workspace NaN-filled first so an
  // unwritten output or an unwritten partial shows.
  void RunGpu(PagedAttentionParams p, const PagedCache& cache, const Batch& batch,
              const std::vector<float>& q, std::vector<float>* out) {
    DeviceBuffer<float> d_q(q);
    const size_t out_size = OutputSize(p);
    auto d_out = NanFilledDeviceBytes(out_size * sizeof(float));
    DeviceBuffer<int32_t> d_query_start(batch.query_start), d_context_lens(batch.context_lens);
    DeviceBuffer<int32_t> d_tables(cache.block_tables);
    const size_t workspace_bytes = PagedAttentionWorkspaceBytes(p);
    auto workspace = NanFilledDeviceBytes(workspace_bytes);
    p.q = d_q.get();
    p.out = reinterpret_cast<float*>(d_out->get());
    p.k_cache = cache.k->get();
    p.v_cache = cache.device_values();
    p.query_start = d_query_start.get();
    p.context_lens = d_context_lens.get();
    p.block_tables = d_tables.get();
    p.workspace = workspace_bytes > 0 ? workspace->get() : nullptr;
    const absl::Status launched = LaunchPagedAttention(p, stream_);
    ASSERT_TRUE(launched.ok()) << launched;
    Sync();
    std::vector<uint8_t> bytes = d_out->Download();
    out->resize(out_size);
    std::memcpy(out->data(), bytes.data(), bytes.size());
  }

  void ExpectMatchesCpu(const AttentionCase& c) {
    std::vector<int> contexts;
    for (const SeqSpec& s : c.seqs) contexts.push_back(s.context_len);
    PagedCache cache;
    FillCache(contexts, c.cache, c.extra_table_columns, &cache);
    ASSERT_FALSE(HasFatalFailure());
    const Batch batch = MakeBatch(c.seqs, c.padding_rows);
    const PagedAttentionParams p = Params(c, cache, batch);
    const int64_t bound = c.max_context_len > 0
                              ? c.max_context_len
                              : static_cast<int64_t>(cache.max_blocks_per_seq) * p.block_size;
    ASSERT_EQ(NumAttentionSplits(p.num_tokens, p.num_q_heads, bound) > 1, c.expect_split)
        << "the case no longer exercises the path it is for";

    const std::vector<float> q =
        RandomFloats(static_cast<size_t>(batch.num_tokens) * p.num_q_heads * p.head_dim, 77,
                     -c.q_scale, c.q_scale);
    std::vector<float> got;
    RunGpu(p, cache, batch, q, &got);
    ASSERT_FALSE(HasFatalFailure());
    const std::vector<float> want = RunCpu(p, cache, batch, q);
    ExpectNear(got, want, 1e-4f, 2e-5f * (1.f + c.q_scale), "attention out");
    ExpectZeroRowsWithoutKeys(c, batch, p, got);
  }

  // Padding sequences (context 0) and rows after the last sequence: exactly 0.
  static void ExpectZeroRowsWithoutKeys(const AttentionCase& c, const Batch& batch,
                                        const PagedAttentionParams& p, const std::vector<float>& got) {
    const int64_t row = static_cast<int64_t>(p.num_q_heads) * ValueDim(p);
    std::vector<bool> empty(batch.num_tokens, false);
    for (size_t s = 0; s < c.seqs.size(); ++s) {
      for (int32_t t = batch.query_start[s]; t < batch.query_start[s + 1]; ++t) {
        empty[t] = c.seqs[s].context_len == 0;
      }
    }
    for (int64_t t = batch.query_start.back(); t < batch.num_tokens; ++t) empty[t] = true;
    for (int64_t t = 0; t < batch.num_tokens; ++t) {
      if (!empty[t]) continue;
      for (int64_t e = 0; e < row; ++e) {
        ASSERT_EQ(got[t * row + e], 0.f) << "row " << t << " has no key but element " << e;
      }
    }
  }
};

// ---------------------------------------------------------------------------
// GQA group x head_dim x cache type, through both paths
// ---------------------------------------------------------------------------

using ShapeParam = std::tuple<int, int, DType>;  // group, head_dim, cache type

class CudaAttentionShapeTest : public CudaAttentionTest,
                               public ::testing::WithParamInterface<ShapeParam> {
 protected:
  AttentionCase Case(std::vector<SeqSpec> seqs) const {
    AttentionCase c;
    c.seqs = std::move(seqs);
    c.group = std::get<0>(GetParam());
    c.cache.head_dim = std::get<1>(GetParam());
    c.cache.cache_type = std::get<2>(GetParam());
    return c;
  }
};

TEST_P(CudaAttentionShapeTest, PrefillChunksAndDecodeInOneBatch) {
  // Full prefill, decode, a chunk after cached context, a lone token, a
  // padding sequence (context 0) between real ones. Contexts <= 64: one pass.
  AttentionCase c = Case({{37, 37}, {50, 1}, {20, 5}, {1, 1}, {0, 1}, {33, 1}});
  ExpectMatchesCpu(c);
}

TEST_P(CudaAttentionShapeTest, LongContextsSplitTheKeys) {
  // Decode rows over thousands of keys and a 4-query chunk at the end of a
  // long context: few rows, so the keys are cut into splits.
  AttentionCase c = Case({{5000, 1}, {3000, 1}, {4100, 4}, {0, 1}, {700, 1}});
  c.expect_split = true;
  ExpectMatchesCpu(c);
}

INSTANTIATE_TEST_SUITE_P(
    All, CudaAttentionShapeTest,
    ::testing::Combine(::testing::Values(1, 4, 8), ::testing::Values(64, 128),
                       ::testing::Values(DType::kF32, DType::kBF16)),
    [](const ::testing::TestParamInfo<ShapeParam>& info) {
      return "gqa" + std::to_string(std::get<0>(info.param)) + "_hd" +
             std::to_string(std::get<1>(info.param)) + "_" + DTypeName(std::get<2>(info.param));
    });

// ---------------------------------------------------------------------------
// Windows, bounds, padding and the other shapes
// ---------------------------------------------------------------------------

TEST_F(CudaAttentionTest, SlidingWindowInOnePass) {
  AttentionCase c;
  c.seqs = {{37, 37}, {50, 1}, {20, 5}, {5, 3}};
  c.sliding_window = 7;
  ExpectMatchesCpu(c);
}

TEST_F(CudaAttentionTest, SlidingWindowAcrossSplits) {
  // 1000-key windows at the ends of long contexts, cut into splits.
  AttentionCase c;
  c.seqs = {{5000, 1}, {3000, 2}, {600, 1}};
  c.cache.head_dim = 128;
  c.sliding_window = 1000;
  c.expect_split = true;
  ExpectMatchesCpu(c);
}

TEST_F(CudaAttentionTest, MaxContextLenBeyondAnyContextLeavesSplitsEmpty) {
  // The bound asks for the most splits while every row has few keys: most
  // splits get none and must merge as nothing. Three graph-padding rows follow.
  AttentionCase c;
  c.seqs = {{37, 3}, {5, 1}, {0, 1}, {100, 1}};
  c.max_context_len = 1 << 16;
  c.padding_rows = 3;
  c.expect_split = true;
  ExpectMatchesCpu(c);
}

TEST_F(CudaAttentionTest, PaddingRowsInOnePass) {
  AttentionCase c;
  c.seqs = {{0, 1}, {20, 2}, {0, 2}};
  c.padding_rows = 5;
  ExpectMatchesCpu(c);
}

TEST_F(CudaAttentionTest, TinyModelHeadDims) {
  // The tiny presets (worker/tools/make_model.cc): head_dim 16 and 32, two
  // query heads per KV head, Mixtral's window of 16 with one KV head.
  for (int head_dim : {16, 32}) {
    SCOPED_TRACE(head_dim);
    AttentionCase c;
    c.seqs = {{30, 30}, {45, 1}, {12, 4}};
    c.cache.head_dim = head_dim;
    c.cache.cache_type = DType::kF32;
    c.group = 2;
    ExpectMatchesCpu(c);
    c.cache.num_kv_heads = 1;
    c.group = 4;
    c.sliding_window = 16;
    ExpectMatchesCpu(c);
  }
}

TEST_F(CudaAttentionTest, HeadDimsThatFillLanesPartlyOrTwice) {
  // 96: a kernel built for 128 with the top lanes masked; 256: two columns
  // per thread when adding values. Both with splits and in one pass.
  for (int head_dim : {96, 256}) {
    SCOPED_TRACE(head_dim);
    AttentionCase c;
    c.cache.head_dim = head_dim;
    c.seqs = {{40, 6}, {60, 1}};
    ExpectMatchesCpu(c);
    c.seqs = {{2000, 1}, {900, 1}};
    c.expect_split = true;
    ExpectMatchesCpu(c);
  }
}

TEST_F(CudaAttentionTest, WidestGroup) {
  AttentionCase c;
  c.group = kMaxAttentionGroup;
  c.cache.head_dim = 128;
  c.seqs = {{3000, 1}, {800, 2}};
  c.expect_split = true;
  ExpectMatchesCpu(c);
}

TEST_F(CudaAttentionTest, OddBlockSizeAndWideBlockTable) {
  AttentionCase c;
  c.cache.block_size = 3;
  c.extra_table_columns = 4;
  c.seqs = {{37, 37}, {50, 1}, {20, 5}};
  ExpectMatchesCpu(c);
}

TEST_F(CudaAttentionTest, LargeLogitsStayFinite) {
  // |q.k| * scale reaches the hundreds: exp overflows unless every step
  // subtracts the running max, in one pass and across splits.
  AttentionCase c;
  c.q_scale = 30.f;
  c.seqs = {{40, 3}, {33, 1}};
  ExpectMatchesCpu(c);
  c.seqs = {{3000, 1}, {1000, 1}};
  c.expect_split = true;
  ExpectMatchesCpu(c);
}

// ---------------------------------------------------------------------------
// Multi-head latent attention: one latent KV head, values narrower than keys
// ---------------------------------------------------------------------------

// MLA's absorbed form: cache rows of kv_lora_rank + qk_rope_head_dim written
// as keys only, values their first kv_lora_rank columns, every query head on
// the one KV head.
AttentionCase MlaCase(int kv_lora_rank, int rope_dim, int heads, DType cache_type) {
  AttentionCase c;
  c.cache.num_kv_heads = 1;
  c.cache.head_dim = kv_lora_rank + rope_dim;
  c.cache.cache_type = cache_type;
  c.cache.latent = true;
  c.group = heads;
  c.v_head_dim = kv_lora_rank;
  return c;
}

TEST_F(CudaAttentionTest, DeepSeekV3DecodeSplitsTheKeys) {
  // 128 heads over 576-wide rows, values their first 512: eight chunks of 16
  // query heads, each cutting long contexts into splits; a padding sequence.
  AttentionCase c = MlaCase(512, 64, 128, DType::kBF16);
  c.cache.block_size = 64;
  c.seqs = {{3000, 1}, {1500, 1}, {0, 1}, {700, 1}};
  c.expect_split = true;
  ExpectMatchesCpu(c);
}

TEST_F(CudaAttentionTest, DeepSeekV3PrefillInOnePass) {
  // Several sequences at once in scrambled blocks: a full prompt, decode rows,
  // a chunk after cached context, a padding sequence and graph-padding rows.
  AttentionCase c = MlaCase(512, 64, 128, DType::kBF16);
  c.seqs = {{37, 37}, {50, 1}, {20, 5}, {0, 1}, {33, 1}};
  c.padding_rows = 2;
  ExpectMatchesCpu(c);
  c.cache.cache_type = DType::kF32;
  ExpectMatchesCpu(c);
}

TEST_F(CudaAttentionTest, TinyAndMiniDeepSeekShapes) {
  // worker/tools/make_model.cc's deepseek_v3 presets: tiny (latent 32 + rope
  // 16, 4 heads) and mini (128 + 32, 8 heads), both cache types, both paths.
  struct Shape {
    int kv_lora_rank, rope_dim, heads;
  };
  for (const Shape& shape : {Shape{32, 16, 4}, Shape{128, 32, 8}}) {
    for (DType type : {DType::kF32, DType::kBF16}) {
      SCOPED_TRACE(testing::Message() << "row " << shape.kv_lora_rank + shape.rope_dim << " "
                                      << DTypeName(type));
      AttentionCase c = MlaCase(shape.kv_lora_rank, shape.rope_dim, shape.heads, type);
      c.seqs = {{37, 37}, {50, 1}, {20, 5}, {0, 1}, {33, 1}};
      ExpectMatchesCpu(c);
      c.seqs = {{2000, 1}, {900, 1}, {0, 1}};
      c.expect_split = true;
      ExpectMatchesCpu(c);
    }
  }
}

TEST_F(CudaAttentionTest, GroupsThatEndInAPartialChunk) {
  // 20 heads on the latent row: a chunk of 16 and one of 4. Then narrower
  // values in ordinary GQA (two KV heads, separate caches, 24 heads each).
  AttentionCase c = MlaCase(32, 16, 20, DType::kBF16);
  c.seqs = {{40, 6}, {60, 1}};
  ExpectMatchesCpu(c);
  c.seqs = {{2000, 1}, {900, 1}};
  c.expect_split = true;
  ExpectMatchesCpu(c);

  AttentionCase gqa;
  gqa.cache.head_dim = 128;
  gqa.v_head_dim = 64;
  gqa.group = 24;
  gqa.seqs = {{40, 6}, {60, 1}};
  ExpectMatchesCpu(gqa);
  gqa.seqs = {{2000, 1}, {900, 1}};
  gqa.expect_split = true;
  ExpectMatchesCpu(gqa);
}

// ---------------------------------------------------------------------------
// CUDA graphs: the launch reads metadata on the device only
// ---------------------------------------------------------------------------

TEST_F(CudaAttentionTest, CapturedLaunchReplaysWithNewMetadata) {
  AttentionCase c;
  c.cache.head_dim = 128;
  c.max_context_len = 1024;  // the graph's bound, fixed at capture: 3 rows x 8 heads split
  PagedCache cache;
  FillCache({600, 300, 40}, c.cache, 0, &cache);
  ASSERT_FALSE(HasFatalFailure());
  // Same row count, other metadata: a 2-query chunk at a shorter context, a
  // sequence without queries and a padding sequence.
  const Batch decode = MakeBatch({{600, 1}, {300, 1}, {40, 1}}, 0);
  const Batch replay = MakeBatch({{450, 2}, {300, 0}, {0, 1}}, 0);
  ASSERT_EQ(decode.num_tokens, replay.num_tokens);

  PagedAttentionParams p = Params(c, cache, decode);
  ASSERT_GT(NumAttentionSplits(p.num_tokens, p.num_q_heads, c.max_context_len), 1);
  const std::vector<float> q = RandomFloats(decode.num_tokens * p.num_q_heads * p.head_dim, 5);
  DeviceBuffer<float> d_q(q), d_out(q.size());
  DeviceBuffer<int32_t> d_query_start(decode.query_start), d_context_lens(decode.context_lens);
  DeviceBuffer<int32_t> d_tables(cache.block_tables);
  const size_t workspace_bytes = PagedAttentionWorkspaceBytes(p);
  DeviceBuffer<uint8_t> workspace(workspace_bytes);
  PagedAttentionParams device = p;
  device.q = d_q.get();
  device.out = d_out.get();
  device.k_cache = cache.k->get();
  device.v_cache = cache.v->get();
  device.query_start = d_query_start.get();
  device.context_lens = d_context_lens.get();
  device.block_tables = d_tables.get();
  device.workspace = workspace.get();

  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  const absl::Status captured = LaunchPagedAttention(device, stream_);
  ASSERT_EQ(cudaStreamEndCapture(stream_, &graph), cudaSuccess);
  ASSERT_TRUE(captured.ok()) << captured;
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);

  for (const Batch* batch : {&decode, &replay}) {
    ASSERT_EQ(cudaMemcpy(d_query_start.get(), batch->query_start.data(),
                         batch->query_start.size() * sizeof(int32_t), cudaMemcpyHostToDevice),
              cudaSuccess);
    ASSERT_EQ(cudaMemcpy(d_context_lens.get(), batch->context_lens.data(),
                         batch->context_lens.size() * sizeof(int32_t), cudaMemcpyHostToDevice),
              cudaSuccess);
    ASSERT_EQ(cudaMemset(d_out.get(), 0xff, q.size() * sizeof(float)), cudaSuccess);
    ASSERT_EQ(cudaGraphLaunch(exec, stream_), cudaSuccess);
    Sync();
    ExpectNear(d_out.Download(), RunCpu(p, cache, *batch, q), 1e-4f, 2e-5f,
               batch == &decode ? "captured metadata" : "replayed with new metadata");
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
}

// ---------------------------------------------------------------------------
// KV cache write
// ---------------------------------------------------------------------------

float FromBits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

TEST_F(CudaAttentionTest, KvCacheWriteStoresRowsAndSkipsNegativeSlots) {
  const int num_kv_heads = 2, head_dim = 64, num_slots = 40, guard_slots = 2;
  const int64_t row = num_kv_heads * head_dim;
  const std::vector<int64_t> slots = {5, -1, 0, 39, -7, 17, 3, -1, 22, 8, 30, 11};
  const int64_t tokens = static_cast<int64_t>(slots.size());
  std::vector<float> k = RandomFloats(tokens * row, 1, -3.f, 3.f);
  std::vector<float> v = RandomFloats(tokens * row, 2, -3.f, 3.f);
  k[3] = std::nanf("");
  k[4] = FromBits(0x3f808000u);  // a BF16 tie: rounds down to even
  k[5] = FromBits(0x3f818000u);  // a tie that rounds up
  v[7] = INFINITY;
  v[8] = -0.0f;

  for (DType type : {DType::kF32, DType::kBF16}) {
    SCOPED_TRACE(DTypeName(type));
    const size_t elem = ElementBytes(type);
    // Guard slots on both sides: a negative slot written anyway lands in front.
    const size_t bytes = (num_slots + 2 * guard_slots) * row * elem;
    auto k_cache = NanFilledDeviceBytes(bytes);
    auto v_cache = NanFilledDeviceBytes(bytes);
    DeviceBuffer<float> d_k(k), d_v(v);
    DeviceBuffer<int64_t> d_slots(slots);
    const KvCacheWriteParams w{
        .k = d_k.get(), .v = d_v.get(), .slots = d_slots.get(), .tokens = tokens,
        .num_kv_heads = num_kv_heads, .head_dim = head_dim,
        .k_cache = k_cache->get() + guard_slots * row * elem,
        .v_cache = v_cache->get() + guard_slots * row * elem, .cache_type = type};
    ASSERT_TRUE(LaunchKvCacheWrite(w, stream_).ok());
    Sync();

    for (const auto& [cache, rows] : {std::pair{k_cache.get(), &k}, std::pair{v_cache.get(), &v}}) {
      const std::vector<uint8_t> got = cache->Download();
      std::vector<int64_t> writer(num_slots + 2 * guard_slots, -1);  // token stored there
      for (int64_t t = 0; t < tokens; ++t) {
        if (slots[t] >= 0) writer[slots[t] + guard_slots] = t;
      }
      for (size_t slot = 0; slot < writer.size(); ++slot) {
        for (int64_t e = 0; e < row; ++e) {
          const uint8_t* at = got.data() + (slot * row + e) * elem;
          if (writer[slot] < 0) {  // untouched: still the 0xff fill
            ASSERT_TRUE(std::all_of(at, at + elem, [](uint8_t b) { return b == 0xff; }))
                << "slot " << static_cast<int64_t>(slot) - guard_slots << " element " << e;
            continue;
          }
          const float want = (*rows)[writer[slot] * row + e];
          float stored;
          if (type == DType::kF32) {
            std::memcpy(&stored, at, sizeof(float));
          } else {
            uint16_t bits;
            std::memcpy(&bits, at, sizeof(bits));
            stored = FromBf16(bits);
            if (!std::isnan(want)) {
              ASSERT_EQ(bits, ToBf16(want)) << "element " << e;
            }
          }
          if (std::isnan(want)) {
            ASSERT_TRUE(std::isnan(stored)) << "NaN must stay NaN, element " << e;
          } else if (type == DType::kF32) {
            ASSERT_EQ(std::memcmp(&stored, &want, sizeof(float)), 0) << "element " << e;
          }
        }
      }
    }
  }
}

// The bytes a cache of num_slots rows should hold after `rows` went to
// `slots`: the 0xff fill where nothing was stored.
std::vector<uint8_t> ExpectedCacheBytes(const std::vector<float>& rows,
                                        const std::vector<int64_t>& slots, int64_t row,
                                        int num_slots, DType type) {
  const size_t elem = ElementBytes(type);
  std::vector<uint8_t> bytes(num_slots * row * elem, 0xff);
  for (size_t t = 0; t < slots.size(); ++t) {
    if (slots[t] < 0) continue;
    for (int64_t e = 0; e < row; ++e) {
      uint8_t* at = bytes.data() + (slots[t] * row + e) * elem;
      const float x = rows[t * row + e];
      if (type == DType::kF32) {
        std::memcpy(at, &x, sizeof(float));
      } else {
        const uint16_t bits = ToBf16(x);
        std::memcpy(at, &bits, sizeof(bits));
      }
    }
  }
  return bytes;
}

TEST_F(CudaAttentionTest, KvCacheWriteWithoutValuesWritesKeysOnly) {
  // MLA: one 576-wide latent row per token, no v; with no v_cache (as the MLA
  // layer launches it), and with one, which must stay untouched.
  const int head_dim = 576, num_slots = 24;
  const std::vector<int64_t> slots = {3, -1, 0, 23, 7, -2, 11, 5};
  const int64_t tokens = static_cast<int64_t>(slots.size());
  const std::vector<float> k = RandomFloats(tokens * head_dim, 3, -3.f, 3.f);
  for (DType type : {DType::kF32, DType::kBF16}) {
    for (bool with_v_cache : {false, true}) {
      SCOPED_TRACE(testing::Message() << DTypeName(type) << (with_v_cache ? " with" : " without")
                                      << " v_cache");
      const size_t bytes = num_slots * head_dim * ElementBytes(type);
      auto k_cache = NanFilledDeviceBytes(bytes);
      auto v_cache = NanFilledDeviceBytes(bytes);
      DeviceBuffer<float> d_k(k);
      DeviceBuffer<int64_t> d_slots(slots);
      const KvCacheWriteParams w{.k = d_k.get(), .slots = d_slots.get(), .tokens = tokens,
                                 .num_kv_heads = 1, .head_dim = head_dim,
                                 .k_cache = k_cache->get(),
                                 .v_cache = with_v_cache ? v_cache->get() : nullptr,
                                 .cache_type = type};
      const absl::Status written = LaunchKvCacheWrite(w, stream_);
      ASSERT_TRUE(written.ok()) << written;
      Sync();
      EXPECT_EQ(k_cache->Download(), ExpectedCacheBytes(k, slots, head_dim, num_slots, type));
      EXPECT_EQ(v_cache->Download(), std::vector<uint8_t>(bytes, 0xff));
    }
  }
}

// ---------------------------------------------------------------------------
// Parameter validation (no device: every call fails before any launch)
// ---------------------------------------------------------------------------

PagedAttentionParams ValidLookingParams() {
  static float floats[1];
  static int32_t ints[2];
  PagedAttentionParams p;
  p.q = floats;
  p.out = floats;
  p.k_cache = floats;
  p.v_cache = floats;
  p.query_start = ints;
  p.context_lens = ints;
  p.block_tables = ints;
  p.num_q_heads = 8;
  p.num_kv_heads = 2;
  p.head_dim = 128;
  p.block_size = 16;
  p.num_seqs = 1;
  p.max_blocks_per_seq = 4;
  p.num_tokens = 1;
  p.cache_type = DType::kBF16;
  return p;
}

void ExpectRejected(const PagedAttentionParams& p, const std::string& field) {
  const absl::Status s = LaunchPagedAttention(p, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << field << ": " << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr(field));
}

TEST(CudaAttentionValidation, PagedAttentionNamesTheBadField) {
  PagedAttentionParams p = ValidLookingParams();
  p.num_q_heads = 0;
  ExpectRejected(p, "num_q_heads");
  p = ValidLookingParams();
  p.num_kv_heads = 3;  // does not divide 8
  ExpectRejected(p, "num_kv_heads");
  p = ValidLookingParams();
  p.num_kv_heads = 0;
  ExpectRejected(p, "num_kv_heads");
  for (int head_dim : {0, 36, 8, kMaxAttentionHeadDim + 16, 1024}) {
    p = ValidLookingParams();
    p.head_dim = head_dim;
    ExpectRejected(p, "head_dim");
  }
  // Values wider than keys, negative, or past the widest instance's columns
  // (576-wide keys with values as wide: v_head_dim 0).
  const std::pair<int, int> bad_values[] = {{128, 144},
                                             {128, -1},
                                             {kMaxAttentionHeadDim, 0},
                                             {kMaxAttentionHeadDim, kMaxAttentionValueDim + 16}};
  for (auto [head_dim, v_head_dim] : bad_values) {
    p = ValidLookingParams();
    p.head_dim = head_dim;
    p.v_head_dim = v_head_dim;
    ExpectRejected(p, "v_head_dim");
  }
  p = ValidLookingParams();
  p.block_size = 0;
  ExpectRejected(p, "block_size");
  p = ValidLookingParams();
  p.max_blocks_per_seq = 0;
  ExpectRejected(p, "max_blocks_per_seq");
  p = ValidLookingParams();
  p.sliding_window = -1;
  ExpectRejected(p, "sliding_window");
  p = ValidLookingParams();
  p.max_context_len = -1;
  ExpectRejected(p, "max_context_len");
  p = ValidLookingParams();
  p.num_tokens = -1;
  ExpectRejected(p, "num_tokens");
  p = ValidLookingParams();
  p.num_seqs = -1;
  ExpectRejected(p, "num_seqs");
  p = ValidLookingParams();
  p.cache_type = static_cast<DType>(7);
  ExpectRejected(p, "cache_type");
  p = ValidLookingParams();
  p.k_cache = nullptr;
  ExpectRejected(p, "k_cache");
  p = ValidLookingParams();
  p.block_tables = nullptr;
  ExpectRejected(p, "block_tables");
  // A decode row over a long context splits, and the splits need a workspace.
  p = ValidLookingParams();
  p.max_context_len = 10000;
  ASSERT_GT(PagedAttentionWorkspaceBytes(p), 0u);
  ExpectRejected(p, "workspace");
}

TEST(CudaAttentionValidation, WorkspaceQueryFollowsTheLaunchsBound) {
  PagedAttentionParams p = ValidLookingParams();
  // max_context_len 0: the bound is max_blocks_per_seq * block_size = 64 keys.
  EXPECT_EQ(PagedAttentionWorkspaceBytes(p), 0u);
  p.max_blocks_per_seq = 1000;
  EXPECT_EQ(PagedAttentionWorkspaceBytes(p), PagedAttentionWorkspaceBytes(1, 8, 128, 16000));
  EXPECT_GT(PagedAttentionWorkspaceBytes(p), 0u);
  // Prefill-sized batches never split, whatever the context.
  EXPECT_EQ(PagedAttentionWorkspaceBytes(4096, 8, 128, 1 << 20), 0u);
}

TEST(CudaAttentionValidation, WorkspaceHoldsValueWidePartials) {
  // DeepSeek-V3 decode: one token, 128 heads, 576-wide keys, 512-wide values.
  PagedAttentionParams p = ValidLookingParams();
  p.num_q_heads = 128;
  p.num_kv_heads = 1;
  p.head_dim = 576;
  p.v_head_dim = 512;
  p.max_context_len = 16000;
  const AttentionWorkspaceLayout layout = MakeAttentionWorkspaceLayout(1, 128, 512, 16000);
  ASSERT_GT(layout.num_splits, 1);
  EXPECT_EQ(PagedAttentionWorkspaceBytes(p), layout.bytes);
  EXPECT_EQ(PagedAttentionWorkspaceBytes(1, 128, 576, 16000, 512), layout.bytes);
  // Sizing by head_dim alone (what a caller that ignores v_head_dim asks for) is enough.
  EXPECT_GT(PagedAttentionWorkspaceBytes(1, 128, 576, 16000), layout.bytes);
}

TEST(CudaAttentionValidation, HeadChunksCoverTheGroupOnce) {
  EXPECT_EQ(HeadChunks(4, kMaxAttentionGroup), 1);
  EXPECT_EQ(HeadChunks(16, kMaxAttentionGroup), 1);
  EXPECT_EQ(HeadChunks(20, kMaxAttentionGroup), 2);
  EXPECT_EQ(HeadChunks(128, kMaxAttentionGroup), 8);
  for (int group = 1; group <= 130; ++group) {
    const int chunks = HeadChunks(group, kMaxAttentionGroup);
    int next = 0;
    for (int chunk = 0; chunk < chunks; ++chunk) {
      const HeadRange heads = ChunkHeads(group, chunk, kMaxAttentionGroup);
      ASSERT_EQ(heads.begin, next) << "group " << group << " chunk " << chunk;
      ASSERT_GT(heads.size(), 0) << "group " << group << " chunk " << chunk;
      ASSERT_LE(heads.size(), kMaxAttentionGroup) << "group " << group << " chunk " << chunk;
      next = heads.end;
    }
    EXPECT_EQ(next, group);
  }
}

TEST(CudaAttentionValidation, EmptyWorkIsANoOp) {
  PagedAttentionParams p = ValidLookingParams();
  p.num_tokens = 0;
  p.q = nullptr;  // nothing is read when there is nothing to do
  EXPECT_TRUE(LaunchPagedAttention(p, nullptr).ok());
  EXPECT_TRUE(LaunchKvCacheWrite(KvCacheWriteParams{.num_kv_heads = 2, .head_dim = 64}, nullptr).ok());
}

TEST(CudaAttentionValidation, KvCacheWriteNamesTheBadField) {
  static float floats[1];
  static int64_t slots[1];
  const KvCacheWriteParams valid{.k = floats, .v = floats, .slots = slots, .tokens = 1,
                                 .num_kv_heads = 2, .head_dim = 64, .k_cache = floats,
                                 .v_cache = floats};
  const auto expect_rejected = [](const KvCacheWriteParams& w, const std::string& field) {
    const absl::Status s = LaunchKvCacheWrite(w, nullptr);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << field << ": " << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr(field));
  };
  KvCacheWriteParams w = valid;
  w.tokens = -1;
  expect_rejected(w, "tokens");
  w = valid;
  w.num_kv_heads = 0;
  expect_rejected(w, "num_kv_heads");
  w = valid;
  w.head_dim = 0;
  expect_rejected(w, "head_dim");
  w = valid;
  w.cache_type = static_cast<DType>(7);
  expect_rejected(w, "cache_type");
  w = valid;
  w.slots = nullptr;
  expect_rejected(w, "slots");
  w = valid;
  w.v_cache = nullptr;
  expect_rejected(w, "v_cache");  // a v needs somewhere to go
  w = valid;
  w.v = nullptr;
  w.k_cache = nullptr;
  expect_rejected(w, "k_cache");
}

}  // namespace
}  // namespace joule::kernels::cuda
