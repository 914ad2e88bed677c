#include "worker/ep/file_rendezvous.h"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace joule::ep {

absl::Status PublishAddress(const std::string& dir, int rank, const std::string& address) {
  const std::string path = absl::StrCat(dir, "/addr.", rank);
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary);
    out.write(address.data(), static_cast<std::streamsize>(address.size()));
    if (!out) return absl::InternalError(absl::StrCat("cannot write ", tmp));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    return absl::InternalError(absl::StrCat("rename ", tmp, ": ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::string>> CollectAddresses(const std::string& dir, int world_size,
                                                          absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  std::vector<std::string> addresses(world_size);
  for (int r = 0; r < world_size; ++r) {
    const std::string path = absl::StrCat(dir, "/addr.", r);
    while (!std::filesystem::exists(path)) {
      if (absl::Now() > deadline) {
        return absl::DeadlineExceededError(absl::StrCat("rank ", r, " did not publish ", path));
      }
      absl::SleepFor(absl::Milliseconds(5));
    }
    std::ifstream in(path, std::ios::binary);
    addresses[r].assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  return addresses;
}

}  // namespace joule::ep
