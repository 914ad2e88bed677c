// Routed experts on the device, kept across placements. An expert-parallel
// executor is replaced at every placement change and regroup (a rebalance, a
// dead or joining rank), and most of what a rank held it still holds: the
// store gives the new executor the device copies the old one used and
// uploads only the experts the rank newly holds, so recovering from a dead
// peer costs a GPU the dead rank's share, not every expert again. Experts the
// model's resident weights hold (DeviceWeights::Create) are used in place.
//
// A copy lives as long as a DeviceExperts uses it: one the new placement
// drops is freed when the executor that used it goes.
#pragma once

#include <cstddef>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "worker/device/backend.h"
#include "worker/model/device_weights.h"
#include "worker/model/weights.h"

namespace joule {

// One expert's matrices on the device; `bytes` owns them unless resident.
struct StoredExpert {
  MlpView mlp;
  device::Buffer bytes;
};

// Every MoE layer's routed experts of one placement, as the grouped GEMMs
// read them (ExpertsView: device pointer tables).
class DeviceExperts {
 public:
  // [layer]: a default view for dense layers.
  const std::vector<ExpertsView>& layers() const { return layers_; }
  // Bytes this placement uploaded (experts no earlier placement had there).
  size_t uploaded_bytes() const { return uploaded_bytes_; }

 private:
  friend class DeviceExpertStore;
  std::vector<std::shared_ptr<const StoredExpert>> held_;
  device::Buffer tables_;  // every layer's pointer table, one allocation
  std::vector<ExpertsView> layers_;
  size_t uploaded_bytes_ = 0;
};

class DeviceExpertStore {
 public:
  // `resident` (may be null) holds the experts of `resident_host` on the
  // device; both must outlive the store and every DeviceExperts it made.
  DeviceExpertStore(device::Backend& backend, const DeviceWeights* resident,
                    const ModelWeights* resident_host);

  // The routed experts `weights` holds, on the device. Thread-safe.
  absl::StatusOr<std::unique_ptr<DeviceExperts>> Place(const ModelWeights& weights);

  // Stored copies alive now (resident ones included).
  int stored() const;

 private:
  using Key = std::pair<int, int>;  // layer, expert
  // The device copy of layer `l`'s expert `e`: stored, resident or uploaded.
  absl::StatusOr<std::shared_ptr<const StoredExpert>> Get(int l, int e, const MlpWeights& host,
                                                         size_t* uploaded)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::shared_ptr<const StoredExpert> Resident(int l, int e) const;
  // Uploads every layer's pointer table into `out->tables_`.
  absl::Status UploadTables(const std::vector<std::optional<ExpertTable>>& tables,
                            DeviceExperts* out);

  device::Backend& backend_;
  const DeviceWeights* const resident_;
  const ModelWeights* const resident_host_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<Key, std::weak_ptr<const StoredExpert>> stored_ ABSL_GUARDED_BY(mu_);
};

}  // namespace joule
