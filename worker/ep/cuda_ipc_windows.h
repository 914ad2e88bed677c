// Shared windows in GPU memory over CUDA IPC: the device twin of
// Transport::MapSharedWindows (UCX's host shared memory). Every rank's window
// is a cudaMalloc'd region that every other rank of the group (one process
// per rank, on one host) can load from and store to with kernels or
// cudaMemcpy through at(r). Built only with CUDA (JOULE_HAVE_CUDA_IPC).
//
// Visibility: a writer waits for its writes to complete (cudaStreamSynchronize
// on the stream that wrote, or an event it synchronizes on) BEFORE it enters
// the control collective that publishes them (e.g. control.Barrier()); a
// reader issues its reads only after returning from that collective. Each
// window is allocated with CU_POINTER_ATTRIBUTE_SYNC_MEMOPS (as UCX and Open
// MPI do for memory they export), so synchronous cudaMemcpy/cudaMemset calls on
// it do not return early; that is a safety net, the rule above still holds.
//
// Release: like UCX's windows, the destructor does no collective (it may run
// after the control transport broke): it closes this rank's mappings of the
// peers' windows (cudaIpcCloseMemHandle) and frees its own (cudaFree). Callers
// destroy windows only where every rank has passed a collective after its
// last access to them. CUDA calls freeing an exported allocation that another
// process still has open undefined, so where that matters (a long-lived
// group; not at exit), release in the strict order: ClosePeerWindows on every
// rank, a control collective, then destroy. The windows do not depend on the
// control transport once mapped and may outlive it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/ep/transport.h"

namespace joule::ep {

// Collective over `control` (a host-memory transport, e.g. UCX): every rank
// cudaMalloc's a zero-filled window of `bytes` (the same on every rank; the
// allocation rounded up to whole 2 MiB, so it shares its block with no other
// buffer) on CUDA device `device`, exports it (cudaIpcGetMemHandle, with the
// window's offset in the allocation the handle names), all-gathers the
// handles with its host identity and its device's UUID, and opens every
// peer's (cudaIpcOpenMemHandle, cudaIpcMemLazyEnablePeerAccess); several
// ranks may share one GPU. Leaves the calling thread's current device as it
// found it; at(r) is valid on `device`.
//
// Unimplemented on every rank (decided from the same all-gathered facts,
// before anything is allocated) when some rank is on another host, two ranks
// are one process, or some rank's GPU cannot reach another's
// (cudaDeviceCanAccessPeer false, or not visible to it); the caller then moves
// rows through a transport instead. Any other failure (no device, bad
// `device`, out of memory, a failing CUDA call) is an error on every rank that
// can still tell, naming the rank and the CUDA call; the caller then treats
// the group as broken. Errors of `control` are returned as they are.
absl::StatusOr<std::unique_ptr<SharedWindows>> MapCudaIpcWindows(Transport& control, int device,
                                                                 size_t bytes);

// The same, with this rank's host identity given instead of computed (tests
// inject a foreign host this way).
absl::StatusOr<std::unique_ptr<SharedWindows>> MapCudaIpcWindows(Transport& control, int device,
                                                                 size_t bytes,
                                                                 const std::string& host_identity);

// Closes this rank's mappings of its peers' windows now (at(p) becomes null
// for every peer p; this rank's own window stays): the first step of the
// strict release order above. `windows` must come from MapCudaIpcWindows.
void ClosePeerWindows(SharedWindows& windows);

// "<hostname>/<boot id>": equal on two ranks exactly when they run on one
// operating-system instance (/proc/sys/kernel/random/boot_id changes per boot).
std::string LocalHostIdentity();

// ---- The agreement, apart from CUDA (unit-tested on the CPU) ---------------

// What a rank tells its peers before anything is allocated.
struct PeerIdentity {
  std::string host;     // LocalHostIdentity()
  uint64_t process = 0;  // pid: IPC cannot open a handle in the process that made it
  std::string device;   // the GPU's UUID, 16 raw bytes (cudaDeviceProp::uuid)
  // UUIDs of the other GPUs this rank's GPU can load from and store to
  // (cudaDeviceCanAccessPeer), among those visible to it.
  std::vector<std::string> peer_devices;
};

// OK when every rank can map every other rank's window; otherwise
// Unimplemented naming the first pair (in rank order) that cannot: another
// host, one process, or an unreachable GPU. A pure function of its argument,
// so ranks that see the same identities give the same answer.
absl::Status WindowsReachable(const std::vector<PeerIdentity>& ranks);

// The first step of MapCudaIpcWindows, a collective over `control`: gathers
// every rank's identity (or the error that kept it from having one) and the
// window size it asks for, and returns the same answer on every rank: the
// first failing rank's error (its code, "rank R: ..."), InvalidArgument when
// ranks ask different sizes, WindowsReachable's answer, or OK.
absl::Status AgreeOnWindows(Transport& control, const absl::StatusOr<PeerIdentity>& mine,
                            size_t bytes);

}  // namespace joule::ep
