#include "worker/ep/exchange_windows.h"

#include <algorithm>
#include <utility>

#include "common/logging.h"
#include "common/status.h"

namespace joule::ep {

ExchangeWindows::ExchangeWindows(Mapper map, bool enabled, int rank, Release release)
    : map_(std::move(map)), release_(std::move(release)), off_(!enabled), rank_(rank) {}

absl::StatusOr<bool> ExchangeWindows::Ensure(size_t combine_bytes, size_t dispatch_bytes) {
  if (off_) return false;
  for (auto [win, need] : {std::pair{&combine_, combine_bytes}, std::pair{&dispatch_, dispatch_bytes}}) {
    if (*win != nullptr && (*win)->bytes() >= need) continue;
    const size_t grown = std::max(need, *win == nullptr ? size_t{0} : 2 * (*win)->bytes());
    RETURN_IF_ERROR(Free(*win));
    absl::StatusOr<std::unique_ptr<SharedWindows>> mapped = map_(grown);
    if (absl::IsUnimplemented(mapped.status())) {  // the same answer on every rank
      JOULE_LOG(Info) << "rank " << rank_
                      << ": expert-parallel dispatch/combine through all-to-all-v ("
                      << mapped.status().message() << ")";
      off_ = true;
      combine_.reset();
      dispatch_.reset();
      return false;
    }
    if (!mapped.ok()) return mapped.status();
    if (combine_ == nullptr && dispatch_ == nullptr) {
      JOULE_LOG(Info) << "rank " << rank_
                      << ": expert-parallel dispatch/combine write into peers' shared windows";
    }
    *win = *std::move(mapped);
  }
  return true;
}

absl::Status ExchangeWindows::Free(std::unique_ptr<SharedWindows>& win) {
  if (win != nullptr && release_ != nullptr) RETURN_IF_ERROR(release_(*win));
  win.reset();
  return absl::OkStatus();
}

absl::Status ExchangeWindows::ReleaseAll() {
  RETURN_IF_ERROR(Free(combine_));
  return Free(dispatch_);
}

}  // namespace joule::ep
