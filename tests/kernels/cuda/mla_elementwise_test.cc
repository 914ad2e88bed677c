// RMSNorm over strided rows and RoPE on parts of heads, laid out as the
// multi-head latent attention layer (worker/model/mla.cc) launches them,
// CUDA against kernels::cpu on the same data, for the deepseek_v3 tiny and
// mini presets and DeepSeek-V3 itself.
//
// Tolerance 1e-6 (RoPE) and 1e-5 relative (RMSNorm): both sides compute in
// F32 in the same order, but nvcc fuses a * b - c * d into an FMA and the
// CPU's sum of squares runs in another order. A wrong stride, pair or angle
// moves values by O(0.1); columns a launch must not touch are compared
// bit for bit.
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cuda/elementwise.h"
#include "tests/kernels/cuda/cuda_test_util.h"

namespace joule::kernels::cuda {
namespace {

// The attention shapes of worker/tools/make_model.cc's deepseek_v3 presets
// and of DeepSeek-V3.
struct MlaShape {
  const char* name;
  int heads;
  int kv_lora_rank;
  int qk_nope_head_dim;
  int qk_rope_head_dim;
  int row() const { return kv_lora_rank + qk_rope_head_dim; }  // a latent cache row
  int qk() const { return qk_nope_head_dim + qk_rope_head_dim; }  // a query head
};

constexpr MlaShape kMlaShapes[] = {
    {"tiny", 4, 32, 32, 16},
    {"mini", 8, 128, 64, 32},
    {"deepseek_v3", 128, 512, 128, 64},
};

// Columns [from, to) of every `stride`-long row of got hold want's bits.
void ExpectColumnsUnchanged(const std::vector<float>& got, const std::vector<float>& want,
                            int64_t stride, int64_t from, int64_t to, const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t row = 0; row < got.size() / stride; ++row) {
    const size_t at = row * stride + from;
    ASSERT_EQ(std::memcmp(got.data() + at, want.data() + at, (to - from) * sizeof(float)), 0)
        << what << ": row " << row << " changed in columns [" << from << ", " << to << ")";
  }
}

// ---------------------------------------------------------------------------
// RMSNorm over the latent part of cache rows
// ---------------------------------------------------------------------------

TEST_F(CudaKernelTest, RmsNormStridedRowsMatchCpuAndLeaveTheRopeKeyAlone) {
  const int64_t rows = 37;
  for (const MlaShape& shape : kMlaShapes) {
    for (bool in_place : {true, false}) {
      SCOPED_TRACE(testing::Message() << shape.name << (in_place ? " in place" : " out of place"));
      const int64_t cols = shape.kv_lora_rank, stride = shape.row();
      const std::vector<float> x = RandomFloats(rows * stride, 21, -3.f, 3.f);
      const std::vector<float> weight = RandomFloats(cols, 22, 0.5f, 1.5f);
      // Out of place, out starts as other numbers: columns past cols must keep them.
      const std::vector<float> out_before = in_place ? x : RandomFloats(rows * stride, 23);

      DeviceBuffer<float> d_x(x), d_weight(weight), d_out(out_before);
      float* device_out = in_place ? d_x.get() : d_out.get();
      const RmsNormParams gpu{.x = d_x.get(), .weight = d_weight.get(), .out = device_out,
                              .rows = rows, .cols = cols, .eps = 1e-6f, .stride = stride};
      const absl::Status launched = LaunchRmsNorm(gpu, stream_);
      ASSERT_TRUE(launched.ok()) << launched;
      Sync();
      const std::vector<float> got = in_place ? d_x.Download() : d_out.Download();

      std::vector<float> host_x = x, want = out_before;
      RmsNormParams cpu = gpu;
      cpu.x = host_x.data();
      cpu.weight = weight.data();
      cpu.out = in_place ? host_x.data() : want.data();
      kernels::cpu::LaunchRmsNorm(cpu, kernels::cpu::CpuStream{});
      if (in_place) want = host_x;

      ExpectNear(got, want, 1e-5f, 1e-6f, "normalized latent");
      ExpectColumnsUnchanged(got, out_before, stride, cols, stride, "rope key columns");
      if (!in_place) {
        EXPECT_EQ(d_x.Download(), x) << "x changed";
      }
    }
  }
}

// ---------------------------------------------------------------------------
// RoPE on the rope parts of queries and latent rows
// ---------------------------------------------------------------------------

// cos/sin [max_position, rope / 2] from YaRN-like inverse frequencies and an
// attention factor != 1, through the CPU builder the model uses.
struct RopeTable {
  std::vector<float> cos, sin;
};

RopeTable MakeRopeTable(int rope_dim, int64_t max_position) {
  const int half = rope_dim / 2;
  std::vector<float> inv_freq(half);
  for (int i = 0; i < half; ++i) {
    // Scaled down past the middle, as YaRN does to the low frequencies.
    const float base = 1.0f / std::pow(10000.0f, static_cast<float>(2 * i) / rope_dim);
    inv_freq[i] = i < half / 2 ? base : base / 40.0f;
  }
  RopeTable table{std::vector<float>(max_position * half), std::vector<float>(max_position * half)};
  kernels::cpu::BuildRopeTable(inv_freq.data(), half, max_position, 1.3f, table.cos.data(),
                               table.sin.data());
  return table;
}

TEST_F(CudaKernelTest, RopeOnMlaLayoutsMatchesCpu) {
  // As RunMlaAttention launches it: q's rope parts (heads qk apart) rotated
  // into the absorbed query's last columns (heads `row` apart), q itself left
  // alone, and the rope key rotated in place at the end of each latent row.
  const int64_t tokens = 9, max_position = 4096;
  const std::vector<int32_t> positions = {0, 1, 2, 17, 4095, 300, 1024, 7, 2048};
  for (const MlaShape& shape : kMlaShapes) {
    for (bool interleaved : {true, false}) {
      SCOPED_TRACE(testing::Message() << shape.name << (interleaved ? " interleaved" : " halves"));
      const int rope = shape.qk_rope_head_dim;
      const RopeTable table = MakeRopeTable(rope, max_position);
      const std::vector<float> q = RandomFloats(tokens * shape.heads * shape.qk(), 31);
      const std::vector<float> q_latent = RandomFloats(tokens * shape.heads * shape.row(), 32);
      const std::vector<float> kv_latent = RandomFloats(tokens * shape.row(), 33);

      DeviceBuffer<float> d_q(q), d_q_latent(q_latent), d_kv_latent(kv_latent);
      DeviceBuffer<float> d_cos(table.cos), d_sin(table.sin);
      DeviceBuffer<int32_t> d_positions(positions);
      RopeParams gpu{.q = d_q.get() + shape.qk_nope_head_dim,
                     .k = d_kv_latent.get() + shape.kv_lora_rank,
                     .positions = d_positions.get(), .tokens = tokens,
                     .num_q_heads = shape.heads, .num_kv_heads = 1, .head_dim = rope,
                     .cos = d_cos.get(), .sin = d_sin.get(), .q_head_stride = shape.qk(),
                     .q_out = d_q_latent.get() + shape.kv_lora_rank,
                     .q_out_head_stride = shape.row(), .k_row_stride = shape.row(),
                     .interleaved = interleaved};
      const absl::Status launched = LaunchRope(gpu, stream_);
      ASSERT_TRUE(launched.ok()) << launched;
      Sync();

      std::vector<float> host_q = q, want_q_latent = q_latent, want_kv_latent = kv_latent;
      RopeParams cpu = gpu;
      cpu.q = host_q.data() + shape.qk_nope_head_dim;
      cpu.k = want_kv_latent.data() + shape.kv_lora_rank;
      cpu.positions = positions.data();
      cpu.cos = table.cos.data();
      cpu.sin = table.sin.data();
      cpu.q_out = want_q_latent.data() + shape.kv_lora_rank;
      kernels::cpu::LaunchRope(cpu, kernels::cpu::CpuStream{});

      const std::vector<float> got_q_latent = d_q_latent.Download();
      const std::vector<float> got_kv_latent = d_kv_latent.Download();
      EXPECT_EQ(d_q.Download(), q) << "q must stay as it was (q_out receives the rotation)";
      ExpectNear(got_q_latent, want_q_latent, 1e-6f, 1e-6f, "q_out");
      ExpectNear(got_kv_latent, want_kv_latent, 1e-6f, 1e-6f, "rope key");
      ExpectColumnsUnchanged(got_q_latent, q_latent, shape.row(), 0, shape.kv_lora_rank,
                             "absorbed query's latent columns");
      ExpectColumnsUnchanged(got_kv_latent, kv_latent, shape.row(), 0, shape.kv_lora_rank,
                             "latent columns");
    }
  }
}

TEST_F(CudaKernelTest, InterleavedRopeInPlaceOnPackedHeadsMatchesCpu) {
  // The default strides with interleaved pairs: q and k rotated in place.
  const int64_t tokens = 5;
  const int q_heads = 4, kv_heads = 2, head_dim = 64, max_position = 128;
  const std::vector<int32_t> positions = {0, 1, 17, 127, 64};
  const RopeTable table = MakeRopeTable(head_dim, max_position);
  const std::vector<float> q = RandomFloats(tokens * q_heads * head_dim, 41);
  const std::vector<float> k = RandomFloats(tokens * kv_heads * head_dim, 42);
  DeviceBuffer<float> d_q(q), d_k(k), d_cos(table.cos), d_sin(table.sin);
  DeviceBuffer<int32_t> d_positions(positions);
  RopeParams gpu{.q = d_q.get(), .k = d_k.get(), .positions = d_positions.get(),
                 .tokens = tokens, .num_q_heads = q_heads, .num_kv_heads = kv_heads,
                 .head_dim = head_dim, .cos = d_cos.get(), .sin = d_sin.get(),
                 .interleaved = true};
  ASSERT_TRUE(LaunchRope(gpu, stream_).ok());
  Sync();
  std::vector<float> want_q = q, want_k = k;
  RopeParams cpu = gpu;
  cpu.q = want_q.data();
  cpu.k = want_k.data();
  cpu.positions = positions.data();
  cpu.cos = table.cos.data();
  cpu.sin = table.sin.data();
  kernels::cpu::LaunchRope(cpu, kernels::cpu::CpuStream{});
  ExpectNear(d_q.Download(), want_q, 1e-6f, 1e-6f, "q");
  ExpectNear(d_k.Download(), want_k, 1e-6f, 1e-6f, "k");
}

// ---------------------------------------------------------------------------
// Validation (no device: every call fails before any launch)
// ---------------------------------------------------------------------------

TEST(CudaMlaElementwiseValidation, StridesThatWouldOverlapAreRejectedByName) {
  static float floats[1];
  static int32_t positions[1];
  const auto expect_invalid = [](const absl::Status& s, const char* field) {
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << field << ": " << s;
    EXPECT_THAT(std::string(s.message()), testing::HasSubstr(field));
  };
  const RmsNormParams norm{.x = floats, .weight = floats, .out = floats, .rows = 2, .cols = 512,
                           .stride = 500};
  expect_invalid(LaunchRmsNorm(norm, nullptr), "stride");

  const RopeParams valid{.q = floats, .k = floats, .positions = positions, .tokens = 1,
                         .num_q_heads = 8, .num_kv_heads = 1, .head_dim = 64, .cos = floats,
                         .sin = floats};
  RopeParams rope = valid;
  rope.q_head_stride = 32;
  expect_invalid(LaunchRope(rope, nullptr), "q_head_stride");
  rope = valid;
  rope.k_row_stride = -576;
  expect_invalid(LaunchRope(rope, nullptr), "k_row_stride");
  rope = valid;
  rope.q_out = floats;
  rope.q_out_head_stride = 63;
  expect_invalid(LaunchRope(rope, nullptr), "q_out_head_stride");
}

}  // namespace
}  // namespace joule::kernels::cuda
