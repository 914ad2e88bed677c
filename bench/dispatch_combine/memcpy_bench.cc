// The GPU baseline of the dispatch/combine benchmark: cudaMemcpyAsync
// device-to-device on one GPU at the payload sizes of
// joule-dispatch-combine-bench --device cuda:N (gpu_run.sh runs both on the
// same GPU in one run, and the report divides the executor's bandwidth by
// this one).
//
//   joule-memcpy-bench --ep 2,4 --hidden 7168 --tokens 128,4096 [--device cuda:0|fake]
//       [--top-k 8] [--experts 64] [--iters 50] [--out FILE]
//
// Per (EP, hidden, tokens) point: bytes = the BF16 dispatch rows a rank is
// expected to send to its peers under uniform top-k routing (payload.h: the
// executor's dispatch_bytes_per_rank on a device, and its combine bytes too).
// One copy of that many bytes between two cudaMalloc'd buffers, timed with a
// pair of cudaEvents around it on one stream; 3 warm-up copies, then --iters
// timed ones, median. Bandwidth = bytes / time: each byte is read once and
// written once, as cudaMemcpy bandwidth is usually quoted. One JSON line per
// point to FILE (appended) or stdout.
//
// --device fake copies between two buffers of the CPU-backed fake device
// (Backend::CopyAsync, timed by the host clock around the copy and its
// Synchronize): it measures nothing about a GPU, it lets CI run gpu_run.sh.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "bench/dispatch_combine/payload.h"
#include "bench/dispatch_combine/rank_util.h"
#include "common/options.h"
#include "common/status.h"
#include "worker/device/device_spec.h"
#include "worker/device/fake_device_backend.h"

#if JOULE_HAVE_CUDA_BACKEND
#include <cuda_runtime_api.h>

#include "kernels/cuda/cuda_check.h"
#endif

namespace {

using joule::bench::Check;
using joule::bench::ParseSizeList;

#define JOULE_MEMCPY_BENCH_FLAGS(X)                                                    \
  X(std::string, device, "cuda:0", "the GPU (cuda:N), or fake (a CI smoke test)")      \
  X(std::string, ep, "", "EP sizes whose payloads to copy, comma-separated (required)") \
  X(std::string, hidden, "", "hidden sizes, comma-separated (required)")              \
  X(std::string, tokens, "", "tokens per rank, comma-separated (required)")           \
  X(int, top_k, 8, "experts per token")                                               \
  X(int, experts, 64, "experts of the MoE layer (as joule-dispatch-combine-bench)")   \
  X(int, iters, 50, "timed copies per point (at least 3)")                            \
  X(std::string, out, "", "file to append the JSON lines to (default: stdout)")

struct Args {
  JOULE_MEMCPY_BENCH_FLAGS(JOULE_OPTION_FIELD)
  std::vector<joule::Option> Options() { return {JOULE_MEMCPY_BENCH_FLAGS(JOULE_OPTION_BIND)}; }
  absl::Status Validate() const {
    auto spec = joule::device::ParseDeviceSpec(device);
    if (device != "fake" && (!spec.ok() || !spec->is_cuda())) {
      return absl::InvalidArgumentError(
          absl::StrCat("--device: expected cuda:N or fake, got \"", device, "\""));
    }
    for (auto [flag, list] : {std::pair{"ep", &ep}, std::pair{"hidden", &hidden},
                              std::pair{"tokens", &tokens}}) {
      RETURN_IF_ERROR(ParseSizeList(flag, *list).status());
    }
    if (top_k < 1 || top_k > experts) {
      return absl::InvalidArgumentError("--top-k: must be in [1, --experts]");
    }
    if (iters < 3) return absl::InvalidArgumentError("--iters: must be at least 3");
    return absl::OkStatus();
  }
};

// Two buffers of `bytes` on one device, and the time of one copy between them.
class Copier {
 public:
  virtual ~Copier() = default;
  virtual std::string impl() const = 0;
  virtual std::string gpu() const = 0;
  // Seconds one copy of `bytes` (at most the constructed size) takes.
  virtual absl::StatusOr<double> Copy(size_t bytes) = 0;
};

#if JOULE_HAVE_CUDA_BACKEND
struct CudaFree {
  void operator()(void* p) const { cudaFree(p); }
};
using DeviceBytes = std::unique_ptr<void, CudaFree>;

absl::StatusOr<DeviceBytes> AllocateDevice(size_t bytes) {
  void* p = nullptr;
  JOULE_CUDA_RETURN_IF_ERROR(cudaMalloc(&p, std::max<size_t>(bytes, 1)));
  DeviceBytes owned(p);
  JOULE_CUDA_RETURN_IF_ERROR(cudaMemset(p, 0x5a, bytes));
  return owned;
}

// cudaMemcpyAsync on its own stream between a pair of cudaEvents.
class CudaCopier : public Copier {
 public:
  ~CudaCopier() override {
    if (start_ != nullptr) cudaEventDestroy(start_);
    if (stop_ != nullptr) cudaEventDestroy(stop_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }
  static absl::StatusOr<std::unique_ptr<Copier>> Create(int index, size_t bytes) {
    auto c = std::make_unique<CudaCopier>();
    JOULE_CUDA_RETURN_IF_ERROR(cudaSetDevice(index));
    cudaDeviceProp prop{};
    JOULE_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, index));
    c->gpu_ = prop.name;
    ASSIGN_OR_RETURN(c->src_, AllocateDevice(bytes));
    ASSIGN_OR_RETURN(c->dst_, AllocateDevice(bytes));
    JOULE_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&c->stream_, cudaStreamNonBlocking));
    JOULE_CUDA_RETURN_IF_ERROR(cudaEventCreate(&c->start_));
    JOULE_CUDA_RETURN_IF_ERROR(cudaEventCreate(&c->stop_));
    return std::unique_ptr<Copier>(std::move(c));
  }
  std::string impl() const override { return "cudaMemcpyAsync-d2d"; }
  std::string gpu() const override { return gpu_; }
  absl::StatusOr<double> Copy(size_t bytes) override {
    JOULE_CUDA_RETURN_IF_ERROR(cudaEventRecord(start_, stream_));
    JOULE_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(dst_.get(), src_.get(), bytes, cudaMemcpyDeviceToDevice, stream_));
    JOULE_CUDA_RETURN_IF_ERROR(cudaEventRecord(stop_, stream_));
    JOULE_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(stop_));
    float ms = 0;
    JOULE_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, start_, stop_));
    return ms * 1e-3;
  }

 private:
  std::string gpu_;
  DeviceBytes src_, dst_;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
};
#endif

// The fake device: its CopyAsync and Synchronize, timed by the host clock.
class FakeCopier : public Copier {
 public:
  static absl::StatusOr<std::unique_ptr<Copier>> Create(size_t bytes) {
    auto c = std::make_unique<FakeCopier>();
    ASSIGN_OR_RETURN(c->src_, c->backend_.Allocate(joule::device::MemoryKind::kDevice, bytes));
    ASSIGN_OR_RETURN(c->dst_, c->backend_.Allocate(joule::device::MemoryKind::kDevice, bytes));
    return std::unique_ptr<Copier>(std::move(c));
  }
  std::string impl() const override { return "fake-device-copy"; }
  std::string gpu() const override { return "fake"; }
  absl::StatusOr<double> Copy(size_t bytes) override {
    const auto start = std::chrono::steady_clock::now();
    RETURN_IF_ERROR(backend_.CopyAsync(dst_.data(), src_.data(), bytes));
    RETURN_IF_ERROR(backend_.Synchronize());
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }

 private:
  joule::device::FakeDeviceBackend backend_{1, /*asynchronous=*/true};
  joule::device::Buffer src_, dst_;
};

absl::StatusOr<std::unique_ptr<Copier>> CreateCopier(const std::string& device, size_t bytes) {
  if (device == "fake") return FakeCopier::Create(bytes);
#if JOULE_HAVE_CUDA_BACKEND
  return CudaCopier::Create(joule::device::ParseDeviceSpec(device)->index, bytes);
#else
  return absl::FailedPreconditionError("--device " + device + ": this build has no CUDA");
#endif
}

struct Point {
  int ep, hidden, tokens;
  uint64_t bytes;
};

// Sorted seconds of `iters` copies of `bytes` after 3 warm-up copies.
absl::StatusOr<std::vector<double>> TimeCopies(Copier& copier, size_t bytes, int iters) {
  std::vector<double> seconds;
  for (int i = 0; i < 3 + iters; ++i) {
    ASSIGN_OR_RETURN(const double s, copier.Copy(bytes));
    if (i >= 3) seconds.push_back(s);
  }
  std::sort(seconds.begin(), seconds.end());
  return seconds;
}

absl::Status Run(const Args& a, FILE* out) {
  const std::vector<int> eps = *ParseSizeList("ep", a.ep);
  const std::vector<int> hidden_sizes = *ParseSizeList("hidden", a.hidden);
  const std::vector<int> token_counts = *ParseSizeList("tokens", a.tokens);
  std::vector<Point> points;
  uint64_t most = 1;
  for (int ep : eps) {
    for (int hidden : hidden_sizes) {
      for (int tokens : token_counts) {
        const uint64_t bytes =
            joule::bench::ExpectedDispatchRowBytes(tokens, hidden, a.top_k, a.experts, ep);
        points.push_back({ep, hidden, tokens, bytes});
        most = std::max(most, bytes);
      }
    }
  }
  ASSIGN_OR_RETURN(std::unique_ptr<Copier> copier, CreateCopier(a.device, most));
  for (const Point& p : points) {
    ASSIGN_OR_RETURN(const std::vector<double> s,
                     TimeCopies(*copier, p.bytes, a.iters));
    const double median = s[s.size() / 2];
    std::fprintf(out,
                 "{\"impl\":\"%s\",\"device\":\"%s\",\"gpu\":\"%s\",\"ep\":%d,"
                 "\"hidden\":%d,\"tokens\":%d,\"top_k\":%d,\"experts\":%d,\"bytes\":%llu,"
                 "\"iters\":%d,\"us_median\":%.2f,\"us_min\":%.2f,\"GBps\":%.2f}\n",
                 copier->impl().c_str(), a.device.c_str(), copier->gpu().c_str(), p.ep, p.hidden, p.tokens, a.top_k, a.experts,
                 static_cast<unsigned long long>(p.bytes), a.iters, median * 1e6, s[0] * 1e6,
                 double(p.bytes) / median / 1e9);
    std::fflush(out);
  }
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  auto parsed = joule::ParseConfig<Args>(
      "usage: joule-memcpy-bench --ep E,.. --hidden H,.. --tokens T,.. [--device cuda:N|fake] [flags]",
      "JOULE_BENCH_", argc, argv);
  if (!parsed.ok()) return joule::ReportOptionsError("joule-memcpy-bench", parsed.status());
  FILE* out = parsed->out.empty() ? stdout : std::fopen(parsed->out.c_str(), "a");
  if (out == nullptr) Check(absl::InternalError("cannot open --out " + parsed->out), "out");
  Check(Run(*parsed, out), "joule-memcpy-bench");
  if (out != stdout) std::fclose(out);
  return 0;
}
