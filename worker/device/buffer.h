// A buffer that knows where it lives: host memory, pinned (page-locked) host
// memory the GPU copies from asynchronously, or device memory. Allocated by a
// Backend (worker/device/backend.h), which binds it to its device and stream.
#pragma once

#include <cstddef>
#include <string_view>

namespace joule::device {

enum class MemoryKind { kHost, kPinned, kDevice };
std::string_view MemoryKindName(MemoryKind kind);

// Owns one allocation; move-only. `release` frees it (null for a view that
// owns nothing).
class Buffer {
 public:
  using Release = void (*)(void* data, MemoryKind kind);

  Buffer() = default;
  Buffer(void* data, size_t bytes, MemoryKind kind, Release release)
      : data_(data), bytes_(bytes), kind_(kind), release_(release) {}
  ~Buffer() { Reset(); }
  Buffer(Buffer&& other) noexcept { *this = static_cast<Buffer&&>(other); }
  Buffer& operator=(Buffer&& other) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  MemoryKind kind() const { return kind_; }
  bool empty() const { return data_ == nullptr; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  void Reset();

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
  MemoryKind kind_ = MemoryKind::kHost;
  Release release_ = nullptr;
};

// Carves one allocation into aligned slices: Reserve every slice first (the
// size query), allocate bytes() once, then find each slice at its offset.
class WorkspaceLayout {
 public:
  static constexpr size_t kAlignment = 256;  // cuBLASLt and vector loads want >= 16
  // Returns the slice's offset.
  size_t Reserve(size_t bytes) {
    const size_t offset = bytes_;
    bytes_ += (bytes + kAlignment - 1) / kAlignment * kAlignment;
    return offset;
  }
  size_t bytes() const { return bytes_; }

 private:
  size_t bytes_ = 0;
};

}  // namespace joule::device
