#include "worker/ep/transport.h"

#include <vector>

namespace joule::ep {

absl::Status Transport::Barrier() {
  const char token = 0;
  std::vector<char> all(world_size());
  return AllGather(&token, 1, all.data());
}

}  // namespace joule::ep
