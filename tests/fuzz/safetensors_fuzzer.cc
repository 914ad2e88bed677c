// The safetensors header (common/safetensors.h): the input is a whole
// .safetensors file, opened the way a worker opens a checkpoint (mmap) from an
// in-memory file. A file Open() accepts must describe tensors that lie inside
// the file, have the bytes their dtype and shape say, and do not overlap.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "common/safetensors.h"
#include "tests/fuzz/fuzz_check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const int fd = memfd_create("fuzz.safetensors", MFD_CLOEXEC);
  FUZZ_CHECK(fd >= 0, "memfd_create failed");
  for (size_t done = 0; done < size;) {
    const ssize_t n = write(fd, data + done, size - done);
    FUZZ_CHECK(n > 0, "write to the memfd failed");
    done += static_cast<size_t>(n);
  }
  const std::string path = "/proc/self/fd/" + std::to_string(fd);
  auto file = joule::SafetensorsFile::Open(path);
  if (file.ok()) {
    std::vector<std::pair<const char*, const char*>> ranges;
    const char* lowest = nullptr;
    for (const auto& [name, t] : (*file)->tensors()) {
      FUZZ_CHECK(t.name == name, "tensor '%s' stored as '%s'", t.name.c_str(), name.c_str());
      const int64_t numel = t.numel();
      FUZZ_CHECK(numel >= 0, "tensor '%s': numel %lld", name.c_str(), static_cast<long long>(numel));
      FUZZ_CHECK(t.nbytes == static_cast<size_t>(numel) * joule::DTypeSize(t.dtype), "tensor '%s': %zu bytes",
                 name.c_str(), t.nbytes);
      FUZZ_CHECK(t.nbytes == 0 || t.data != nullptr, "tensor '%s' has bytes but no data", name.c_str());
      const char* begin = static_cast<const char*>(t.data);
      if (t.nbytes > 0) {
        ranges.emplace_back(begin, begin + t.nbytes);
        lowest = lowest == nullptr ? begin : std::min(lowest, begin);
        // Touch both ends: a view outside the mapping faults here.
        volatile char first = begin[0];
        volatile char last = begin[t.nbytes - 1];
        (void)first;
        (void)last;
      }
    }
    // Every view lies in the data section, which ends where the file ends.
    std::sort(ranges.begin(), ranges.end());
    for (size_t i = 1; i < ranges.size(); ++i) {
      FUZZ_CHECK(ranges[i].first >= ranges[i - 1].second, "tensors overlap");
    }
    if (lowest != nullptr) {
      FUZZ_CHECK(static_cast<size_t>(ranges.back().second - lowest) <= size, "tensors span more than the file");
    }
  } else {
    FUZZ_CHECK(!file.status().message().empty(), "refused without a message");
  }
  close(fd);
  return 0;
}
