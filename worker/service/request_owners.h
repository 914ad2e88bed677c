// Who submitted each live request, so that only its submitter may cancel it.
// A caller is an opaque identity (the Worker gRPC service uses the submitting
// connection's peer); plain C++, thread-safe.
#pragma once

#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"

namespace joule::worker {

class RequestOwners {
 public:
  enum class Access { kUnknown, kOwner, kOther };

  // Records `caller` as the owner of `request_id`; false when the id is live
  // already (whoever holds it).
  bool Claim(const std::string& request_id, const std::string& caller) {
    absl::MutexLock lock(&mu_);
    return owners_.emplace(request_id, caller).second;
  }

  // The request ended: its id is free again.
  void Release(const std::string& request_id) {
    absl::MutexLock lock(&mu_);
    owners_.erase(request_id);
  }

  Access Check(const std::string& request_id, const std::string& caller) const {
    absl::MutexLock lock(&mu_);
    auto it = owners_.find(request_id);
    if (it == owners_.end()) return Access::kUnknown;
    return it->second == caller ? Access::kOwner : Access::kOther;
  }

 private:
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::string> owners_ ABSL_GUARDED_BY(mu_);
};

}  // namespace joule::worker
