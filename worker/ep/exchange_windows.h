// The two shared windows an expert-parallel exchange writes into when its
// ranks can write each other's memory: dispatch rows land in each
// destination's dispatch window, combine rows in each source's combine
// window, and a barrier stands in for each all-to-all. Host memory (UCX's
// shared memory) for CPU workers, device memory (CUDA IPC) for GPU workers:
// the mapper says which.
#pragma once

#include <cstddef>
#include <functional>
#include <memory>

#include "absl/status/statusor.h"
#include "worker/ep/transport.h"

namespace joule::ep {

class ExchangeWindows {
 public:
  // Maps one window of `bytes` on every rank (collective); Unimplemented
  // (the same answer on every rank) when some rank cannot.
  using Mapper = std::function<absl::StatusOr<std::unique_ptr<SharedWindows>>(size_t bytes)>;

  // Before a window is released to map a larger one (collective, on every
  // rank): e.g. close the mappings of peers' windows and pass a barrier, so
  // no rank frees memory a peer still has open. May be null.
  using Release = std::function<absl::Status(SharedWindows& window)>;

  // `enabled` false: never mapped (Ensure answers false). `rank` is for logs.
  ExchangeWindows(Mapper map, bool enabled, int rank, Release release = nullptr);

  // Collective: windows of at least these sizes on every rank (grown
  // together, geometrically: every rank passes the same sizes). False once
  // mapping answered Unimplemented (then for good); other errors break the
  // group and are returned.
  absl::StatusOr<bool> Ensure(size_t combine_bytes, size_t dispatch_bytes);

  // Collective: releases both windows (the Release callback first, so no
  // rank frees memory a peer still has open); the next Ensure maps anew.
  // For an executor about to be replaced while its group goes on.
  absl::Status ReleaseAll();

  SharedWindows* combine() const { return combine_.get(); }
  SharedWindows* dispatch() const { return dispatch_.get(); }

 private:
  // The Release callback on `win` when it is mapped, then frees it.
  absl::Status Free(std::unique_ptr<SharedWindows>& win);

  Mapper map_;
  Release release_;
  bool off_;
  int rank_;
  std::unique_ptr<SharedWindows> combine_, dispatch_;
};

}  // namespace joule::ep
