// CUDA kernels against scalar CPU references on random data. Kernel tests skip
// (with the reason) when no CUDA device is present; the status-wrapping and
// parameter-validation tests touch no device and always run.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iterator>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/moe.h"
#include "kernels/cuda/blas.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/elementwise.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/moe.h"
#include "tests/kernels/cuda/cuda_test_util.h"

namespace joule::kernels::cuda {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

// ---------------------------------------------------------------------------
// Status wrapping (no device needed)
// ---------------------------------------------------------------------------

absl::Status FailingCudaCall() {
  JOULE_CUDA_RETURN_IF_ERROR(static_cast<cudaError_t>(cudaErrorInvalidValue));
  return absl::OkStatus();
}

absl::Status OutOfMemoryCudaCall() {
  JOULE_CUDA_RETURN_IF_ERROR(static_cast<cudaError_t>(cudaErrorMemoryAllocation));
  return absl::OkStatus();
}

absl::Status FailingCublasCall() {
  JOULE_CUBLAS_RETURN_IF_ERROR(static_cast<cublasStatus_t>(CUBLAS_STATUS_INVALID_VALUE));
  return absl::OkStatus();
}

absl::Status SucceedingCalls() {
  JOULE_CUDA_RETURN_IF_ERROR(cudaSuccess);
  JOULE_CUBLAS_RETURN_IF_ERROR(CUBLAS_STATUS_SUCCESS);
  return absl::OkStatus();
}

TEST(CudaCheck, CudaErrorBecomesInternalWithCallSite) {
  absl::Status s = FailingCudaCall();
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(std::string(s.message()), StartsWith("static_cast<cudaError_t>(cudaErrorInvalidValue) failed at "));
  EXPECT_THAT(s.message(), HasSubstr("cuda_kernels_test.cc:"));
  EXPECT_THAT(s.message(), HasSubstr(std::string(": cudaErrorInvalidValue: ") +
                                     cudaGetErrorString(cudaErrorInvalidValue)));
}

TEST(CudaCheck, OutOfMemoryIsResourceExhausted) {
  EXPECT_EQ(OutOfMemoryCudaCall().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(CublasErrorToStatus(CUBLAS_STATUS_ALLOC_FAILED, "cublasCreate(&h)", "f.cc", 1).code(),
            absl::StatusCode::kResourceExhausted);
}

TEST(CudaCheck, CublasErrorNamesTheStatus) {
  absl::Status s = FailingCublasCall();
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(s.message(), HasSubstr("CUBLAS_STATUS_INVALID_VALUE"));
  EXPECT_THAT(s.message(), HasSubstr("cuda_kernels_test.cc:"));
}

TEST(CudaCheck, SuccessIsOk) { EXPECT_TRUE(SucceedingCalls().ok()); }

#if defined(JOULE_HAVE_NCCL)
absl::Status FailingNcclCall() {
  JOULE_NCCL_RETURN_IF_ERROR(static_cast<ncclResult_t>(ncclInvalidArgument));
  return absl::OkStatus();
}

TEST(CudaCheck, NcclErrorNamesTheResult) {
  absl::Status s = FailingNcclCall();
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(s.message(), HasSubstr("ncclInvalidArgument"));
  EXPECT_EQ(NcclErrorToStatus(ncclInProgress, "ncclCommInitRankConfig(...)", "f.cc", 1).code(),
            absl::StatusCode::kUnavailable);
}
#endif

TEST(CudaCheck, DeviceCountAgreesWithAvailability) {
  const int count = DeviceCount();  // must not crash or fail without a driver
  EXPECT_GE(count, 0);
  absl::Status available = CheckDeviceAvailable();
  EXPECT_EQ(available.ok(), count > 0) << available;
  if (!available.ok()) {
    EXPECT_EQ(available.code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(std::string(available.message()), StartsWith("no CUDA device: "));
  }
  EXPECT_EQ(DeviceCount(), count);  // asking again gives the same answer
}

// Bad parameters are rejected before any device work.
TEST(CudaValidation, RejectsBadParameters) {
  RouterTopKParams router;
  router.tokens = 1;
  router.num_experts = 8;
  router.top_k = 9;
  EXPECT_EQ(LaunchRouterTopK(router, nullptr).code(), absl::StatusCode::kInvalidArgument);
  router.num_experts = kMaxRouterExperts + 1;
  EXPECT_EQ(LaunchRouterTopK(router, nullptr).code(), absl::StatusCode::kInvalidArgument);

  RopeParams rope;
  rope.tokens = 1;
  rope.head_dim = 63;
  absl::Status s = LaunchRope(rope, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("head_dim"));

  GemmParams gemm;
  gemm.m = 2;
  gemm.n = 4;
  gemm.k = 8;
  gemm.ldx = 4;  // < k
  EXPECT_EQ(LaunchGemm(gemm, nullptr).code(), absl::StatusCode::kInvalidArgument);

  // Empty work is a no-op, not an error.
  EXPECT_TRUE(LaunchRmsNorm(RmsNormParams{}, nullptr).ok());
  EXPECT_TRUE(LaunchSiluMul(SiluMulParams{}, nullptr).ok());
}

// The new launches name the bad field, before any device work; empty work is
// a no-op. Pointers here are never dereferenced.
TEST(CudaValidation, NewLaunchesNameTheBadField) {
  auto expect_invalid = [](const absl::Status& s, const char* field) {
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_THAT(s.message(), HasSubstr(field));
  };
  EmbeddingParams embedding;
  embedding.count = -1;
  expect_invalid(LaunchEmbedding(embedding, nullptr), "count");
  embedding.count = 2;
  embedding.hidden = 8;
  expect_invalid(LaunchEmbedding(embedding, nullptr), "tokens is null");

  expect_invalid(LaunchAdd(AddParams{nullptr, nullptr, -3}, nullptr), "n must be >= 0");
  GatedAddParams gated;
  gated.rows = 2;
  gated.cols = 4;
  expect_invalid(LaunchGatedAdd(gated, nullptr), "y is null");

  BiasAddParams bias;
  bias.rows = 2;
  bias.cols = 8;
  bias.ldy = 4;
  expect_invalid(LaunchBiasAdd(bias, nullptr), "ldy");

  ExpertLoadParams load;
  load.num_experts = -1;
  expect_invalid(AccumulateExpertLoad(load, nullptr), "num_experts");

  std::vector<int32_t> fake(4);
  GatherRowsParams gather;
  gather.in = fake.data();
  gather.out = fake.data();
  gather.rows = 2;
  gather.hidden = 3;
  gather.in_stride_bytes = 12;
  gather.out_stride_bytes = 12;
  gather.index = fake.data();
  gather.index_divisor = 0;
  expect_invalid(LaunchGatherRows(gather, nullptr), "index_divisor");
  gather.index_divisor = 1;
  gather.in_stride_bytes = 14;  // not a whole number of F32
  expect_invalid(LaunchGatherRows(gather, nullptr), "in_stride_bytes");
  gather.in_stride_bytes = 12;
  gather.out_type = RowType::kBF16;
  gather.out_stride_bytes = 7;
  expect_invalid(LaunchGatherRows(gather, nullptr), "out_stride_bytes");
  gather.out_stride_bytes = 6;
  gather.out = reinterpret_cast<char*>(fake.data()) + 1;
  expect_invalid(LaunchGatherRows(gather, nullptr), "out (address)");

  EXPECT_TRUE(LaunchEmbedding(EmbeddingParams{}, nullptr).ok());
  EXPECT_TRUE(LaunchAdd(AddParams{}, nullptr).ok());
  EXPECT_TRUE(LaunchGatedAdd(GatedAddParams{}, nullptr).ok());
  EXPECT_TRUE(LaunchBiasAdd(BiasAddParams{}, nullptr).ok());
  EXPECT_TRUE(AccumulateExpertLoad(ExpertLoadParams{}, nullptr).ok());
  EXPECT_TRUE(LaunchGatherRows(GatherRowsParams{}, nullptr).ok());
}

// ReduceRows names the bad field before any device work; no rows is a no-op
// whatever the pointers. Pointers here are never dereferenced.
TEST(CudaValidation, ReduceRowsNamesTheBadField) {
  auto expect_invalid = [](const ReduceRowsParams& p, const char* field) {
    const absl::Status s = LaunchReduceRows(p, nullptr);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_THAT(s.message(), HasSubstr(field)) << s;
  };
  std::vector<int64_t> fake(8);
  ReduceRowsParams p;
  p.in = fake.data();
  p.in_stride_bytes = 12;
  p.offsets = fake.data();
  p.index = reinterpret_cast<const int32_t*>(fake.data());
  p.out = fake.data();
  p.out_stride_bytes = 12;
  p.hidden = 3;
  p.rows = -1;
  expect_invalid(p, "rows and hidden must be >= 0");
  p.rows = 2;
  p.in_stride_bytes = 14;  // not a whole number of F32
  expect_invalid(p, "in_stride_bytes");
  p.in_stride_bytes = 12;
  p.in_type = RowType::kF8E4M3;
  expect_invalid(p, "in_type");
  p.in_type = RowType::kBF16;
  p.out_type = RowType::kBF16;
  p.accumulate = true;
  expect_invalid(p, "accumulate needs F32 out");
  p.accumulate = false;
  p.out_stride_bytes = 7;
  expect_invalid(p, "out_stride_bytes");
  p.out_stride_bytes = 6;
  p.out = reinterpret_cast<char*>(fake.data()) + 1;
  expect_invalid(p, "out (address)");
  p.out = nullptr;
  expect_invalid(p, "out and out_rows are both null");
  p.out = fake.data();
  p.offsets = nullptr;
  expect_invalid(p, "offsets is null");
  p.offsets = fake.data();
  p.index = nullptr;
  expect_invalid(p, "index is null");

  EXPECT_TRUE(LaunchReduceRows(ReduceRowsParams{}, nullptr).ok());
  ReduceRowsParams none;
  none.hidden = 64;
  none.accumulate = true;
  none.out_type = RowType::kBF16;
  EXPECT_TRUE(LaunchReduceRows(none, nullptr).ok());
}

// A 2 x 8 by 8 x 4 product over host memory: only validation may read it.
GemmParams HostGemm(std::vector<float>& host) {
  GemmParams p;
  p.x = host.data();
  p.w = host.data();
  p.y = host.data();
  p.workspace = host.data();
  p.m = 2;
  p.n = 4;
  p.k = 8;
  return p;
}

TEST(CudaValidation, LtGemmNamesTheBadField) {
  std::vector<float> host(64);
  const GemmParams p = HostGemm(host);
  EXPECT_TRUE(ValidateLtGemmParams(p).ok());

  auto expect_invalid = [](GemmParams bad, const char* field) {
    const absl::Status s = ValidateLtGemmParams(bad);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_THAT(s.message(), HasSubstr(field));
  };
  GemmParams bad = p;
  bad.w_type = WeightType::kF32;
  expect_invalid(bad, "w_type");
  bad = p;
  bad.ldx = 4;
  expect_invalid(bad, "ldx");
  bad = p;
  bad.ldy = 3;
  expect_invalid(bad, "ldy");
  bad = p;
  bad.k = -1;
  expect_invalid(bad, "k=");
  bad = p;
  bad.workspace = nullptr;
  expect_invalid(bad, "workspace");
  bad = p;
  bad.w = reinterpret_cast<const char*>(host.data()) + 1;
  expect_invalid(bad, "w must be 2-byte aligned");
  bad = p;
  bad.batch = 2;  // CudaBackend::Gemm splits a batch before cuBLASLt
  expect_invalid(bad, "LtGemm: batch must be 1");

  // Empty products need no pointers; k = 0 needs no x, w or workspace.
  GemmParams empty;
  empty.m = 0;
  empty.n = 5;
  empty.k = 3;
  EXPECT_TRUE(ValidateLtGemmParams(empty).ok());
  GemmParams no_k;
  no_k.m = 2;
  no_k.n = 4;
  no_k.y = host.data();
  EXPECT_TRUE(ValidateLtGemmParams(no_k).ok());

  // Rows of the BF16 copy of x are padded to 8 elements.
  EXPECT_EQ(LtGemmWorkspaceBytes(7, 33), size_t{7 * 40 * 2});
  EXPECT_EQ(LtGemmWorkspaceBytes(3, 64), size_t{3 * 64 * 2});
  EXPECT_EQ(LtGemmWorkspaceBytes(0, 64), size_t{0});
}

// The SIMT launch checks a batch before anything reaches the device.
TEST(CudaValidation, GemmRefusesABatchItCannotRun) {
  std::vector<float> host(64);
  GemmParams p = HostGemm(host);
  p.w_type = WeightType::kF8E4M3;
  p.w_scale_inv = host.data();
  p.batch = 2;
  EXPECT_THAT(LaunchGemm(p, nullptr).message(), HasSubstr("f8_e4m3 weights take batch 1"));
  p.w_type = WeightType::kF32;
  p.batch = 0;
  EXPECT_THAT(LaunchGemm(p, nullptr).message(), HasSubstr("batch must be in [1, 65535]"));
}

TEST(CudaValidation, LtGemmCreateWithoutDeviceIsFailedPrecondition) {
  if (DeviceCount() > 0) GTEST_SKIP() << "a device is present";
  absl::StatusOr<std::unique_ptr<LtGemm>> gemm = LtGemm::Create(1 << 20);
  EXPECT_EQ(gemm.status().code(), absl::StatusCode::kFailedPrecondition) << gemm.status();
}

// ---------------------------------------------------------------------------
// Elementwise
// ---------------------------------------------------------------------------

TEST_F(CudaKernelTest, RmsNormMatchesReference) {
  const int64_t rows = 7, cols = 1000;  // cols not a multiple of the block size
  std::vector<float> x = RandomFloats(rows * cols, 1, -3.f, 3.f);
  std::vector<float> weight = RandomFloats(cols, 2, 0.5f, 1.5f);
  std::vector<float> want(x.size());
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t c = 0; c < cols; ++c) ss += double(x[r * cols + c]) * x[r * cols + c];
    const float inv = 1.f / std::sqrt(static_cast<float>(ss / cols) + 1e-6f);
    for (int64_t c = 0; c < cols; ++c) want[r * cols + c] = (x[r * cols + c] * inv) * weight[c];
  }
  DeviceBuffer<float> dx(x), dw(weight), dout(x.size());
  RmsNormParams p{dx.get(), dw.get(), dout.get(), rows, cols, 1e-6f};
  ASSERT_TRUE(LaunchRmsNorm(p, stream_).ok());
  // In place, as the header allows.
  p.out = dx.get();
  ASSERT_TRUE(LaunchRmsNorm(p, stream_).ok());
  Sync();
  ExpectNear(dout.Download(), want, 1e-5f, 1e-6f, "out");
  ExpectNear(dx.Download(), want, 1e-5f, 1e-6f, "in place");
}

TEST_F(CudaKernelTest, SiluMulMatchesReference) {
  const int64_t n = 100003;
  std::vector<float> gate = RandomFloats(n, 3, -8.f, 8.f);
  std::vector<float> up = RandomFloats(n, 4);
  std::vector<float> want(n);
  for (int64_t i = 0; i < n; ++i) want[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
  DeviceBuffer<float> dg(gate), du(up), dout(n);
  ASSERT_TRUE(LaunchSiluMul({dg.get(), du.get(), dout.get(), n}, stream_).ok());
  Sync();
  ExpectNear(dout.Download(), want, 1e-5f, 1e-7f, "silu_mul");
}

TEST_F(CudaKernelTest, RopeRotateHalfMatchesReference) {
  const int64_t tokens = 5;
  const int hq = 4, hkv = 2, d = 64, half = d / 2, max_pos = 128;
  std::vector<float> cos(max_pos * half), sin(max_pos * half);
  for (int pos = 0; pos < max_pos; ++pos) {
    for (int i = 0; i < half; ++i) {
      const float inv_freq = 1.f / std::pow(10000.f, static_cast<float>(2 * i) / d);
      const float angle = static_cast<float>(pos) * inv_freq;
      cos[pos * half + i] = std::cos(angle);
      sin[pos * half + i] = std::sin(angle);
    }
  }
  std::vector<int32_t> positions = {0, 1, 17, 127, 64};
  std::vector<float> q = RandomFloats(tokens * hq * d, 5);
  std::vector<float> k = RandomFloats(tokens * hkv * d, 6);
  auto rotate = [&](std::vector<float> v, int heads) {
    for (int64_t t = 0; t < tokens; ++t) {
      for (int h = 0; h < heads; ++h) {
        float* x = v.data() + (t * heads + h) * d;
        const float* c = cos.data() + positions[t] * half;
        const float* s = sin.data() + positions[t] * half;
        for (int i = 0; i < half; ++i) {
          const float x1 = x[i], x2 = x[i + half];
          x[i] = x1 * c[i] - x2 * s[i];
          x[i + half] = x2 * c[i] + x1 * s[i];
        }
      }
    }
    return v;
  };
  DeviceBuffer<float> dq(q), dk(k), dcos(cos), dsin(sin);
  DeviceBuffer<int32_t> dpos(positions);
  RopeParams p;
  p.q = dq.get();
  p.k = dk.get();
  p.positions = dpos.get();
  p.tokens = tokens;
  p.num_q_heads = hq;
  p.num_kv_heads = hkv;
  p.head_dim = d;
  p.cos = dcos.get();
  p.sin = dsin.get();
  ASSERT_TRUE(LaunchRope(p, stream_).ok());
  Sync();
  ExpectNear(dq.Download(), rotate(q, hq), 1e-6f, 1e-6f, "q");
  ExpectNear(dk.Download(), rotate(k, hkv), 1e-6f, 1e-6f, "k");
}

std::vector<uint32_t> Bits(const std::vector<float>& v) {
  std::vector<uint32_t> bits(v.size());
  std::memcpy(bits.data(), v.data(), v.size() * sizeof(float));
  return bits;
}

TEST_F(CudaKernelTest, EmbeddingWidensExactlyLikeTheCpu) {
  const int64_t vocab = 50, hidden = 300;
  const std::vector<int32_t> tokens = {0, 49, 7, 7, 23, 0, 12};  // repeats, first and last id
  const int64_t count = static_cast<int64_t>(tokens.size());
  std::vector<float> table = RandomFloats(vocab * hidden, 31, -2.f, 2.f);
  std::vector<uint16_t> table16(table.size());
  for (size_t i = 0; i < table.size(); ++i) table16[i] = ToBf16(table[i]);
  table16[7 * hidden + 5] = 0x7f81;  // a signalling NaN is widened bit for bit
  table16[7 * hidden + 6] = 0x8001;  // so is a negative denormal
  DeviceBuffer<int32_t> dtokens(tokens);
  DeviceBuffer<float> dtable(table), dout(count * hidden);
  DeviceBuffer<uint16_t> dtable16(table16);
  for (DType type : {DType::kBF16, DType::kF32}) {
    SCOPED_TRACE(DTypeName(type));
    const bool bf16 = type == DType::kBF16;
    std::vector<float> want(count * hidden);
    EmbeddingParams p;
    p.tokens = tokens.data();
    p.count = count;
    p.table = bf16 ? static_cast<const void*>(table16.data()) : table.data();
    p.table_type = type;
    p.hidden = hidden;
    p.out = want.data();
    cpu::LaunchEmbedding(p, cpu::CpuStream{});
    p.tokens = dtokens.get();
    p.table = bf16 ? static_cast<const void*>(dtable16.get()) : dtable.get();
    p.out = dout.get();
    ASSERT_TRUE(LaunchEmbedding(p, stream_).ok());
    Sync();
    EXPECT_EQ(Bits(dout.Download()), Bits(want));
  }
}

TEST_F(CudaKernelTest, AddMatchesCpuExactly) {
  const int64_t n = 100003;  // not a multiple of the block size
  const std::vector<float> x = RandomFloats(n, 32);
  const std::vector<float> y = RandomFloats(n, 33);
  std::vector<float> want = y;
  cpu::LaunchAdd(AddParams{want.data(), x.data(), n}, cpu::CpuStream{});
  DeviceBuffer<float> dy(y), dx(x);
  ASSERT_TRUE(LaunchAdd(AddParams{dy.get(), dx.get(), n}, stream_).ok());
  Sync();
  EXPECT_EQ(dy.Download(), want);  // one rounding per element on both
}

TEST_F(CudaKernelTest, GatedAddMatchesCpu) {
  const int64_t rows = 9, cols = 1000;
  std::vector<float> logits = RandomFloats(rows, 34, -8.f, 8.f);
  logits[0] = -100.f;  // gate 0: y unchanged
  logits[1] = 100.f;   // gate 1
  logits[2] = 0.f;     // gate 1/2
  const std::vector<float> x = RandomFloats(rows * cols, 35);
  const std::vector<float> y = RandomFloats(rows * cols, 36);
  std::vector<float> want = y;
  cpu::LaunchGatedAdd(GatedAddParams{want.data(), x.data(), logits.data(), rows, cols},
                      cpu::CpuStream{});
  DeviceBuffer<float> dy(y), dx(x), dlogits(logits);
  ASSERT_TRUE(
      LaunchGatedAdd(GatedAddParams{dy.get(), dx.get(), dlogits.get(), rows, cols}, stream_).ok());
  Sync();
  // The GPU's expf is within 2 ulp of the CPU's, so the gate differs in its
  // last bits at most; a wrong sign or a missing gate is off by ~0.1 or more.
  const std::vector<float> got = dy.Download();
  ExpectNear(got, want, 1e-6f, 1e-6f, "gated add");

  // Bit for bit, given the device's gate: some gate within 4 ulp of the CPU's
  // gives every column of a row as y + gate * x with the multiply and the add
  // rounded apart (an FMA, rounding once, misses on many columns).
  for (int64_t r = 0; r < rows; ++r) {
    const float cpu_gate = 1.0f / (1.0f + std::exp(-logits[r]));
    float gate = cpu_gate;
    for (int step = 0; step < 4; ++step) gate = std::nextafter(gate, -INFINITY);
    bool matched = false;
    for (int candidate = 0; candidate <= 8 && !matched; ++candidate) {
      matched = true;
      for (int64_t c = 0; c < cols && matched; ++c) {
        const int64_t i = r * cols + c;
        const float product = gate * x[i];  // rounded here (the build does not contract)
        matched = got[i] == y[i] + product;
      }
      gate = std::nextafter(gate, INFINITY);
    }
    EXPECT_TRUE(matched) << "row " << r << " (gate " << cpu_gate
                         << " on the CPU): no nearby gate gives the CPU's rounding";
  }
}

TEST_F(CudaKernelTest, BiasAddLeavesRowPaddingAlone) {
  const int64_t rows = 5, cols = 33, ldy = 40;
  const std::vector<float> y = RandomFloats(rows * ldy, 37);
  const std::vector<float> bias = RandomFloats(cols, 38);
  std::vector<float> want = y;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) want[r * ldy + c] += bias[c];
  }
  DeviceBuffer<float> dy(y), dbias(bias);
  ASSERT_TRUE(LaunchBiasAdd(BiasAddParams{dy.get(), dbias.get(), rows, cols, ldy}, stream_).ok());
  Sync();
  EXPECT_EQ(dy.Download(), want);
}

// ---------------------------------------------------------------------------
// MoE routing
// ---------------------------------------------------------------------------

void ReferenceRouterTopK(const std::vector<float>& logits, int64_t tokens, int ne, int k,
                         bool renormalize, std::vector<int32_t>* ids, std::vector<float>* w) {
  ids->assign(tokens * k, -1);
  w->assign(tokens * k, 0.f);
  for (int64_t t = 0; t < tokens; ++t) {
    const float* l = logits.data() + t * ne;
    const float mx = *std::max_element(l, l + ne);
    std::vector<float> prob(ne);
    float sum = 0.f;
    for (int e = 0; e < ne; ++e) sum += (prob[e] = std::exp(l[e] - mx));
    const float inv = 1.f / sum;
    std::vector<int> order(ne);
    for (int e = 0; e < ne; ++e) {
      prob[e] *= inv;
      order[e] = e;
    }
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return prob[a] > prob[b]; });
    float total = 0.f;
    for (int j = 0; j < k; ++j) total += prob[order[j]];
    for (int j = 0; j < k; ++j) {
      (*ids)[t * k + j] = order[j];
      (*w)[t * k + j] = renormalize ? prob[order[j]] / total : prob[order[j]];
    }
  }
}

TEST_F(CudaKernelTest, RouterTopKMatchesReference) {
  struct Case { int64_t tokens; int experts; int top_k; bool renormalize; };
  for (Case c : {Case{257, 60, 4, true}, Case{100, 128, 8, false}, Case{3, 8, 8, true},
                 Case{33, 256, 1, false}}) {
    SCOPED_TRACE(testing::Message() << "experts=" << c.experts << " top_k=" << c.top_k);
    std::vector<float> logits = RandomFloats(c.tokens * c.experts, 7 + c.experts, -4.f, 4.f);
    // Exact ties in a few tokens: the lower expert id must come first.
    for (int64_t t = 0; t < c.tokens; t += 5) {
      for (int e = 0; e < c.experts; e += 3) logits[t * c.experts + e] = 2.5f;
    }
    std::vector<int32_t> want_ids;
    std::vector<float> want_w;
    ReferenceRouterTopK(logits, c.tokens, c.experts, c.top_k, c.renormalize, &want_ids, &want_w);

    DeviceBuffer<float> dl(logits), dw(c.tokens * c.top_k);
    DeviceBuffer<int32_t> dids(c.tokens * c.top_k);
    RouterTopKParams p{dl.get(), c.tokens, c.experts, c.top_k, c.renormalize, dids.get(), dw.get()};
    ASSERT_TRUE(LaunchRouterTopK(p, stream_).ok());
    Sync();
    EXPECT_EQ(dids.Download(), want_ids);
    ExpectNear(dw.Download(), want_w, 1e-5f, 1e-7f, "weights");
  }
}

// A row whose softmax is NaN (a NaN logit, a +inf one, or all -inf) picks
// experts 0..top_k-1 with NaN weights, as the CPU's InsertTopK does: always
// in range and distinct, and the other tokens' choices stay their own (the
// warps share one block's shared memory, so an out-of-range pick would mark
// the next token's expert 0 as taken).
TEST_F(CudaKernelTest, RouterTopKNanRowsPickInRangeExpertsLikeTheCpu) {
  const int64_t tokens = 8;  // two blocks of four warps
  const int experts = 60, top_k = 4;
  std::vector<float> logits = RandomFloats(tokens * experts, 43, -4.f, 4.f);
  auto row = [&](int64_t t) { return logits.begin() + t * experts; };
  row(0)[17] = NAN;
  std::fill(row(3), row(3) + experts, -INFINITY);  // the block's last warp
  row(5)[40] = INFINITY;
  row(6)[0] = NAN;
  const std::vector<int64_t> bad = {0, 3, 5, 6};
  row(1)[0] = row(4)[0] = row(7)[0] = 10.f;  // the next warps' expert 0 is their first choice
  for (const bool renormalize : {true, false}) {
    SCOPED_TRACE(testing::Message() << "renormalize=" << renormalize);
    std::vector<int32_t> want_ids(tokens * top_k);
    std::vector<float> want_w(tokens * top_k);
    cpu::LaunchRouterTopK({logits.data(), tokens, experts, top_k, renormalize, want_ids.data(),
                           want_w.data()},
                          cpu::CpuStream{});
    DeviceBuffer<float> dlogits(logits), dw(tokens * top_k);
    DeviceBuffer<int32_t> dids(tokens * top_k);
    ASSERT_TRUE(LaunchRouterTopK({dlogits.get(), tokens, experts, top_k, renormalize, dids.get(),
                                  dw.get()},
                                 stream_)
                    .ok());
    Sync();
    const std::vector<int32_t> ids = dids.Download();
    std::vector<float> w = dw.Download();
    EXPECT_EQ(ids, want_ids);
    for (int64_t t : bad) {
      for (int j = 0; j < top_k; ++j) {
        EXPECT_EQ(ids[t * top_k + j], j) << "token " << t;
        EXPECT_TRUE(std::isnan(w[t * top_k + j])) << "token " << t << " choice " << j;
        EXPECT_TRUE(std::isnan(want_w[t * top_k + j])) << "token " << t << " choice " << j;
        w[t * top_k + j] = want_w[t * top_k + j] = 0.f;  // NaN != NaN: leave them out of the compare
      }
    }
    for (int64_t t : {1, 4, 7}) EXPECT_EQ(ids[t * top_k], 0) << "token " << t;
    ExpectNear(w, want_w, 1e-5f, 1e-7f, "weights");
  }
}

TEST_F(CudaKernelTest, MoeLayoutIsAStableGroupingByExpert) {
  const int64_t tokens = 300;
  const int top_k = 4, ne = 16;
  std::mt19937 rng(11);
  std::uniform_int_distribution<int> pick(0, ne - 2);  // expert ne-1 stays empty
  std::vector<int32_t> ids(tokens * top_k);
  for (int32_t& e : ids) e = pick(rng);

  // Counting sort, stable in slot order.
  std::vector<int64_t> want_offsets(ne + 1, 0);
  for (int32_t e : ids) ++want_offsets[e + 1];
  for (int e = 0; e < ne; ++e) want_offsets[e + 1] += want_offsets[e];
  std::vector<int32_t> want_p2s(ids.size()), want_s2p(ids.size());
  std::vector<int64_t> cursor(want_offsets.begin(), want_offsets.end() - 1);
  for (size_t s = 0; s < ids.size(); ++s) {
    const int64_t r = cursor[ids[s]]++;
    want_p2s[r] = static_cast<int32_t>(s);
    want_s2p[s] = static_cast<int32_t>(r);
  }

  DeviceBuffer<int32_t> dids(ids), dp2s(ids.size()), ds2p(ids.size());
  DeviceBuffer<int64_t> doffsets(ne + 1);
  MoeLayoutParams p{dids.get(), tokens, top_k, ne, doffsets.get(), dp2s.get(), ds2p.get()};
  ASSERT_TRUE(ComputeMoeLayout(p, stream_).ok());
  Sync();
  EXPECT_EQ(doffsets.Download(), want_offsets);
  EXPECT_EQ(dp2s.Download(), want_p2s);
  EXPECT_EQ(ds2p.Download(), want_s2p);
}

TEST_F(CudaKernelTest, MoeLayoutLeavesOutOfRangeExpertsOut) {
  std::vector<int32_t> ids = {0, 5, 1, -1, 1, 0};  // 2 tokens, top_k 3, 2 experts
  DeviceBuffer<int32_t> dids(ids), dp2s(ids.size()), ds2p(ids.size());
  DeviceBuffer<int64_t> doffsets(3);
  MoeLayoutParams p{dids.get(), 2, 3, 2, doffsets.get(), dp2s.get(), ds2p.get()};
  ASSERT_TRUE(ComputeMoeLayout(p, stream_).ok());
  Sync();
  EXPECT_EQ(doffsets.Download(), (std::vector<int64_t>{0, 2, 4}));
  EXPECT_EQ(ds2p.Download(), (std::vector<int32_t>{0, -1, 2, -1, 3, 1}));
  std::vector<int32_t> p2s = dp2s.Download();
  EXPECT_EQ(std::vector<int32_t>(p2s.begin(), p2s.begin() + 4), (std::vector<int32_t>{0, 5, 2, 4}));
}

TEST_F(CudaKernelTest, PermuteAndUnpermuteMatchReference) {
  const int64_t tokens = 37, hidden = 300;
  const int top_k = 3;
  const int64_t slots = tokens * top_k;
  std::vector<float> x = RandomFloats(tokens * hidden, 12);
  // A permutation of the slots, as a layout would produce.
  std::vector<int32_t> p2s(slots), s2p(slots);
  for (int64_t i = 0; i < slots; ++i) p2s[i] = static_cast<int32_t>(i);
  std::shuffle(p2s.begin(), p2s.end(), std::mt19937(13));
  for (int64_t r = 0; r < slots; ++r) s2p[p2s[r]] = static_cast<int32_t>(r);
  std::vector<float> weights = RandomFloats(slots, 14, 0.f, 1.f);

  std::vector<float> want_perm(slots * hidden);
  for (int64_t r = 0; r < slots; ++r) {
    std::copy_n(x.begin() + (p2s[r] / top_k) * hidden, hidden, want_perm.begin() + r * hidden);
  }
  DeviceBuffer<float> dx(x), dperm(slots * hidden);
  DeviceBuffer<int32_t> dp2s(p2s), ds2p(s2p);
  ASSERT_TRUE(LaunchPermute({dx.get(), hidden, slots, dp2s.get(), top_k, dperm.get()}, stream_).ok());
  Sync();
  EXPECT_EQ(dperm.Download(), want_perm);

  // Un-permute something that differs per row: the expert outputs.
  std::vector<float> expert_out = RandomFloats(slots * hidden, 15);
  std::vector<float> base = RandomFloats(tokens * hidden, 16);
  for (bool accumulate : {false, true}) {
    std::vector<float> want = accumulate ? base : std::vector<float>(base.size(), 0.f);
    for (int64_t t = 0; t < tokens; ++t) {
      for (int j = 0; j < top_k; ++j) {
        const int64_t slot = t * top_k + j;
        for (int64_t c = 0; c < hidden; ++c) {
          want[t * hidden + c] += weights[slot] * expert_out[s2p[slot] * hidden + c];
        }
      }
    }
    DeviceBuffer<float> deo(expert_out), dw(weights), dout(base);
    UnpermuteParams p{deo.get(), ds2p.get(), dw.get(), tokens, top_k, hidden, dout.get(),
                      accumulate};
    ASSERT_TRUE(LaunchUnpermute(p, stream_).ok());
    Sync();
    ExpectNear(dout.Download(), want, 1e-5f, 1e-6f, accumulate ? "accumulate" : "overwrite");
  }
}

TEST_F(CudaKernelTest, RouterTopKPadsTokensPastValidTokens) {
  const int64_t tokens = 37;
  const int experts = 60, top_k = 4;
  const std::vector<float> logits = RandomFloats(tokens * experts, 41, -4.f, 4.f);
  std::vector<int32_t> ref_ids;
  std::vector<float> ref_w;
  ReferenceRouterTopK(logits, tokens, experts, top_k, true, &ref_ids, &ref_w);
  DeviceBuffer<float> dlogits(logits), dw(tokens * top_k);
  DeviceBuffer<int32_t> dids(tokens * top_k);
  DeviceBuffer<int64_t> dvalid(1);
  // Fewer, none, all, and more than all (a count is never trusted as a size).
  for (int64_t valid : {int64_t{20}, int64_t{0}, tokens, int64_t{1000}}) {
    SCOPED_TRACE(testing::Message() << "valid_tokens=" << valid);
    ASSERT_EQ(cudaMemcpy(dvalid.get(), &valid, sizeof(valid), cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cudaMemset(dids.get(), 0x7f, sizeof(int32_t) * tokens * top_k), cudaSuccess);
    ASSERT_EQ(cudaMemset(dw.get(), 0x7f, sizeof(float) * tokens * top_k), cudaSuccess);
    RouterTopKParams p{dlogits.get(), tokens, experts, top_k, true, dids.get(), dw.get(),
                       dvalid.get()};
    ASSERT_TRUE(LaunchRouterTopK(p, stream_).ok());
    Sync();
    std::vector<int32_t> want_ids = ref_ids;
    std::vector<float> want_w = ref_w;
    for (int64_t slot = std::min(valid, tokens) * top_k; slot < tokens * top_k; ++slot) {
      want_ids[slot] = -1;
      want_w[slot] = 0.f;
    }
    EXPECT_EQ(dids.Download(), want_ids);
    ExpectNear(dw.Download(), want_w, 1e-5f, 1e-7f, "weights");
  }

  // The padding stays out of the layout: only the 20 real tokens' slots are placed.
  const int64_t valid = 20;
  ASSERT_EQ(cudaMemcpy(dvalid.get(), &valid, sizeof(valid), cudaMemcpyHostToDevice), cudaSuccess);
  RouterTopKParams router{dlogits.get(), tokens, experts, top_k, true, dids.get(), dw.get(),
                          dvalid.get()};
  ASSERT_TRUE(LaunchRouterTopK(router, stream_).ok());
  DeviceBuffer<int64_t> doffsets(experts + 1);
  DeviceBuffer<int32_t> dp2s(tokens * top_k), ds2p(tokens * top_k);
  MoeLayoutParams layout{dids.get(), tokens, top_k, experts, doffsets.get(), dp2s.get(),
                         ds2p.get()};
  ASSERT_TRUE(ComputeMoeLayout(layout, stream_).ok());
  Sync();
  EXPECT_EQ(doffsets.Download().back(), valid * top_k);
  const std::vector<int32_t> s2p = ds2p.Download();
  for (int64_t slot = 0; slot < tokens * top_k; ++slot) {
    EXPECT_EQ(s2p[slot] < 0, slot >= valid * top_k) << "slot " << slot;
  }
}

TEST_F(CudaKernelTest, MoeLayoutFillsPermutedToToken) {
  const int64_t tokens = 300;
  const int top_k = 4, ne = 16;
  const int64_t slots = tokens * top_k;
  std::mt19937 rng(42);
  std::uniform_int_distribution<int> pick(0, ne - 1);
  std::vector<int32_t> ids(slots);
  for (int32_t& e : ids) e = pick(rng);

  // In range everywhere: the CPU layout is the reference, permuted_to_token included.
  std::vector<int64_t> want_offsets(ne + 1);
  std::vector<int32_t> want_p2s(slots), want_s2p(slots), want_p2t(slots);
  cpu::ComputeMoeLayout(MoeLayoutParams{ids.data(), tokens, top_k, ne, want_offsets.data(),
                                        want_p2s.data(), want_s2p.data(), want_p2t.data()});
  DeviceBuffer<int32_t> dids(ids), dp2s(slots), ds2p(slots), dp2t(slots);
  DeviceBuffer<int64_t> doffsets(ne + 1);
  MoeLayoutParams p{dids.get(), tokens, top_k, ne, doffsets.get(), dp2s.get(), ds2p.get(),
                    dp2t.get()};
  ASSERT_TRUE(ComputeMoeLayout(p, stream_).ok());
  Sync();
  EXPECT_EQ(doffsets.Download(), want_offsets);
  EXPECT_EQ(dp2s.Download(), want_p2s);
  EXPECT_EQ(ds2p.Download(), want_s2p);
  EXPECT_EQ(dp2t.Download(), want_p2t);

  // With router padding (-1) in every 7th token, the placed rows still name their token.
  for (int64_t t = 0; t < tokens; t += 7) {
    for (int j = 0; j < top_k; ++j) ids[t * top_k + j] = -1;
  }
  DeviceBuffer<int32_t> dpadded(ids);
  p.expert_ids = dpadded.get();
  ASSERT_TRUE(ComputeMoeLayout(p, stream_).ok());
  Sync();
  const int64_t placed = doffsets.Download().back();
  EXPECT_EQ(placed, (tokens - (tokens + 6) / 7) * top_k);
  const std::vector<int32_t> p2s = dp2s.Download();
  const std::vector<int32_t> p2t = dp2t.Download();
  for (int64_t r = 0; r < placed; ++r) {
    EXPECT_EQ(p2t[r], p2s[r] / top_k) << "row " << r;
    EXPECT_GE(ids[p2s[r]], 0) << "row " << r;
  }
}

TEST_F(CudaKernelTest, ExpertLoadAccumulatesLikeTheCpu) {
  const int ne = 37;  // not a multiple of the block size
  std::mt19937 rng(43);
  std::uniform_int_distribution<int64_t> count(0, 50);
  std::vector<int64_t> offsets(ne + 1, 0);
  for (int e = 0; e < ne; ++e) offsets[e + 1] = offsets[e] + count(rng);
  std::vector<int64_t> load(ne);
  for (int64_t& l : load) l = count(rng) * 1000;
  std::vector<int64_t> want = load;
  DeviceBuffer<int64_t> doffsets(offsets), dload(load);
  for (int step = 0; step < 2; ++step) {  // it adds; it does not overwrite
    cpu::AccumulateExpertLoad(ExpertLoadParams{offsets.data(), ne, want.data()});
    ASSERT_TRUE(
        AccumulateExpertLoad(ExpertLoadParams{doffsets.get(), ne, dload.get()}, stream_).ok());
  }
  Sync();
  EXPECT_EQ(dload.Download(), want);
}

// Every in/out type pair, rows with trailing bytes (an expert id) that must
// be left alone, an index with a divisor, scattered out_rows and copy_of:
// byte for byte what the CPU kernel writes, rounding ties and NaNs included.
TEST_F(CudaKernelTest, GatherRowsMatchesCpuBitForBit) {
  const int64_t tokens = 6, hidden = 37, rows = 10;
  const int divisor = 2;
  // Tokens 5 0 1 1 3 5 0 2 2 4: repeats for copy_of.
  const std::vector<int32_t> index = {11, 0, 3, 2, 7, 10, 1, 4, 5, 9};
  std::vector<int64_t> copy_of(rows, -1);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t earlier = 0; earlier < r; ++earlier) {
      if (index[earlier] / divisor == index[r] / divisor) {
        copy_of[r] = earlier;
        break;
      }
    }
  }
  // F32 values with BF16 rounding ties (to even: down, then up), NaNs (quiet,
  // signalling), infinities, the largest finite (rounds to inf), -0, denormals.
  const uint32_t special_f32[] = {0x3f808000u, 0x3f818000u, 0x7fc00001u, 0x7f800001u,
                                  0xff800000u, 0x7f7fffffu, 0x80000000u, 0x00000001u,
                                  0x807fffffu, 0x3f80ffffu};
  const uint16_t special_bf16[] = {0x7fc1, 0x7f81, 0xff80, 0x8000, 0x0001, 0x7f7f};
  std::vector<float> values = RandomFloats(tokens * hidden, 44, -3.f, 3.f);
  std::vector<uint32_t> f32(values.size());
  std::memcpy(f32.data(), values.data(), values.size() * sizeof(float));
  std::vector<uint16_t> bf16(values.size());
  for (size_t i = 0; i < values.size(); ++i) bf16[i] = ToBf16(values[i]);
  for (size_t i = 0; i < std::size(special_f32); ++i) f32[i * 11 % f32.size()] = special_f32[i];
  for (size_t i = 0; i < std::size(special_bf16); ++i) bf16[i * 13 % bf16.size()] = special_bf16[i];

  for (RowType in_type : {RowType::kF32, RowType::kBF16}) {
    for (RowType out_type : {RowType::kF32, RowType::kBF16}) {
      for (int mode = 0; mode < 3; ++mode) {  // 0: strided out, 1: out_rows, 2: copy_of
        SCOPED_TRACE(testing::Message() << DTypeName(in_type) << " -> " << DTypeName(out_type)
                                        << " mode " << mode);
        const int64_t in_elem = static_cast<int64_t>(ElementBytes(in_type));
        const int64_t out_elem = static_cast<int64_t>(ElementBytes(out_type));
        const int64_t in_stride = hidden * in_elem + 8;  // trailing bytes past each row
        const int64_t out_stride = hidden * out_elem + 4;
        std::vector<uint8_t> in(tokens * in_stride, 0xcd);
        for (int64_t t = 0; t < tokens; ++t) {
          const void* src = in_type == RowType::kF32 ? static_cast<const void*>(&f32[t * hidden])
                                                     : &bf16[t * hidden];
          std::memcpy(&in[t * in_stride], src, hidden * in_elem);
        }
        std::vector<uint8_t> want(rows * out_stride, 0xab);
        DeviceBuffer<uint8_t> din(in), dout(want);
        DeviceBuffer<int32_t> dindex(index);
        DeviceBuffer<int64_t> dcopy_of(copy_of);
        // Reversed row order through out_rows, so a kernel that ignores it fails.
        std::vector<std::byte*> host_rows(rows), device_rows(rows);
        for (int64_t r = 0; r < rows; ++r) {
          host_rows[r] = reinterpret_cast<std::byte*>(&want[(rows - 1 - r) * out_stride]);
          device_rows[r] = reinterpret_cast<std::byte*>(dout.get() + (rows - 1 - r) * out_stride);
        }
        DeviceBuffer<std::byte*> drows(device_rows);

        GatherRowsParams p;
        p.in_type = in_type;
        p.in_stride_bytes = in_stride;
        p.index_divisor = divisor;
        p.out_type = out_type;
        p.out_stride_bytes = out_stride;
        p.rows = rows;
        p.hidden = hidden;
        GatherRowsParams host = p;
        host.in = in.data();
        host.index = index.data();
        host.out = want.data();
        host.out_rows = mode == 1 ? host_rows.data() : nullptr;
        host.copy_of = mode == 2 ? copy_of.data() : nullptr;
        cpu::LaunchGatherRows(host, cpu::CpuStream{});
        GatherRowsParams device = p;
        device.in = din.get();
        device.index = dindex.get();
        device.out = dout.get();
        device.out_rows = mode == 1 ? drows.get() : nullptr;
        device.copy_of = mode == 2 ? dcopy_of.get() : nullptr;
        ASSERT_TRUE(LaunchGatherRows(device, stream_).ok());
        Sync();
        const std::vector<uint8_t> got = dout.Download();
        ASSERT_EQ(got.size(), want.size());
        int reported = 0;
        for (size_t i = 0; i < got.size() && reported < 10; ++i) {
          if (got[i] != want[i]) {
            ++reported;
            ADD_FAILURE() << "byte " << i << " (row " << i / out_stride << "): got "
                          << int(got[i]) << ", want " << int(want[i]);
          }
        }
      }
    }
  }
  // No index: the identity, F32 -> BF16 (the conversion LtGemm uses for x).
  std::vector<uint16_t> want(tokens * hidden);
  for (size_t i = 0; i < want.size(); ++i) {
    const uint32_t bits = f32[i];
    want[i] = (bits & 0x7fffffffu) > 0x7f800000u
                  ? static_cast<uint16_t>((bits >> 16) | 0x40)
                  : static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
  }
  EXPECT_EQ(want[0], 0x3f80);   // tie, even below: down
  EXPECT_EQ(want[11], 0x3f82);  // tie, odd below: up
  DeviceBuffer<uint32_t> din(f32);
  DeviceBuffer<uint16_t> dout(want.size());
  GatherRowsParams p;
  p.in = din.get();
  p.in_stride_bytes = hidden * 4;
  p.out = dout.get();
  p.out_type = RowType::kBF16;
  p.out_stride_bytes = hidden * 2;
  p.rows = tokens;
  p.hidden = hidden;
  ASSERT_TRUE(LaunchGatherRows(p, stream_).ok());
  Sync();
  EXPECT_EQ(dout.Download(), want);
}

// Random rows of 0..5 terms (input rows repeated among them), input and
// output rows with trailing bytes that must be left alone, every type pair,
// with and without weights and accumulate, through a strided out and through
// out_rows (reversed, so a kernel that ignores them fails): byte for byte the
// CPU's rows. Exact, not close: the kernel multiplies and adds each term in
// the CPU's order, in F32, with no FMA contraction, and rounds once.
TEST_F(CudaKernelTest, ReduceRowsMatchesCpuBitForBit) {
  const int64_t in_rows = 29, hidden = 300, rows = 70;  // hidden: 2 strides of 128 and a tail
  std::mt19937 rng(47);
  std::vector<int64_t> offsets{0};
  std::vector<int32_t> index;
  for (int64_t r = 0; r < rows; ++r) {
    const uint32_t terms = rng() % 6;
    for (uint32_t j = 0; j < terms; ++j) index.push_back(static_cast<int32_t>(rng() % in_rows));
    offsets.push_back(static_cast<int64_t>(index.size()));
  }
  const std::vector<float> weights = RandomFloats(index.size(), 48, -2.f, 2.f);
  const std::vector<float> values = RandomFloats(in_rows * hidden, 49, -3.f, 3.f);
  const std::vector<float> prior = RandomFloats(rows * hidden, 50);  // what accumulate adds to
  DeviceBuffer<int64_t> doffsets(offsets);
  DeviceBuffer<int32_t> dindex(index);
  DeviceBuffer<float> dweights(weights);

  struct Case {
    RowType in_type, out_type;
    bool weighted, accumulate;
  };
  for (const Case c : {Case{RowType::kF32, RowType::kF32, true, true},
                       Case{RowType::kBF16, RowType::kBF16, false, false},
                       Case{RowType::kBF16, RowType::kF32, true, true},
                       Case{RowType::kF32, RowType::kBF16, true, false},
                       Case{RowType::kF32, RowType::kF32, false, false}}) {
    for (const bool scattered : {false, true}) {
      SCOPED_TRACE(testing::Message() << DTypeName(c.in_type) << " -> " << DTypeName(c.out_type)
                                      << (c.weighted ? " weighted" : "")
                                      << (c.accumulate ? " accumulate" : "")
                                      << (scattered ? " out_rows" : " strided"));
      const int64_t in_elem = static_cast<int64_t>(ElementBytes(c.in_type));
      const int64_t out_elem = static_cast<int64_t>(ElementBytes(c.out_type));
      const int64_t in_stride = hidden * in_elem + 8;
      const int64_t out_stride = hidden * out_elem + 4;
      std::vector<uint8_t> in(in_rows * in_stride, 0xcd);
      for (int64_t t = 0; t < in_rows; ++t) {
        if (c.in_type == RowType::kF32) {
          std::memcpy(&in[t * in_stride], &values[t * hidden], hidden * in_elem);
          continue;
        }
        for (int64_t d = 0; d < hidden; ++d) {
          const uint16_t bf16 = ToBf16(values[t * hidden + d]);
          std::memcpy(&in[t * in_stride + d * 2], &bf16, 2);
        }
      }
      std::vector<uint8_t> want(rows * out_stride, 0xab);
      for (int64_t r = 0; r < rows && c.out_type == RowType::kF32; ++r) {
        std::memcpy(&want[r * out_stride], &prior[r * hidden], hidden * sizeof(float));
      }
      DeviceBuffer<uint8_t> din(in), dout(want);
      std::vector<std::byte*> host_rows(rows), device_rows(rows);
      for (int64_t r = 0; r < rows; ++r) {
        host_rows[r] = reinterpret_cast<std::byte*>(&want[(rows - 1 - r) * out_stride]);
        device_rows[r] = reinterpret_cast<std::byte*>(dout.get() + (rows - 1 - r) * out_stride);
      }
      DeviceBuffer<std::byte*> drows(device_rows);

      ReduceRowsParams p;
      p.in_type = c.in_type;
      p.in_stride_bytes = in_stride;
      p.out_type = c.out_type;
      p.out_stride_bytes = scattered ? 0 : out_stride;  // unused with out_rows
      p.accumulate = c.accumulate;
      p.rows = rows;
      p.hidden = hidden;
      ReduceRowsParams host = p;
      host.in = in.data();
      host.offsets = offsets.data();
      host.index = index.data();
      host.weights = c.weighted ? weights.data() : nullptr;
      host.out = scattered ? nullptr : want.data();
      host.out_rows = scattered ? host_rows.data() : nullptr;
      cpu::LaunchReduceRows(host, cpu::CpuStream{});
      ReduceRowsParams device = p;
      device.in = din.get();
      device.offsets = doffsets.get();
      device.index = dindex.get();
      device.weights = c.weighted ? dweights.get() : nullptr;
      device.out = scattered ? nullptr : dout.get();
      device.out_rows = scattered ? drows.get() : nullptr;
      ASSERT_TRUE(LaunchReduceRows(device, stream_).ok());
      Sync();
      const std::vector<uint8_t> got = dout.Download();
      ASSERT_EQ(got.size(), want.size());
      int reported = 0;
      for (size_t i = 0; i < got.size() && reported < 10; ++i) {
        if (got[i] != want[i]) {
          ++reported;
          ADD_FAILURE() << "byte " << i << " (row " << i / out_stride << "): got "
                        << int(got[i]) << ", want " << int(want[i]);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// GEMM
// ---------------------------------------------------------------------------

TEST_F(CudaKernelTest, GemmMatchesReference) {
  struct Case { int64_t m, n, k, ldx, ldy; WeightType type; bool bias, accumulate; };
  for (Case c : {Case{1, 1, 1, 0, 0, WeightType::kBF16, false, false},
                 Case{37, 129, 300, 0, 0, WeightType::kBF16, true, false},
                 Case{64, 64, 64, 0, 0, WeightType::kF32, false, false},
                 Case{70, 200, 33, 40, 250, WeightType::kBF16, true, true},
                 Case{5, 1000, 2048, 0, 0, WeightType::kF32, true, true}}) {
    SCOPED_TRACE(testing::Message() << "m=" << c.m << " n=" << c.n << " k=" << c.k);
    const int64_t ldx = c.ldx ? c.ldx : c.k, ldy = c.ldy ? c.ldy : c.n;
    std::vector<float> x = RandomFloats(c.m * ldx, 21);
    std::vector<float> w = RandomFloats(c.n * c.k, 22);
    std::vector<uint16_t> w16(w.size());
    for (size_t i = 0; i < w.size(); ++i) {
      w16[i] = ToBf16(w[i]);
      if (c.type == WeightType::kBF16) w[i] = FromBf16(w16[i]);  // the values the GPU sees
    }
    std::vector<float> bias = RandomFloats(c.n, 23);
    std::vector<float> y0 = RandomFloats(c.m * ldy, 24);
    std::vector<float> want = y0;
    std::vector<float> tol(want.size(), 0.f);
    for (int64_t i = 0; i < c.m; ++i) {
      for (int64_t j = 0; j < c.n; ++j) {
        double acc = 0, mag = 0;
        for (int64_t kk = 0; kk < c.k; ++kk) {
          acc += double(x[i * ldx + kk]) * w[j * c.k + kk];
          mag += std::fabs(double(x[i * ldx + kk]) * w[j * c.k + kk]);
        }
        if (c.bias) acc += bias[j];
        want[i * ldy + j] = static_cast<float>(c.accumulate ? y0[i * ldy + j] + acc : acc);
        tol[i * ldy + j] = static_cast<float>(1e-5 * (mag + 1.0));
      }
    }
    DeviceBuffer<float> dx(x), dbias(bias), dy(y0);
    DeviceBuffer<float> dw32(w);
    DeviceBuffer<uint16_t> dw16(w16);
    GemmParams p;
    p.x = dx.get();
    p.m = c.m;
    p.k = c.k;
    p.ldx = c.ldx;
    p.w = c.type == WeightType::kBF16 ? static_cast<const void*>(dw16.get()) : dw32.get();
    p.w_type = c.type;
    p.n = c.n;
    p.bias = c.bias ? dbias.get() : nullptr;
    p.y = dy.get();
    p.ldy = c.ldy;
    p.accumulate = c.accumulate;
    ASSERT_TRUE(LaunchGemm(p, stream_).ok());
    Sync();
    std::vector<float> got = dy.Download();
    int reported = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      // Entries outside [m, n] (ldy padding) must be untouched: tol 0 there.
      if (!(std::fabs(got[i] - want[i]) <= tol[i]) && reported++ < 10) {
        ADD_FAILURE() << "y[" << i << "]: got " << got[i] << ", want " << want[i];
      }
    }
  }
}

// cuBLASLt: y = x W^T (+ bias) (+ y) with x rounded to BF16 first. The
// reference is computed in double on the same BF16-rounded x and W, so the
// products are the GPU's exactly (8-bit mantissas multiply exactly in F32)
// and the only difference is F32 summation: tolerance 1e-5 * (sum_k |x w| + 1),
// over 40x the worst error of a host simulation of these shapes that adds
// 16-term partial sums in F32 truncating toward zero (as tensor cores may),
// while x left in F32 already exceeds it in most entries, and a dropped term
// or a missing bias by far more. Padding (ldy > n) must come back bit for bit; x's padding
// (ldx > k) and the BF16 copy's row padding hold NaN, so reading them shows.
TEST_F(CudaKernelTest, LtGemmMatchesReference) {
  absl::StatusOr<std::unique_ptr<LtGemm>> created = LtGemm::Create(size_t{32} << 20);
  ASSERT_TRUE(created.ok()) << created.status();
  LtGemm& gemm = **created;
  struct Case { int64_t m, n, k, ldx, ldy, y_offset; bool bias, accumulate; };
  for (Case c : {Case{1, 257, 129, 0, 0, 0, true, false},
                 Case{7, 64, 33, 40, 70, 0, true, true},
                 Case{7, 64, 33, 0, 0, 0, false, false},  // same m, n, k: another plan
                 Case{64, 128, 256, 0, 0, 0, false, false},
                 Case{300, 97, 515, 520, 101, 1, true, true},  // y 4-byte aligned only
                 Case{300, 1, 64, 0, 0, 0, false, true},
                 Case{64, 1024, 2048, 0, 0, 0, true, false},
                 Case{3, 5, 0, 0, 7, 0, true, false}}) {  // k = 0: y = bias
    SCOPED_TRACE(testing::Message() << "m=" << c.m << " n=" << c.n << " k=" << c.k
                                    << " ldx=" << c.ldx << " ldy=" << c.ldy);
    const int64_t ldx = c.ldx ? c.ldx : c.k, ldy = c.ldy ? c.ldy : c.n;
    std::vector<float> x = RandomFloats(c.m * ldx, 51);
    std::vector<float> x_rounded(x.size());
    for (size_t i = 0; i < x.size(); ++i) {
      if (static_cast<int64_t>(i % ldx) >= c.k) x[i] = std::nanf("");  // padding: never read
      x_rounded[i] = FromBf16(ToBf16(x[i]));
    }
    std::vector<float> w = RandomFloats(c.n * c.k, 52);
    std::vector<uint16_t> w16(w.size());
    for (size_t i = 0; i < w.size(); ++i) {
      w16[i] = ToBf16(w[i]);
      w[i] = FromBf16(w16[i]);
    }
    const std::vector<float> bias = RandomFloats(c.n, 53);
    const std::vector<float> y0 = RandomFloats(c.y_offset + c.m * ldy, 54);
    std::vector<float> want = y0;
    std::vector<double> tol(want.size(), 0.0);
    for (int64_t i = 0; i < c.m; ++i) {
      for (int64_t j = 0; j < c.n; ++j) {
        double acc = 0, mag = 0;
        for (int64_t kk = 0; kk < c.k; ++kk) {
          const double term = double(x_rounded[i * ldx + kk]) * w[j * c.k + kk];
          acc += term;
          mag += std::fabs(term);
        }
        if (c.bias) acc += bias[j];
        const int64_t at = c.y_offset + i * ldy + j;
        want[at] = static_cast<float>(c.accumulate ? y0[at] + acc : acc);
        tol[at] = 1e-5 * (mag + 1.0);
      }
    }

    DeviceBuffer<float> dx(x), dbias(bias), dy(y0);
    DeviceBuffer<uint16_t> dw(w16);
    const size_t workspace_bytes = LtGemmWorkspaceBytes(c.m, c.k);
    DeviceBuffer<uint16_t> dworkspace(workspace_bytes / 2);
    ASSERT_EQ(cudaMemset(dworkspace.get(), 0xff, workspace_bytes), cudaSuccess);  // BF16 NaN
    GemmParams p;
    p.x = dx.get();
    p.m = c.m;
    p.k = c.k;
    p.ldx = c.ldx;
    p.w = dw.get();
    p.n = c.n;
    p.bias = c.bias ? dbias.get() : nullptr;
    p.y = dy.get() + c.y_offset;
    p.ldy = c.ldy;
    p.accumulate = c.accumulate;
    p.workspace = dworkspace.get();
    const size_t plans_before = gemm.cached_plans();
    // Rows of w or y not 16-byte aligned: a cuBLASLt may have no algorithm
    // (Unimplemented), and CudaBackend::Gemm then takes the SIMT kernel.
    const bool aligned = c.k % 8 == 0 && ldy % 4 == 0 && c.y_offset % 4 == 0;
    // Overwriting runs go twice: the second reuses the cached algorithm.
    bool no_algorithm = false;
    for (int run = 0; run < (c.accumulate ? 1 : 2) && !no_algorithm; ++run) {
      const absl::Status status = gemm.Run(p, stream_);
      no_algorithm = !aligned && absl::IsUnimplemented(status);
      ASSERT_TRUE(status.ok() || no_algorithm) << status;
    }
    if (no_algorithm) {
      std::printf("[ NOTE ] m=%lld n=%lld k=%lld ldy=%lld: this cuBLASLt has no algorithm "
                  "(production falls back to the SIMT kernel)\n", static_cast<long long>(c.m),
                  static_cast<long long>(c.n), static_cast<long long>(c.k), static_cast<long long>(ldy));
      continue;
    }
    Sync();
    EXPECT_EQ(gemm.cached_plans(), plans_before + (c.k > 0 ? 1 : 0));

    const std::vector<float> got = dy.Download();
    int reported = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      // Padding and the y_offset prefix: tol 0, so bit for bit.
      if (!(std::fabs(double(got[i]) - double(want[i])) <= tol[i]) && reported++ < 10) {
        ADD_FAILURE() << "y[" << i << "]: got " << got[i] << ", want " << want[i]
                      << " (tol " << tol[i] << ")";
      }
    }
    // The staged copy is x rounded to nearest even, rows 8-element aligned.
    if (c.k > 0) {
      const int64_t packed_ld = static_cast<int64_t>(workspace_bytes / 2) / c.m;
      const std::vector<uint16_t> staged = dworkspace.Download();
      int wrong = 0;
      for (int64_t i = 0; i < c.m; ++i) {
        for (int64_t kk = 0; kk < c.k; ++kk) {
          if (staged[i * packed_ld + kk] != ToBf16(x[i * ldx + kk]) && wrong++ < 5) {
            ADD_FAILURE() << "x_bf16[" << i << ", " << kk << "]";
          }
        }
      }
    }
  }
}

}  // namespace
}  // namespace joule::kernels::cuda
