#include "worker/device/buffer.h"

namespace joule::device {

std::string_view MemoryKindName(MemoryKind kind) {
  switch (kind) {
    case MemoryKind::kHost: return "host";
    case MemoryKind::kPinned: return "pinned";
    case MemoryKind::kDevice: return "device";
  }
  return "?";
}

Buffer& Buffer::operator=(Buffer&& other) noexcept {
  if (this != &other) {
    Reset();
    data_ = other.data_;
    bytes_ = other.bytes_;
    kind_ = other.kind_;
    release_ = other.release_;
    other.data_ = nullptr;
    other.bytes_ = 0;
    other.release_ = nullptr;
  }
  return *this;
}

void Buffer::Reset() {
  if (data_ != nullptr && release_ != nullptr) release_(data_, kind_);
  data_ = nullptr;
  bytes_ = 0;
  release_ = nullptr;
}

}  // namespace joule::device
