#include "worker/device/backend.h"

#include <atomic>

#include "absl/strings/str_cat.h"
#include "worker/device/cpu_backend.h"
#include "worker/device/cuda_backend.h"

namespace joule::device {
namespace {

class SynchronizingEvent final : public Event {
 public:
  explicit SynchronizingEvent(Backend* backend) : backend_(backend) {}
  absl::Status Record() override { return absl::OkStatus(); }
  absl::Status Wait() override { return backend_->Synchronize(); }

 private:
  Backend* backend_;
};

// Copies on the backend's own stream.
class BackendCopyStream final : public CopyStream {
 public:
  explicit BackendCopyStream(Backend* backend) : backend_(backend) {}
  absl::Status CopyAsync(void* dst, const void* src, size_t bytes) override {
    return backend_->CopyAsync(dst, src, bytes);
  }
  absl::Status Synchronize() override { return backend_->Synchronize(); }

 private:
  Backend* backend_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Event>> Backend::CreateEvent() {
  return std::make_unique<SynchronizingEvent>(this);
}

absl::StatusOr<std::unique_ptr<CopyStream>> Backend::CreateCopyStream() {
  return std::make_unique<BackendCopyStream>(this);
}

absl::Status Backend::BeginCapture() {
  return absl::UnimplementedError(absl::StrCat(spec().ToString(), " has no graphs"));
}

absl::StatusOr<std::unique_ptr<Graph>> Backend::EndCapture() {
  return absl::UnimplementedError(absl::StrCat(spec().ToString(), " has no graphs"));
}

namespace {
std::atomic<FakeBackendFactory> fake_factory{nullptr};
}  // namespace

void SetFakeBackendFactory(FakeBackendFactory factory) { fake_factory.store(factory); }

absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(const DeviceSpec& spec,
                                                       const BackendOptions& options) {
  switch (spec.kind) {
    case DeviceKind::kCuda: return CreateCudaBackend(spec.index, options);
    case DeviceKind::kFake:
      if (FakeBackendFactory make = fake_factory.load()) return make(options);
      return absl::FailedPreconditionError(
          "--device fake: the fake device (tests only) is in joule-worker-fake-device, not in "
          "this binary");
    case DeviceKind::kCpu: break;
  }
  return std::make_unique<CpuBackend>(options.num_threads);
}

}  // namespace joule::device
