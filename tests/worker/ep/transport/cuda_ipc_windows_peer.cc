// One rank as a process, for cuda_ipc_windows_test: a UCX transport for
// control, CUDA IPC windows (worker/ep/cuda_ipc_windows.h) on a GPU.
//
//   cuda_ipc_windows_peer RANK WORLD DIR SCENARIO TIMEOUT_MS DEVICES SEED
//
// DEVICES is "one" (every rank on device 0) or "spread" (rank % device count).
// Publishes its UCX address in DIR, collects the others', connects and runs
// SCENARIO:
//   "exchange"      two mappings of 4099 bytes per rank alive at once (distinct
//                   addresses, an exchange through one leaves the other
//                   alone), then windows of 4099 bytes per rank, then (the first released
//                   in the strict order) 3 MiB per rank, then 8 mappings of
//                   random sizes from SEED (0 bytes among them): each starts
//                   zero-filled, every rank writes its chunk of every rank's
//                   window with cudaMemcpy, and after a barrier each finds
//                   every peer's chunk in its own;
//   "foreign-host"  a rank whose JOULE_CUDA_IPC_TEST_HOST is set reports that
//                   as its host identity: every rank must get Unimplemented
//                   naming another host, and a mapping after it (every rank
//                   with its real identity) must work.
// Exit status: 0 when the scenario behaved as the contract says, 1 when it
// did not, 2 on bad arguments or a failed setup. Prints why on stderr.
#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_check.h"
#include "tests/worker/ep/transport/conformance.h"
#include "worker/ep/cuda_ipc_windows.h"
#include "worker/ep/file_rendezvous.h"
#include "worker/ep/ucx_transport.h"

namespace {

using joule::ep::SharedWindows;
using joule::ep::Transport;
using joule::ep::testing::WindowCopy;

WindowCopy DeviceWindowCopy() {
  return {
      .to_window = [](void* window, const void* host, size_t n) -> absl::Status {
        if (n == 0) return absl::OkStatus();  // a 0-byte window's staging may be null
        JOULE_CUDA_RETURN_IF_ERROR(cudaMemcpy(window, host, n, cudaMemcpyHostToDevice));
        return absl::OkStatus();
      },
      .from_window = [](void* host, const void* window, size_t n) -> absl::Status {
        if (n == 0) return absl::OkStatus();
        JOULE_CUDA_RETURN_IF_ERROR(cudaMemcpy(host, window, n, cudaMemcpyDeviceToHost));
        return absl::OkStatus();
      },
      // Writes complete before the barrier that publishes them.
      .settle = []() -> absl::Status {
        JOULE_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
        return absl::OkStatus();
      },
  };
}

// Maps windows of `chunk` bytes per rank, checks they start zero-filled and
// that an exchange through them works. `strict_release`: ClosePeerWindows, a
// barrier, then the destructor; otherwise the destructor right after the
// exchange's last barrier.
absl::Status CheckOneMapping(Transport& control, int device, size_t chunk, uint64_t round,
                             bool strict_release) {
  const int world = control.world_size();
  const int me = control.rank();
  const std::string what = absl::StrCat("windows of ", chunk, " bytes per rank: ");
  auto windows = joule::ep::MapCudaIpcWindows(control, device, chunk * world);
  if (!windows.ok()) {
    return absl::Status(windows.status().code(), what + windows.status().ToString());
  }
  const SharedWindows& win = **windows;
  if (win.bytes() != chunk * world) {
    return absl::InternalError(absl::StrCat(what, "bytes() is ", win.bytes()));
  }
  for (int p = 0; p < world; ++p) {
    if (win.at(p) == nullptr) {
      return absl::InternalError(absl::StrCat(what, "no window of rank ", p));
    }
  }
  std::vector<uint8_t> own(win.bytes(), 0xAB);
  const WindowCopy copy = DeviceWindowCopy();
  if (absl::Status s = copy.from_window(own.data(), win.at(me), own.size()); !s.ok()) return s;
  for (size_t i = 0; i < own.size(); ++i) {
    if (own[i] != 0) {
      return absl::DataLossError(absl::StrCat(what, "byte ", i, " of a new window is ",
                                              int{own[i]}, ", not 0"));
    }
  }
  // Nobody writes a peer's window before the peer has checked it is zero.
  if (absl::Status s = control.Barrier(); !s.ok()) return s;
  const absl::Status exchanged = joule::ep::testing::CheckWindowExchange(control, win, copy, round);
  if (!exchanged.ok()) {
    return absl::Status(exchanged.code(), what + exchanged.ToString());
  }
  if (strict_release) {
    joule::ep::ClosePeerWindows(**windows);
    for (int p = 0; p < world; ++p) {
      if (p != me && win.at(p) != nullptr) {
        return absl::InternalError(absl::StrCat(what, "rank ", p, "'s window still mapped"));
      }
    }
    if (win.at(me) == nullptr) {
      return absl::InternalError(what + "own window closed with the peers'");
    }
    if (absl::Status s = control.Barrier(); !s.ok()) return s;
  }
  windows->reset();
  // The release left no error behind for the next launch check.
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) {
    return absl::InternalError(absl::StrCat(what, "release left ", cudaGetErrorName(err)));
  }
  return absl::OkStatus();
}

// Two small mappings alive at once, after another small allocation, as a
// worker holds them (dispatch and combine windows among its other buffers):
// each rank's two windows are distinct on every rank, and an exchange
// through one leaves the other's contents alone.
absl::Status CheckTwoLiveMappings(Transport& control, int device) {
  const int world = control.world_size();
  void* neighbour = nullptr;  // a small buffer the windows could share a block with
  JOULE_CUDA_RETURN_IF_ERROR(cudaMalloc(&neighbour, 4096));
  const size_t bytes = size_t{4099} * world;
  auto a = joule::ep::MapCudaIpcWindows(control, device, bytes);
  absl::StatusOr<std::unique_ptr<SharedWindows>> b = a.status();
  if (a.ok()) b = joule::ep::MapCudaIpcWindows(control, device, bytes);
  absl::Status result = b.status();
  for (int p = 0; result.ok() && p < world; ++p) {
    if ((*a)->at(p) == (*b)->at(p)) {
      result = absl::InternalError(absl::StrCat("two live mappings: rank ", p,
                                                "'s windows are one address"));
    }
  }
  const WindowCopy copy = DeviceWindowCopy();
  uint64_t round = 50;
  for (SharedWindows* win : {a.ok() ? a->get() : nullptr, b.ok() ? b->get() : nullptr,
                             a.ok() ? a->get() : nullptr}) {
    if (!result.ok()) break;
    result = joule::ep::testing::CheckWindowExchange(control, *win, copy, round++);
  }
  if (!result.ok()) result = absl::Status(result.code(), "two live mappings: " + result.ToString());
  if (a.ok()) joule::ep::ClosePeerWindows(**a);
  if (b.ok()) joule::ep::ClosePeerWindows(**b);
  if (absl::Status s = control.Barrier(); !s.ok() && result.ok()) result = s;
  cudaFree(neighbour);
  return result;
}

absl::Status Exchange(Transport& control, int device, uint64_t seed) {
  if (absl::Status s = CheckTwoLiveMappings(control, device); !s.ok()) return s;
  // Small and odd, then larger after the first was released.
  if (absl::Status s = CheckOneMapping(control, device, 4096 + 3, 1, true); !s.ok()) return s;
  if (absl::Status s = CheckOneMapping(control, device, size_t{3} << 20, 2, false); !s.ok()) {
    return s;
  }
  // Every rank draws the same sizes from the same seed.
  std::mt19937_64 rng(seed);
  for (int round = 0; round < 8; ++round) {
    size_t chunk = 0;
    if (round != 3) chunk = rng() % 4 == 0 ? 1 + rng() % 64 : 1 + rng() % (size_t{2} << 20);
    if (absl::Status s = CheckOneMapping(control, device, chunk, 100 + round, round % 2 == 0);
        !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

absl::Status ForeignHost(Transport& control, int device) {
  const char* fake = std::getenv("JOULE_CUDA_IPC_TEST_HOST");
  const size_t bytes = size_t{4096} * control.world_size();
  auto windows = fake != nullptr ? joule::ep::MapCudaIpcWindows(control, device, bytes, fake)
                                 : joule::ep::MapCudaIpcWindows(control, device, bytes);
  if (!absl::IsUnimplemented(windows.status()) ||
      !absl::StrContains(windows.status().message(), "needs every rank on one host")) {
    return absl::InternalError(absl::StrCat(
        "with a rank on another host: expected Unimplemented, got ", windows.status().ToString()));
  }
  std::fprintf(stderr, "rank %d: %s\n", control.rank(), windows.status().ToString().c_str());
  // Nothing was allocated and the group is fine: a mapping after it works.
  return CheckOneMapping(control, device, 4096, 7, false);
}

int Run(int rank, int world, const std::string& dir, const std::string& scenario,
        absl::Duration timeout, const std::string& devices, uint64_t seed) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::fprintf(stderr, "rank %d: no CUDA device\n", rank);
    return 2;
  }
  const int device = devices == "spread" ? rank % count : 0;
  // The context first, so the first collective does not wait on a peer's start-up.
  if (cudaSetDevice(device) != cudaSuccess || cudaFree(nullptr) != cudaSuccess) {
    std::fprintf(stderr, "rank %d: cannot use device %d\n", rank, device);
    return 2;
  }
  auto transport = joule::ep::UcxTransport::Create(rank, world, {.timeout = timeout});
  if (!transport.ok()) {
    std::fprintf(stderr, "rank %d: %s\n", rank, transport.status().ToString().c_str());
    return 2;
  }
  joule::ep::UcxTransport& t = **transport;
  if (absl::Status s = joule::ep::PublishAddress(dir, rank, t.address()); !s.ok()) {
    std::fprintf(stderr, "rank %d: %s\n", rank, s.ToString().c_str());
    return 2;
  }
  auto addresses = joule::ep::CollectAddresses(dir, world, absl::Seconds(30));
  if (!addresses.ok()) {
    std::fprintf(stderr, "rank %d: %s\n", rank, addresses.status().ToString().c_str());
    return 2;
  }
  if (absl::Status s = t.Connect(*addresses); !s.ok()) {
    std::fprintf(stderr, "rank %d: connect: %s\n", rank, s.ToString().c_str());
    return 2;
  }
  absl::Status result;
  if (scenario == "exchange") {
    result = Exchange(t, device, seed);
  } else if (scenario == "foreign-host") {
    result = ForeignHost(t, device);
  } else {
    std::fprintf(stderr, "unknown scenario '%s'\n", scenario.c_str());
    return 2;
  }
  if (!result.ok()) {
    std::fprintf(stderr, "rank %d (device %d): %s: FAILED: %s\n", rank, device, scenario.c_str(),
                 result.ToString().c_str());
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int rank = 0, world = 0, timeout_ms = 0;
  uint64_t seed = 0;
  const std::string devices = argc > 6 ? argv[6] : "";
  if (argc != 8 || !absl::SimpleAtoi(argv[1], &rank) || !absl::SimpleAtoi(argv[2], &world) ||
      !absl::SimpleAtoi(argv[5], &timeout_ms) || timeout_ms <= 0 ||
      (devices != "one" && devices != "spread") || !absl::SimpleAtoi(argv[7], &seed)) {
    std::fprintf(stderr, "usage: %s RANK WORLD DIR SCENARIO TIMEOUT_MS one|spread SEED\n", argv[0]);
    return 2;
  }
  return Run(rank, world, argv[3], argv[4], absl::Milliseconds(timeout_ms), devices, seed);
}
