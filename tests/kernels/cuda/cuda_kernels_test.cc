// CUDA kernels against scalar CPU references on random data. Kernel tests skip
// (with the reason) when no CUDA device is present; the status-wrapping and
// parameter-validation tests touch no device and always run.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/elementwise.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/moe.h"

namespace joule::kernels::cuda {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

std::vector<float> RandomFloats(size_t n, uint32_t seed, float lo = -1.f, float hi = 1.f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

uint16_t ToBf16(float f) {  // round to nearest even, as PyTorch does
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

float FromBf16(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Owns a device allocation of n T's.
template <typename T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t n) : n_(n) {
    EXPECT_EQ(cudaMalloc(&ptr_, std::max<size_t>(1, n) * sizeof(T)), cudaSuccess);
  }
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) {
    EXPECT_EQ(cudaMemcpy(ptr_, host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  T* get() const { return ptr_; }
  std::vector<T> Download() const {
    std::vector<T> host(n_);
    EXPECT_EQ(cudaMemcpy(host.data(), ptr_, n_ * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return host;
  }

 private:
  T* ptr_ = nullptr;
  size_t n_;
};

class CudaKernelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::Status device = CheckDeviceAvailable();
    if (!device.ok()) GTEST_SKIP() << device.message();
    ASSERT_EQ(cudaStreamCreate(&stream_), cudaSuccess);
  }
  void TearDown() override {
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }
  // Waits for the stream and surfaces asynchronous kernel faults.
  void Sync() { ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess) << cudaGetErrorString(cudaGetLastError()); }

  cudaStream_t stream_ = nullptr;
};

void ExpectNear(const std::vector<float>& got, const std::vector<float>& want, float rel,
                float abs, const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int reported = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const float tol = abs + rel * std::fabs(want[i]);
    if (!(std::fabs(got[i] - want[i]) <= tol) && reported++ < 10) {
      ADD_FAILURE() << what << "[" << i << "]: got " << got[i] << ", want " << want[i];
    }
  }
}

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

}  // namespace
}  // namespace joule::kernels::cuda
