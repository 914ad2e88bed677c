#include "worker/ep/cuda_ipc_windows.h"

#include <cuda.h>  // types of cuPointerSetAttribute only; no link to libcuda
#include <cuda_runtime_api.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/status.h"
#include "kernels/cuda/cuda_check.h"

namespace joule::ep {
namespace {

using kernels::cuda::CudaErrorToStatus;

constexpr size_t kUuidBytes = sizeof(cudaUUID_t);
// A record is a few hundred bytes; a length past this is a broken peer.
constexpr uint64_t kMaxRecordBytes = uint64_t{1} << 20;

// Length-prefixed fields for the all-gathered records (ranks of one group run
// the same build, so native byte order is fine).
class Writer {
 public:
  void U64(uint64_t v) { out_.append(reinterpret_cast<const char*>(&v), sizeof(v)); }
  void Bytes(absl::string_view s) {
    U64(s.size());
    out_.append(s.data(), s.size());
  }
  std::string Take() { return std::move(out_); }

 private:
  std::string out_;
};

class Reader {
 public:
  explicit Reader(absl::string_view in) : in_(in) {}
  bool U64(uint64_t* v) {
    if (in_.size() < sizeof(*v)) return false;
    std::memcpy(v, in_.data(), sizeof(*v));
    in_.remove_prefix(sizeof(*v));
    return true;
  }
  bool Bytes(std::string* s) {
    uint64_t n = 0;
    if (!U64(&n) || n > in_.size()) return false;
    s->assign(in_.data(), n);
    in_.remove_prefix(n);
    return true;
  }
  bool done() const { return in_.empty(); }

 private:
  absl::string_view in_;
};

// "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", as nvidia-smi prints it.
std::string FormatUuid(const std::string& uuid) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out = "GPU-";
  for (size_t i = 0; i < uuid.size(); ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) out += '-';
    const auto b = static_cast<unsigned char>(uuid[i]);
    out += kHex[b >> 4];
    out += kHex[b & 15];
  }
  return out;
}

// Every rank's blob, by rank: the lengths first, then the blobs padded to the longest.
absl::StatusOr<std::vector<std::string>> AllGatherBlobs(Transport& control,
                                                        const std::string& mine) {
  const int world = control.world_size();
  std::vector<uint64_t> lengths(world);
  const uint64_t my_length = mine.size();
  if (absl::Status s = control.AllGather(&my_length, sizeof(my_length), lengths.data()); !s.ok()) {
    return s;
  }
  for (int p = 0; p < world; ++p) {
    if (lengths[p] > kMaxRecordBytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "cuda ipc windows: rank ", p, " sent a record of ", lengths[p], " bytes"));
    }
  }
  const size_t longest = *std::max_element(lengths.begin(), lengths.end());
  std::string padded = mine;
  padded.resize(longest);
  std::string all(longest * world, '\0');
  if (absl::Status s = control.AllGather(padded.data(), longest, all.data()); !s.ok()) return s;
  std::vector<std::string> blobs(world);
  for (int p = 0; p < world; ++p) blobs[p] = all.substr(p * longest, lengths[p]);
  return blobs;
}

// One step every rank takes together: each contributes how its local part
// went and, when it went well, a payload. Every rank returns the same: the
// payloads by rank, or the first failing rank's error (its code, naming it).
absl::StatusOr<std::vector<std::string>> AgreeStep(Transport& control, const absl::Status& local,
                                                   const std::string& payload,
                                                   absl::string_view step) {
  Writer w;
  w.U64(static_cast<uint64_t>(local.code()));
  w.Bytes(local.message());
  w.Bytes(local.ok() ? payload : std::string());
  absl::StatusOr<std::vector<std::string>> blobs = AllGatherBlobs(control, w.Take());
  if (!blobs.ok()) return blobs.status();
  std::vector<std::string> payloads(blobs->size());
  for (size_t p = 0; p < blobs->size(); ++p) {
    Reader r((*blobs)[p]);
    uint64_t code = 0;
    std::string message;
    if (!r.U64(&code) || !r.Bytes(&message) || !r.Bytes(&payloads[p]) || !r.done() ||
        code > static_cast<uint64_t>(absl::StatusCode::kUnauthenticated)) {
      return absl::InvalidArgumentError(
          absl::StrCat("cuda ipc windows: ", step, ": malformed record from rank ", p));
    }
    if (code != 0) {
      return absl::Status(static_cast<absl::StatusCode>(code),
                          absl::StrCat("cuda ipc windows: ", step, ": rank ", p, ": ", message));
    }
  }
  return payloads;
}

std::string EncodeIdentity(const PeerIdentity& id, size_t bytes) {
  Writer w;
  w.Bytes(id.host);
  w.U64(id.process);
  w.Bytes(id.device);
  w.U64(id.peer_devices.size());
  for (const std::string& d : id.peer_devices) w.Bytes(d);
  w.U64(bytes);
  return w.Take();
}

bool DecodeIdentity(const std::string& blob, PeerIdentity* id, uint64_t* bytes) {
  Reader r(blob);
  uint64_t n = 0;
  if (!r.Bytes(&id->host) || !r.U64(&id->process) || !r.Bytes(&id->device) || !r.U64(&n) ||
      n > blob.size()) {
    return false;
  }
  id->peer_devices.resize(n);
  for (std::string& d : id->peer_devices) {
    if (!r.Bytes(&d)) return false;
  }
  return r.U64(bytes) && r.done();
}

// A failed runtime call also sets the runtime's last error; clear it so the
// next launch check (cudaGetLastError) does not report ours.
absl::Status ClearLastError(absl::Status s) {
  if (!s.ok()) (void)cudaGetLastError();
  return s;
}

std::string Uuid(const cudaDeviceProp& prop) {
  return std::string(reinterpret_cast<const char*>(prop.uuid.bytes), kUuidBytes);
}

absl::StatusOr<PeerIdentity> LocalIdentity(int device, const std::string& host_identity) {
  if (absl::Status s = kernels::cuda::CheckDeviceAvailable(); !s.ok()) return s;
  int count = 0;
  JOULE_CUDA_RETURN_IF_ERROR(cudaGetDeviceCount(&count));
  if (device < 0 || device >= count) {
    return absl::InvalidArgumentError(absl::StrCat("cuda ipc windows: device ", device, " of ",
                                                   count, " visible to this process"));
  }
  PeerIdentity id;
  id.host = host_identity;
  id.process = static_cast<uint64_t>(getpid());
  cudaDeviceProp prop{};
  JOULE_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, device));
  id.device = Uuid(prop);
  for (int d = 0; d < count; ++d) {
    if (d == device) continue;
    int can = 0;
    JOULE_CUDA_RETURN_IF_ERROR(cudaDeviceCanAccessPeer(&can, device, d));
    if (can == 0) continue;
    JOULE_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, d));
    id.peer_devices.push_back(Uuid(prop));
  }
  return id;
}

// A driver API function through the runtime's driver entry point, so
// nothing links libcuda (absent on hosts without a GPU).
template <typename Fn>
absl::StatusOr<Fn> DriverFunction(const char* name) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
  JOULE_CUDA_RETURN_IF_ERROR(
      cudaGetDriverEntryPointByVersion(name, &fn, 12000, cudaEnableDefault, &found));
  if (fn == nullptr || found != cudaDriverEntryPointSuccess) {
    return absl::InternalError(absl::StrCat("cuda ipc windows: the driver has no ", name));
  }
  return reinterpret_cast<Fn>(fn);
}

// CU_POINTER_ATTRIBUTE_SYNC_MEMOPS on the window.
absl::Status SetSyncMemops(void* ptr) {
  using SetAttributeFn = CUresult (*)(const void*, CUpointer_attribute, CUdeviceptr);
  ASSIGN_OR_RETURN(const SetAttributeFn set, DriverFunction<SetAttributeFn>("cuPointerSetAttribute"));
  const unsigned int on = 1;
  const CUresult r = set(&on, CU_POINTER_ATTRIBUTE_SYNC_MEMOPS, reinterpret_cast<CUdeviceptr>(ptr));
  if (r != CUDA_SUCCESS) {
    return absl::InternalError(absl::StrCat(
        "cuPointerSetAttribute(CU_POINTER_ATTRIBUTE_SYNC_MEMOPS) on the window failed: CUresult ",
        static_cast<int>(r)));
  }
  return absl::OkStatus();
}

// Where the allocation holding `ptr` begins (cuMemGetAddressRange). A handle
// names a whole allocation, and a peer opening it gets that allocation's
// base: the window's offset in it travels with the handle.
absl::StatusOr<size_t> OffsetInAllocation(void* ptr) {
  using GetRangeFn = CUresult (*)(CUdeviceptr*, size_t*, CUdeviceptr);
  ASSIGN_OR_RETURN(const GetRangeFn get_range, DriverFunction<GetRangeFn>("cuMemGetAddressRange"));
  CUdeviceptr base = 0;
  size_t size = 0;
  const CUresult r = get_range(&base, &size, reinterpret_cast<CUdeviceptr>(ptr));
  if (r != CUDA_SUCCESS) {
    return absl::InternalError(absl::StrCat(
        "cuMemGetAddressRange on the window failed: CUresult ", static_cast<int>(r)));
  }
  return static_cast<size_t>(reinterpret_cast<CUdeviceptr>(ptr) - base);
}

// Windows are allocated in whole 2 MiB granules, as NVIDIA advises for memory
// shared over CUDA IPC: a smaller cudaMalloc may be carved from a block that
// holds other buffers, and the handle would expose (and name) the whole block.
constexpr size_t kIpcGranule = size_t{2} << 20;

size_t IpcAllocationBytes(size_t bytes) {
  return (std::max<size_t>(bytes, 1) + kIpcGranule - 1) / kIpcGranule * kIpcGranule;
}

// What a rank sends its peers for its window: the handle and the window's
// offset in the allocation the handle names.
struct ExportedWindow {
  cudaIpcMemHandle_t handle{};
  uint64_t offset = 0;
};

// Makes `device` current for a scope and puts the caller's back after.
class ScopedDevice {
 public:
  ScopedDevice() = default;
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;
  ~ScopedDevice() {
    if (previous_ >= 0 && previous_ != device_) (void)cudaSetDevice(previous_);
  }
  absl::Status Set(int device) {
    JOULE_CUDA_RETURN_IF_ERROR(cudaGetDevice(&previous_));
    device_ = device;
    JOULE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
    return absl::OkStatus();
  }

 private:
  int previous_ = -1;
  int device_ = -1;
};

class CudaIpcWindows final : public SharedWindows {
 public:
  CudaIpcWindows(int world, int rank, int device, size_t bytes)
      : SharedWindows(world, bytes), rank_(rank), device_(device) {}
  ~CudaIpcWindows() override {
    // Errors are dropped: nobody can act on them here (at exit the runtime may be gone).
    ScopedDevice current;
    (void)current.Set(device_);
    ClosePeers();
    if (own_ != nullptr) (void)cudaFree(own_);
    own_ = nullptr;
    ptrs_[rank_] = nullptr;
    (void)cudaGetLastError();
  }

  // With `device_` current: allocates, zeroes (complete before any peer can
  // write) and exports this rank's window.
  absl::Status AllocateOwn(ExportedWindow* exported) {
    void* own = nullptr;
    JOULE_CUDA_RETURN_IF_ERROR(cudaMalloc(&own, IpcAllocationBytes(bytes_)));
    own_ = own;
    if (absl::Status s = SetSyncMemops(own_); !s.ok()) return s;
    JOULE_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(own_, 0, bytes_, nullptr));
    JOULE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(nullptr));
    ASSIGN_OR_RETURN(exported->offset, OffsetInAllocation(own_));
    void* base = static_cast<std::byte*>(own_) - exported->offset;
    JOULE_CUDA_RETURN_IF_ERROR(cudaIpcGetMemHandle(&exported->handle, base));
    ptrs_[rank_] = static_cast<std::byte*>(own_);
    return absl::OkStatus();
  }

  // With `device_` current: maps every peer's window from its exported handle.
  absl::Status OpenPeers(const std::vector<std::string>& handles) {
    for (int p = 0; p < static_cast<int>(handles.size()); ++p) {
      if (p == rank_) continue;
      ExportedWindow exported;
      if (handles[p].size() != sizeof(exported)) {
        return absl::InvalidArgumentError(
            absl::StrCat("cuda ipc windows: rank ", p, " sent a handle of ", handles[p].size(),
                         " bytes"));
      }
      std::memcpy(&exported, handles[p].data(), sizeof(exported));
      void* base = nullptr;
      const cudaError_t err =
          cudaIpcOpenMemHandle(&base, exported.handle, cudaIpcMemLazyEnablePeerAccess);
      if (err != cudaSuccess) {
        const std::string call = absl::StrCat("cudaIpcOpenMemHandle(rank ", p, "'s window)");
        return CudaErrorToStatus(err, call.c_str(), __FILE__, __LINE__);
      }
      opened_[p] = base;
      ptrs_[p] = static_cast<std::byte*>(base) + exported.offset;
    }
    return absl::OkStatus();
  }

  void ClosePeers() {
    ScopedDevice current;
    (void)current.Set(device_);
    for (int p = 0; p < static_cast<int>(ptrs_.size()); ++p) {
      if (p == rank_) continue;
      if (opened_[p] != nullptr) (void)cudaIpcCloseMemHandle(opened_[p]);
      opened_[p] = nullptr;
      ptrs_[p] = nullptr;
    }
    (void)cudaGetLastError();
  }

 private:
  const int rank_;
  const int device_;
  void* own_ = nullptr;
  std::vector<void*> opened_ = std::vector<void*>(ptrs_.size(), nullptr);  // what Close takes
};

}  // namespace

std::string LocalHostIdentity() {
  char host[256] = {};
  if (gethostname(host, sizeof(host) - 1) != 0) std::strcpy(host, "unknown-host");
  std::string boot_id;
  std::ifstream in("/proc/sys/kernel/random/boot_id");
  if (!(in >> boot_id)) boot_id = "unknown-boot";
  return absl::StrCat(host, "/", absl::StripAsciiWhitespace(boot_id));
}

absl::Status WindowsReachable(const std::vector<PeerIdentity>& ranks) {
  const int world = static_cast<int>(ranks.size());
  for (int p = 1; p < world; ++p) {
    if (ranks[p].host != ranks[0].host) {
      return absl::UnimplementedError(absl::StrCat(
          "cuda ipc windows: rank ", p, " runs on host '", ranks[p].host, "', rank 0 on '",
          ranks[0].host, "': CUDA IPC needs every rank on one host"));
    }
  }
  for (int i = 0; i < world; ++i) {
    for (int j = i + 1; j < world; ++j) {
      if (ranks[i].process == ranks[j].process) {
        return absl::UnimplementedError(absl::StrCat(
            "cuda ipc windows: ranks ", i, " and ", j, " are one process (pid ", ranks[i].process,
            "): CUDA IPC needs one rank per process"));
      }
    }
  }
  for (int i = 0; i < world; ++i) {
    for (int j = 0; j < world; ++j) {
      const std::string& theirs = ranks[j].device;
      if (theirs == ranks[i].device) continue;
      const auto& reach = ranks[i].peer_devices;
      if (std::find(reach.begin(), reach.end(), theirs) == reach.end()) {
        return absl::UnimplementedError(absl::StrCat(
            "cuda ipc windows: rank ", i, "'s ", FormatUuid(ranks[i].device), " cannot reach rank ",
            j, "'s ", FormatUuid(theirs),
            " (cudaDeviceCanAccessPeer is false, or that GPU is not visible to rank ", i, ")"));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status AgreeOnWindows(Transport& control, const absl::StatusOr<PeerIdentity>& mine,
                            size_t bytes) {
  const absl::StatusOr<std::vector<std::string>> payloads = AgreeStep(
      control, mine.status(), mine.ok() ? EncodeIdentity(*mine, bytes) : std::string(), "identity");
  if (!payloads.ok()) return payloads.status();
  const int world = static_cast<int>(payloads->size());
  std::vector<PeerIdentity> ranks(world);
  std::vector<uint64_t> sizes(world);
  for (int p = 0; p < world; ++p) {
    if (!DecodeIdentity((*payloads)[p], &ranks[p], &sizes[p])) {
      return absl::InvalidArgumentError(
          absl::StrCat("cuda ipc windows: malformed identity from rank ", p));
    }
  }
  for (int p = 1; p < world; ++p) {
    if (sizes[p] != sizes[0]) {
      return absl::InvalidArgumentError(absl::StrCat(
          "cuda ipc windows: rank ", p, " asks for a window of ", sizes[p], " bytes, rank 0 for ",
          sizes[0], ": every rank must ask for the same size"));
    }
  }
  return WindowsReachable(ranks);
}

absl::StatusOr<std::unique_ptr<SharedWindows>> MapCudaIpcWindows(Transport& control, int device,
                                                                 size_t bytes) {
  return MapCudaIpcWindows(control, device, bytes, LocalHostIdentity());
}

absl::StatusOr<std::unique_ptr<SharedWindows>> MapCudaIpcWindows(
    Transport& control, int device, size_t bytes, const std::string& host_identity) {
  if (control.memory_kind() != MemoryKind::kHost) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cuda ipc windows: the control transport (", control.name(),
        ") must move host memory: the handles are exchanged from host buffers"));
  }
  const int world = control.world_size();
  const int rank = control.rank();
  // 1. Whether every rank can map every peer's window, before anything is allocated.
  absl::StatusOr<PeerIdentity> mine = LocalIdentity(device, host_identity);
  (void)ClearLastError(mine.status());
  if (absl::Status s = AgreeOnWindows(control, mine, bytes); !s.ok()) return s;

  // From here `device` is valid on every rank. The scope's device is current
  // for every call below (and for the windows' destructor on a failure path).
  ScopedDevice current;
  absl::Status local = current.Set(device);
  auto windows = std::make_unique<CudaIpcWindows>(world, rank, device, bytes);

  // 2. This rank's window, zero-filled and exported. On an error nobody has
  //    opened any window yet, so each rank frees its own (the destructor).
  ExportedWindow exported;
  if (local.ok()) local = windows->AllocateOwn(&exported);
  absl::StatusOr<std::vector<std::string>> handles =
      AgreeStep(control, ClearLastError(local),
                std::string(reinterpret_cast<const char*>(&exported), sizeof(exported)), "export");
  if (!handles.ok()) return handles.status();

  // 3. Every peer's window, mapped here.
  local = ClearLastError(windows->OpenPeers(*handles));
  const absl::Status agreed = AgreeStep(control, local, std::string(), "open").status();
  if (!agreed.ok()) {
    // Every rank closes what it opened before any rank frees its own window
    // (the barrier fails fast when the control transport is what broke).
    windows->ClosePeers();
    (void)control.Barrier();
    return agreed;
  }
  return std::unique_ptr<SharedWindows>(std::move(windows));
}

void ClosePeerWindows(SharedWindows& windows) {
  if (auto* cuda = dynamic_cast<CudaIpcWindows*>(&windows); cuda != nullptr) cuda->ClosePeers();
}

}  // namespace joule::ep
