#include "worker/ep/transport.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <new>
#include <string>
#include <vector>

namespace joule::ep {

void FreeHostBuffer::operator()(std::byte* p) const { std::free(p); }

HostBuffer AllocateHostBuffer(size_t bytes) {
  constexpr size_t kHugePage = size_t{2} << 20;
  void* p = nullptr;
  if (bytes < kHugePage) {
    p = std::malloc(std::max<size_t>(bytes, 1));
  } else {
    const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    p = std::aligned_alloc(kHugePage, rounded);
    if (p != nullptr) madvise(p, rounded, MADV_HUGEPAGE);
  }
  if (p == nullptr) throw std::bad_alloc();
  return HostBuffer(static_cast<std::byte*>(p));
}

absl::StatusOr<std::unique_ptr<SharedWindows>> Transport::MapSharedWindows(size_t /*bytes*/) {
  return absl::UnimplementedError(name() + " transport: no shared windows");
}

absl::Status Transport::Barrier() {
  const char token = 0;
  std::vector<char> all(world_size());
  return AllGather(&token, 1, all.data());
}

}  // namespace joule::ep
