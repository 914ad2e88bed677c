#include "worker/ep/ucx_transport.h"

#include <pthread.h>
#include <sched.h>
#include <ucp/api/ucp.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"

namespace joule::ep {
namespace {

// Tag layout: collective sequence number in the high 44 bits, source rank in
// the low 20. Every rank issues the same sequence of collectives, so a message
// can only match the receive posted for its own round and sender.
constexpr int kRankBits = 20;
constexpr int kMaxWorld = 1 << kRankBits;
constexpr ucp_tag_t kFullMask = ~ucp_tag_t{0};

ucp_tag_t MakeTag(uint64_t seq, int source) {
  return (static_cast<ucp_tag_t>(seq) << kRankBits) | static_cast<ucp_tag_t>(source);
}

absl::Status UcsError(absl::string_view call, ucs_status_t status) {
  return absl::InternalError(
      absl::StrCat("ucx transport: ", call, " failed: ", ucs_status_string(status)));
}

// Waiting for a collective: after UcxOptions::spin_before_naps, naps of an
// eighth of the time waited so far (within these bounds), so a nap adds at
// most about an eighth to any wait.
constexpr absl::Duration kMinNap = absl::Microseconds(10);
constexpr absl::Duration kMaxNap = absl::Milliseconds(1);

// Teardown of endpoints and requests is bounded by this much progress time;
// after it UCX releases whatever is left when the worker is destroyed.
constexpr absl::Duration kTeardownBudget = absl::Seconds(1);

// True unless UCX_TLS names transports and none of them is shared memory
// (then asking for shared-memory settings only makes UCX warn).
bool WantsSharedMemory() {
  const char* tls = std::getenv("UCX_TLS");
  if (tls == nullptr) return true;
  const std::string t(tls);
  for (const char* name : {"all", "shm", "posix", "sysv", "mm", "^"}) {
    if (t.find(name) != std::string::npos) return true;
  }
  return false;
}

// Keepalive is how UCX notices a dead peer on shared memory (TCP also sees
// the socket reset). Its default (20 s) is longer than a step timeout, so
// unless the user set it, probe a few times per collective timeout.
std::string KeepaliveInterval(absl::Duration timeout) {
  absl::Duration interval = std::clamp(timeout / 4, absl::Milliseconds(100), absl::Seconds(5));
  return absl::StrCat(absl::ToInt64Milliseconds(interval), "ms");
}

// Shared windows hold UCX resources (a mapped allocation, peers' rkeys) that
// must go before the endpoints and the context do. Whichever comes first, the
// window's destructor or the transport's teardown, releases them.
class UcxWindows;
struct WindowRegistry {
  std::mutex mu;
  bool alive = true;  // false once the transport has torn down
  std::set<UcxWindows*> live;
};

class UcxWindows final : public SharedWindows {
 public:
  UcxWindows(std::shared_ptr<WindowRegistry> registry, ucp_context_h context, int world,
             size_t bytes)
      : SharedWindows(world, bytes), registry_(std::move(registry)), context_(context) {}
  ~UcxWindows() override {
    std::lock_guard<std::mutex> lock(registry_->mu);
    if (!registry_->alive) return;  // the transport released everything already
    Release();
    registry_->live.erase(this);
  }
  // Called with the registry's lock held.
  void Release() {
    for (ucp_rkey_h rkey : rkeys_) ucp_rkey_destroy(rkey);
    rkeys_.clear();
    if (mem_ != nullptr) ucp_mem_unmap(context_, mem_);
    mem_ = nullptr;
    std::fill(ptrs_.begin(), ptrs_.end(), nullptr);
  }

  const std::shared_ptr<WindowRegistry> registry_;
  const ucp_context_h context_;
  ucp_mem_h mem_ = nullptr;
  std::vector<ucp_rkey_h> rkeys_;
  using SharedWindows::ptrs_;
};

// Address blob: a format byte, then the sending worker's UCP address (with
// its length), then with a receive thread the receiving worker's. Peers'
// endpoints lead to the receiving worker, so that is where messages land.
constexpr char kOneWorker = 1;
constexpr char kTwoWorkers = 2;

struct PeerAddress {
  char format = 0;
  std::string send, recv;
};

absl::StatusOr<PeerAddress> ParseAddress(int rank, const std::string& blob) {
  PeerAddress a;
  uint32_t len = 0;
  if (blob.size() < 1 + sizeof(len)) {
    return absl::InvalidArgumentError(
        absl::StrCat("ucx transport: address of rank ", rank, " is too short (", blob.size(),
                     " bytes)"));
  }
  a.format = blob[0];
  std::memcpy(&len, blob.data() + 1, sizeof(len));
  const size_t head = 1 + sizeof(len);
  if ((a.format != kOneWorker && a.format != kTwoWorkers) || len == 0 ||
      len > blob.size() - head || (a.format == kOneWorker && len != blob.size() - head) ||
      (a.format == kTwoWorkers && len == blob.size() - head)) {
    return absl::InvalidArgumentError(
        absl::StrCat("ucx transport: address of rank ", rank, " is malformed"));
  }
  a.send = blob.substr(head, len);
  a.recv = a.format == kTwoWorkers ? blob.substr(head + len) : a.send;
  return a;
}

// Spin, then nap, while a wait makes no progress (UcxOptions::spin_before_naps).
class Backoff {
 public:
  explicit Backoff(absl::Duration spin) : spin_(spin) {}
  void Progressed() { idle_ = 0; }
  // One round without progress; false when `deadline` has passed.
  bool Idle(absl::Time deadline) {
    if (++idle_ < 32) return true;
    const absl::Time now = absl::Now();
    if (idle_ == 32) idle_since_ = now;
    if (idle_ % 16 == 0 && now >= deadline) return false;
    // Ranks often outnumber cores (tests, one-host runs, shared hosts):
    // after a short spin let the peer we wait for run. A peer still busy
    // after that (its expert GEMMs, an idle round's pause) is waited for
    // in naps: spinning through it would burn a core for nothing.
    const absl::Duration waited = now - idle_since_;
    if (waited < spin_) {
      sched_yield();
    } else {
      absl::SleepFor(std::clamp(waited / 8, kMinNap, kMaxNap));
    }
    return true;
  }

 private:
  const absl::Duration spin_;
  int idle_ = 0;
  absl::Time idle_since_;
};

class UcxTransportImpl final : public UcxTransport {
 public:
  UcxTransportImpl(int rank, int world_size, const TransportOptions& options,
                   const UcxOptions& ucx)
      : rank_(rank), world_size_(world_size), options_(options), ucx_(ucx),
        eps_(world_size, nullptr), peer_error_(world_size), awaiting_(world_size) {
    for (auto& e : peer_error_) e.store(UCS_OK);
    for (auto& a : awaiting_) a.store(false);
  }

  ~UcxTransportImpl() override { Teardown(); }

  void Interrupt(const std::string& reason) override {
    {
      absl::MutexLock lock(&interrupt_mu_);
      if (interrupt_reason_.empty()) interrupt_reason_ = reason;
    }
    interrupted_.store(true, std::memory_order_release);
  }

  absl::Status Init() {
    ucp_config_t* config = nullptr;
    if (ucs_status_t s = ucp_config_read(nullptr, nullptr, &config); s != UCS_OK) {
      return UcsError("ucp_config_read", s);
    }
    // Shared-memory transports only take part in peer-failure handling when
    // asked to; without it, UCX_TLS=shm leaves no transport that can report
    // a dead peer. The environment still wins.
    if (ucx_.peer_error_handling && WantsSharedMemory() &&
        std::getenv("UCX_MM_ERROR_HANDLING") == nullptr && std::getenv("UCX_POSIX_ERROR_HANDLING") == nullptr &&
        std::getenv("UCX_SYSV_ERROR_HANDLING") == nullptr) {
      ucp_config_modify(config, "MM_ERROR_HANDLING", "y");
    }
    if (std::getenv("UCX_KEEPALIVE_INTERVAL") == nullptr) {
      ucp_config_modify(config, "KEEPALIVE_INTERVAL", KeepaliveInterval(options_.timeout).c_str());
    }
    ucp_params_t params{};
    params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED;
    // RMA: peers' shared-memory windows are mapped through rkeys (MapSharedWindows).
    params.features = UCP_FEATURE_TAG | UCP_FEATURE_RMA;
    // With a receive thread two threads drive two workers of this context at once.
    params.mt_workers_shared = ucx_.receive_thread ? 1 : 0;
    ucs_status_t s = ucp_init(&params, config, &context_);
    ucp_config_release(config);
    if (s != UCS_OK) return UcsError("ucp_init", s);

    // The sending worker: only the calling thread drives it.
    absl::StatusOr<std::string> send_address = CreateWorker(UCS_THREAD_MODE_SINGLE, &worker_);
    if (!send_address.ok()) return send_address.status();
    const uint32_t len = send_address->size();
    address_.assign(1, ucx_.receive_thread ? kTwoWorkers : kOneWorker);
    address_.append(reinterpret_cast<const char*>(&len), sizeof(len));
    address_ += *send_address;
    if (!ucx_.receive_thread) {
      recv_worker_ = worker_;
      return absl::OkStatus();
    }
    // The receiving worker: the calling thread posts receives and drives it
    // for small collectives, the receive thread for large ones, never both
    // at once.
    absl::StatusOr<std::string> recv_address =
        CreateWorker(UCS_THREAD_MODE_SERIALIZED, &recv_worker_);
    if (!recv_address.ok()) return recv_address.status();
    address_ += *recv_address;
    recv_thread_ = std::thread([this] { ReceiveLoop(); });
    pthread_setname_np(recv_thread_.native_handle(), kReceiveThreadName);  // for top and tests
    return absl::OkStatus();
  }

  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }
  std::string name() const override { return "ucx"; }
  const std::string& address() const override { return address_; }

  absl::Status Connect(const std::vector<std::string>& addresses) override {
    if (connected_) return absl::FailedPreconditionError("ucx transport: Connect called twice");
    if (addresses.size() != static_cast<size_t>(world_size_)) {
      return absl::InvalidArgumentError(absl::StrCat("ucx transport: addresses has ",
                                                     addresses.size(), " entries, world_size is ",
                                                     world_size_));
    }
    std::vector<PeerAddress> peers(world_size_);
    for (int p = 0; p < world_size_; ++p) {
      if (p == rank_) continue;
      if (addresses[p].empty()) {
        return absl::InvalidArgumentError(absl::StrCat("ucx transport: address of rank ", p,
                                                       " is empty"));
      }
      absl::StatusOr<PeerAddress> a = ParseAddress(p, addresses[p]);
      if (!a.ok()) return a.status();
      if (a->format != address_[0]) {
        return absl::InvalidArgumentError(absl::StrCat(
            "ucx transport: rank ", p, (a->format == kTwoWorkers ? " runs" : " does not run"),
            " a receive thread and rank ", rank_,
            (ucx_.receive_thread ? " does" : " does not"), "; every rank must agree"));
      }
      peers[p] = *std::move(a);
    }
    for (int p = 0; p < world_size_; ++p) {
      if (p == rank_) continue;
      ucp_ep_params_t ep_params{};
      ep_params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS |
                             UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
      ep_params.address = reinterpret_cast<const ucp_address_t*>(peers[p].recv.data());
      ep_params.err_mode =
          ucx_.peer_error_handling ? UCP_ERR_HANDLING_MODE_PEER : UCP_ERR_HANDLING_MODE_NONE;
      ep_params.err_handler.cb = &UcxTransportImpl::OnEndpointError;
      ep_params.err_handler.arg = this;
      if (ucs_status_t s = ucp_ep_create(worker_, &ep_params, &eps_[p]); s != UCS_OK) {
        eps_[p] = nullptr;
        broken_ = absl::UnavailableError(absl::StrCat(
            "ucx transport: cannot reach rank ", p, ": ucp_ep_create: ", ucs_status_string(s)));
        return broken_;
      }
    }
    connected_ = true;
    // Wires up every endpoint (UCX connects lazily) and proves all ranks are here.
    return Barrier();
  }

  absl::Status AllGather(const void* in, size_t bytes, void* out) override {
    if (absl::Status s = Ready(); !s.ok()) return s;
    const uint64_t seq = seq_++;
    char* dst = static_cast<char*>(out);
    if (bytes > 0 && in != dst + rank_ * bytes) std::memmove(dst + rank_ * bytes, in, bytes);
    ClearOps();
    for (int i = 1; i < world_size_; ++i) {
      const int p = (rank_ + world_size_ - i) % world_size_;
      if (absl::Status s = PostRecv(p, dst + p * bytes, bytes, seq); !s.ok()) return Fail(s);
    }
    const bool threaded = HandOffReceives(bytes * (world_size_ - 1));
    for (int i = 1; i < world_size_; ++i) {
      const int p = (rank_ + i) % world_size_;
      if (absl::Status s = PostSend(p, in, bytes, seq); !s.ok()) return Fail(s);
    }
    return Wait("all-gather", seq, threaded);
  }

  absl::StatusOr<std::unique_ptr<SharedWindows>> MapSharedWindows(size_t bytes) override {
    if (absl::Status s = Ready(); !s.ok()) return s;
    auto win = std::make_unique<UcxWindows>(registry_, context_, world_size_, bytes);
    // 1. Memory UCX allocates itself (shared memory it can export), and its
    //    rkey: [address, rkey bytes]; empty when this rank could not.
    std::string why;
    std::string blob;
    ucp_mem_map_params_t mp{};
    mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH |
                    UCP_MEM_MAP_PARAM_FIELD_FLAGS;
    mp.address = nullptr;
    mp.length = std::max<size_t>(bytes, 1);
    mp.flags = UCP_MEM_MAP_ALLOCATE;
    if (ucs_status_t st = ucp_mem_map(context_, &mp, &win->mem_); st != UCS_OK) {
      win->mem_ = nullptr;
      why = absl::StrCat("ucp_mem_map: ", ucs_status_string(st));
    } else {
      ucp_mem_attr_t attr{};
      attr.field_mask = UCP_MEM_ATTR_FIELD_ADDRESS;
      void* rkey_buf = nullptr;
      size_t rkey_len = 0;
      ucs_status_t st2 = ucp_mem_query(win->mem_, &attr);
      if (st2 == UCS_OK) st2 = ucp_rkey_pack(context_, win->mem_, &rkey_buf, &rkey_len);
      if (st2 != UCS_OK) {
        why = absl::StrCat("ucp_rkey_pack: ", ucs_status_string(st2));
      } else {
        const uint64_t address = reinterpret_cast<uintptr_t>(attr.address);
        blob.assign(reinterpret_cast<const char*>(&address), sizeof(address));
        blob.append(static_cast<const char*>(rkey_buf), rkey_len);
        ucp_rkey_buffer_release(rkey_buf);
        win->ptrs_[rank_] = static_cast<std::byte*>(attr.address);
      }
    }
    // 2. Everyone's blob (lengths first, then padded to the longest).
    std::vector<uint64_t> lengths(world_size_);
    const uint64_t my_length = blob.size();
    if (absl::Status s = AllGather(&my_length, sizeof(my_length), lengths.data()); !s.ok()) return s;
    const size_t longest = *std::max_element(lengths.begin(), lengths.end());
    std::vector<char> blobs(longest * world_size_);
    blob.resize(longest);
    if (absl::Status s = AllGather(blob.data(), longest, blobs.data()); !s.ok()) return s;
    // 3. A pointer to every peer's window, where UCX can give one.
    for (int p = 0; p < world_size_ && why.empty(); ++p) {
      if (p == rank_) continue;
      const char* b = blobs.data() + p * longest;
      if (lengths[p] <= sizeof(uint64_t)) {
        why = absl::StrCat("rank ", p, " has no window");
        break;
      }
      uint64_t address = 0;
      std::memcpy(&address, b, sizeof(address));
      ucp_rkey_h rkey = nullptr;
      if (ucs_status_t st = ucp_ep_rkey_unpack(eps_[p], b + sizeof(address), &rkey); st != UCS_OK) {
        why = absl::StrCat("ucp_ep_rkey_unpack for rank ", p, ": ", ucs_status_string(st));
        break;
      }
      win->rkeys_.push_back(rkey);
      void* local = nullptr;
      if (ucs_status_t st = ucp_rkey_ptr(rkey, address, &local); st != UCS_OK) {
        why = absl::StrCat("ucp_rkey_ptr for rank ", p, ": ", ucs_status_string(st));
        break;
      }
      win->ptrs_[p] = static_cast<std::byte*>(local);
    }
    // 4. All ranks agree, so all fall back together.
    std::vector<uint8_t> ok(world_size_);
    const uint8_t my_ok = why.empty() ? 1 : 0;
    if (absl::Status s = AllGather(&my_ok, 1, ok.data()); !s.ok()) return s;
    for (int p = 0; p < world_size_; ++p) {
      if (ok[p] == 0) {
        return absl::UnimplementedError(absl::StrCat(
            "ucx transport: no shared windows: rank ", p, " cannot map its peers' memory",
            p == rank_ ? absl::StrCat(" (", why, ")") : "",
            " (UCX_TLS without shared memory, or ranks on different hosts)"));
      }
    }
    std::lock_guard<std::mutex> lock(registry_->mu);
    registry_->live.insert(win.get());
    return std::unique_ptr<SharedWindows>(std::move(win));
  }


  absl::Status AllToAllV(const void* send, const size_t* send_counts, const size_t* send_offsets,
                         void* recv, const size_t* recv_counts, const size_t* recv_offsets) override {
    if (absl::Status s = Ready(); !s.ok()) return s;
    const uint64_t seq = seq_++;
    const char* src = static_cast<const char*>(send);
    char* dst = static_cast<char*>(recv);
    absl::Status self_mismatch;
    if (send_counts[rank_] != recv_counts[rank_]) {
      self_mismatch = absl::InvalidArgumentError(
          absl::StrCat("all-to-all-v: rank ", rank_, " sends ", send_counts[rank_],
                       " bytes to itself but expects ", recv_counts[rank_]));
    } else if (send_counts[rank_] > 0) {
      std::memmove(dst + recv_offsets[rank_], src + send_offsets[rank_], send_counts[rank_]);
    }
    ClearOps();
    // Zero-byte messages are sent too: they keep every round a full exchange,
    // so an absent peer is noticed even when it has nothing to send.
    size_t incoming = 0;
    for (int i = 1; i < world_size_; ++i) {
      const int p = (rank_ + world_size_ - i) % world_size_;
      if (absl::Status s = PostRecv(p, dst + recv_offsets[p], recv_counts[p], seq); !s.ok()) {
        return Fail(s);
      }
      incoming += recv_counts[p];
    }
    const bool threaded = HandOffReceives(incoming);
    for (int i = 1; i < world_size_; ++i) {
      const int p = (rank_ + i) % world_size_;
      if (absl::Status s = PostSend(p, src + send_offsets[p], send_counts[p], seq); !s.ok()) {
        return Fail(s);
      }
    }
    absl::Status s = Wait("all-to-all-v", seq, threaded);
    return s.ok() ? self_mismatch : s;
  }

 private:
  struct Op {
    void* request = nullptr;  // UCX request; nullptr once complete
    int peer = 0;
    bool is_send = false;
    size_t expected = 0;  // receives: bytes the caller expects
  };

  absl::StatusOr<std::string> CreateWorker(ucs_thread_mode_t mode, ucp_worker_h* worker) {
    ucp_worker_params_t wparams{};
    wparams.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wparams.thread_mode = mode;
    if (ucs_status_t s = ucp_worker_create(context_, &wparams, worker); s != UCS_OK) {
      *worker = nullptr;
      return UcsError("ucp_worker_create", s);
    }
    ucp_address_t* addr = nullptr;
    size_t addr_len = 0;
    if (ucs_status_t s = ucp_worker_get_address(*worker, &addr, &addr_len); s != UCS_OK) {
      return UcsError("ucp_worker_get_address", s);
    }
    std::string address(reinterpret_cast<const char*>(addr), addr_len);
    ucp_worker_release_address(*worker, addr);
    return address;
  }

  static void OnEndpointError(void* arg, ucp_ep_h ep, ucs_status_t status) {
    auto* self = static_cast<UcxTransportImpl*>(arg);
    for (int p = 0; p < self->world_size_; ++p) {
      ucs_status_t ok = UCS_OK;
      if (self->eps_[p] == ep) self->peer_error_[p].compare_exchange_strong(ok, status);
    }
  }

  absl::Status Ready() {
    if (interrupted_.load(std::memory_order_acquire)) return Fail(Interrupted());
    if (!broken_.ok()) {
      return absl::FailedPreconditionError(
          absl::StrCat("ucx transport: broken by an earlier error: ", broken_.message()));
    }
    if (!connected_) return absl::FailedPreconditionError("ucx transport: not connected");
    for (int p = 0; p < world_size_; ++p) {
      if (ucs_status_t e = peer_error_[p].load(); e != UCS_OK) return Fail(PeerGone(p, e));
    }
    return absl::OkStatus();
  }

  absl::Status Interrupted() {
    absl::MutexLock lock(&interrupt_mu_);
    return absl::AbortedError(
        absl::StrCat("ucx transport: rank ", rank_, " interrupted: ", interrupt_reason_));
  }

  absl::Status PeerGone(int peer, ucs_status_t status) {
    return absl::UnavailableError(absl::StrCat("ucx transport: rank ", peer, " is unreachable (",
                                               ucs_status_string(status), ")"));
  }

  void ClearOps() {
    recvs_.clear();
    sends_.clear();
  }

  absl::Status PostRecv(int peer, void* buf, size_t bytes, uint64_t seq) {
    ucp_request_param_t param{};
    // Always a request, so its completion reports the received length
    // (UCX 1.13 leaves recv_info unset on immediate completion).
    param.op_attr_mask = UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
    ucs_status_ptr_t req = ucp_tag_recv_nbx(recv_worker_, buf, bytes, MakeTag(seq, peer),
                                            kFullMask, &param);
    if (UCS_PTR_IS_ERR(req)) return UcsError("ucp_tag_recv_nbx", UCS_PTR_STATUS(req));
    if (req != nullptr) recvs_.push_back(Op{.request = req, .peer = peer, .expected = bytes});
    return absl::OkStatus();
  }

  absl::Status PostSend(int peer, const void* buf, size_t bytes, uint64_t seq) {
    ucp_request_param_t param{};
    ucs_status_ptr_t req = ucp_tag_send_nbx(eps_[peer], buf, bytes, MakeTag(seq, rank_), &param);
    if (UCS_PTR_IS_ERR(req)) return PeerGone(peer, UCS_PTR_STATUS(req));
    sends_.push_back(Op{.request = req, .peer = peer, .is_send = true});
    return absl::OkStatus();
  }

  absl::Status CheckLength(const Op& op, size_t length) {
    if (length == op.expected) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat("ucx transport: rank ", op.peer, " sent ",
                                                   length, " bytes to rank ", rank_,
                                                   " which expects ", op.expected));
  }

  // Polls one outstanding request; returns an error for a failed one and
  // records a length mismatch in *mismatch.
  absl::Status Poll(Op& op, bool* done, absl::Status* mismatch) {
    ucs_status_t status;
    size_t length = 0;
    if (op.is_send) {
      status = ucp_request_check_status(op.request);
    } else {
      ucp_tag_recv_info_t info{};
      status = ucp_tag_recv_request_test(op.request, &info);
      length = info.length;
    }
    *done = status != UCS_INPROGRESS;
    if (!*done) return absl::OkStatus();
    ucp_request_free(op.request);
    op.request = nullptr;
    if (status == UCS_ERR_MESSAGE_TRUNCATED) {
      mismatch->Update(absl::InvalidArgumentError(absl::StrCat(
          "ucx transport: rank ", op.peer, " sent more than the ", op.expected,
          " bytes rank ", rank_, " expects")));
      return absl::OkStatus();
    }
    if (status != UCS_OK) return PeerGone(op.peer, status);
    if (!op.is_send) mismatch->Update(CheckLength(op, length));
    return absl::OkStatus();
  }

  // Polls every outstanding request of `ops`; returns how many are left.
  // With `awaiting`, clears the peer's entry as its request completes.
  absl::StatusOr<size_t> PollAll(std::vector<Op>& ops, absl::Status* mismatch,
                                 std::vector<std::atomic<bool>>* awaiting = nullptr) {
    size_t pending = 0;
    for (Op& op : ops) {
      if (op.request == nullptr) continue;
      bool done = false;
      if (absl::Status s = Poll(op, &done, mismatch); !s.ok()) return s;
      if (done && awaiting != nullptr) (*awaiting)[op.peer].store(false);
      pending += !done;
    }
    return pending;
  }

  // Drives progress until every request of the collective completed, a peer
  // failed, or the deadline passed. With `threaded`, the receive thread
  // drives the receives meanwhile.
  absl::Status Wait(absl::string_view what, uint64_t seq, bool threaded) {
    const absl::Time deadline = absl::Now() + options_.timeout;
    Backoff backoff(ucx_.spin_before_naps);
    absl::Status mismatch;
    for (;;) {
      // The receive thread drives the receiving worker while it holds the receives.
      const unsigned progressed = threaded ? ucp_worker_progress(worker_) : ProgressBoth();
      absl::StatusOr<size_t> pending = PollAll(sends_, &mismatch);
      if (pending.ok() && !threaded) {
        absl::StatusOr<size_t> more = PollAll(recvs_, &mismatch);
        pending = more.ok() ? absl::StatusOr<size_t>(*pending + *more) : more;
      }
      if (!pending.ok()) return Fail(pending.status());
      if (interrupted_.load(std::memory_order_acquire)) return Fail(Interrupted());
      const bool receives_done = !threaded || job_done_.load(std::memory_order_acquire);
      if (*pending == 0 && receives_done) break;
      if (threaded && receives_done && !job_status_.ok()) return Fail(EndReceiveJob());
      // A peer whose endpoint failed only matters while we still wait on it.
      bool take_back = false;
      for (int p = 0; p < world_size_; ++p) {
        const ucs_status_t e = peer_error_[p].load();
        if (e == UCS_OK) continue;
        // Its message may have landed before the receive thread noticed:
        // take the receives back and look for ourselves.
        if (threaded && awaiting_[p].load()) take_back = true;
        bool waited_on = false;
        for (const std::vector<Op>* ops : {&sends_, &recvs_}) {
          if (ops == &recvs_ && threaded) continue;
          for (const Op& op : *ops) waited_on |= op.request != nullptr && op.peer == p;
        }
        if (waited_on) return Fail(PeerGone(p, e));
      }
      if (take_back) {
        if (absl::Status r = EndReceiveJob(); !r.ok()) return Fail(r);
        mismatch.Update(job_mismatch_);
        threaded = false;
        continue;
      }
      if (progressed != 0) {
        backoff.Progressed();
        continue;
      }
      if (!backoff.Idle(deadline)) return Fail(TimedOut(what, seq));
    }
    if (threaded) {
      absl::Status received = EndReceiveJob();
      if (!received.ok()) return Fail(received);
      mismatch.Update(job_mismatch_);
    }
    return mismatch;
  }

  // Receive thread. Hands the posted receives of a collective receiving at
  // least receive_thread_min_bytes to it; returns whether it did.
  bool HandOffReceives(size_t incoming) {
    if (!ucx_.receive_thread || incoming < ucx_.receive_thread_min_bytes || recvs_.empty()) {
      return false;
    }
    for (const Op& op : recvs_) awaiting_[op.peer].store(true);
    job_stop_.store(false);
    job_done_.store(false);
    {
      std::lock_guard<std::mutex> lock(job_mu_);
      job_pending_ = true;
    }
    job_cv_.notify_one();
    job_running_ = true;
    return true;
  }

  // Stops the running receive job (if any) and waits for the thread to let
  // go of the receiving worker; returns the job's error.
  absl::Status EndReceiveJob() {
    if (!job_running_) return absl::OkStatus();
    job_stop_.store(true);
    while (!job_done_.load(std::memory_order_acquire)) absl::SleepFor(kMinNap);
    job_running_ = false;
    return job_status_;
  }

  void ReceiveLoop() {
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(job_mu_);
        job_cv_.wait(lock, [this] { return job_pending_ || quit_; });
        if (quit_) return;
        job_pending_ = false;
      }
      job_status_ = absl::OkStatus();
      job_mismatch_ = absl::OkStatus();
      // The caller owns the deadline and stops the job when it passes.
      Backoff backoff(ucx_.spin_before_naps);
      while (!job_stop_.load()) {
        const unsigned progressed = ucp_worker_progress(recv_worker_);
        absl::StatusOr<size_t> pending = PollAll(recvs_, &job_mismatch_, &awaiting_);
        if (!pending.ok()) job_status_ = pending.status();
        if (!pending.ok() || *pending == 0) break;
        if (progressed != 0) {
          backoff.Progressed();
        } else {
          backoff.Idle(absl::InfiniteFuture());
        }
      }
      for (auto& a : awaiting_) a.store(false);
      job_done_.store(true, std::memory_order_release);
    }
  }

  absl::Status TimedOut(absl::string_view what, uint64_t seq) {
    if (job_running_) {  // the receives are this thread's again: see which are left
      (void)EndReceiveJob();
      absl::Status ignored;
      (void)PollAll(recvs_, &ignored);
    }
    std::vector<int> from, to;
    for (const Op& op : recvs_) {
      if (op.request != nullptr) from.push_back(op.peer);
    }
    for (const Op& op : sends_) {
      if (op.request != nullptr) to.push_back(op.peer);
    }
    std::string msg = absl::StrCat("ucx transport: rank ", rank_, " ", what, " #", seq,
                                   " timed out after ", absl::FormatDuration(options_.timeout));
    if (!from.empty()) absl::StrAppend(&msg, "; no data from rank(s) ", absl::StrJoin(from, ","));
    if (!to.empty()) absl::StrAppend(&msg, "; sends not completed to rank(s) ", absl::StrJoin(to, ","));
    return absl::DeadlineExceededError(msg);
  }

  // Records the first error, cancels what is outstanding and drops the
  // endpoints: the transport is broken from here on.
  absl::Status Fail(absl::Status status) {
    (void)EndReceiveJob();
    if (broken_.ok()) broken_ = status;
    Abort();
    return status;
  }

  unsigned ProgressBoth() {
    unsigned n = ucp_worker_progress(worker_);
    if (recv_worker_ != worker_) n += ucp_worker_progress(recv_worker_);
    return n;
  }

  // Cancels outstanding requests and force-closes every endpoint, so UCX no
  // longer touches the caller's buffers once the collective returns.
  void Abort() {
    for (Op& op : recvs_) {
      if (op.request != nullptr) ucp_request_cancel(recv_worker_, op.request);
    }
    for (Op& op : sends_) {
      if (op.request != nullptr) ucp_request_cancel(worker_, op.request);
    }
    CloseEndpoints(/*force=*/true);
    const absl::Time deadline = absl::Now() + kTeardownBudget;
    for (std::vector<Op>* ops : {&recvs_, &sends_}) {
      for (Op& op : *ops) {
        if (op.request == nullptr) continue;
        while (ucp_request_check_status(op.request) == UCS_INPROGRESS && absl::Now() < deadline) {
          ProgressBoth();
        }
        ucp_request_free(op.request);  // released by UCX if still in flight
        op.request = nullptr;
      }
    }
    ClearOps();
  }

  void CloseEndpoints(bool force) {
    std::vector<void*> closing;
    for (int p = 0; p < world_size_; ++p) {
      if (eps_[p] == nullptr) continue;
      ucp_request_param_t param{};
      param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      // A failed endpoint can only be closed by force.
      param.flags = (force || peer_error_[p].load() != UCS_OK) ? UCP_EP_CLOSE_FLAG_FORCE : 0;
      ucs_status_ptr_t req = ucp_ep_close_nbx(eps_[p], &param);
      eps_[p] = nullptr;
      if (req != nullptr && !UCS_PTR_IS_ERR(req)) closing.push_back(req);
    }
    const absl::Time deadline = absl::Now() + kTeardownBudget;
    for (void* req : closing) {
      while (ucp_request_check_status(req) == UCS_INPROGRESS && absl::Now() < deadline) {
        ProgressBoth();
      }
      ucp_request_free(req);
    }
  }

  void Teardown() {
    if (recv_thread_.joinable()) {
      (void)EndReceiveJob();
      {
        std::lock_guard<std::mutex> lock(job_mu_);
        quit_ = true;
      }
      job_cv_.notify_one();
      recv_thread_.join();
    }
    {
      std::lock_guard<std::mutex> lock(registry_->mu);
      for (UcxWindows* w : registry_->live) w->Release();
      registry_->live.clear();
      registry_->alive = false;
    }
    if (worker_ != nullptr) {
      if (!recvs_.empty() || !sends_.empty()) Abort();
      CloseEndpoints(/*force=*/!broken_.ok());
    }
    if (recv_worker_ != nullptr && recv_worker_ != worker_) ucp_worker_destroy(recv_worker_);
    recv_worker_ = nullptr;
    if (worker_ != nullptr) ucp_worker_destroy(worker_);
    worker_ = nullptr;
    if (context_ != nullptr) {
      ucp_cleanup(context_);
      context_ = nullptr;
    }
  }

  const int rank_;
  const int world_size_;
  const TransportOptions options_;
  const UcxOptions ucx_;
  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;       // sends (and everything without a receive thread)
  ucp_worker_h recv_worker_ = nullptr;  // where peers' messages land; worker_ without a receive thread
  const std::shared_ptr<WindowRegistry> registry_ = std::make_shared<WindowRegistry>();
  std::string address_;
  std::vector<ucp_ep_h> eps_;               // by rank, on worker_; nullptr for self
  std::vector<std::atomic<ucs_status_t>> peer_error_;  // set by the endpoint error handler
  bool connected_ = false;
  uint64_t seq_ = 0;                        // collectives issued so far
  std::vector<Op> recvs_, sends_;           // requests of the running collective
  absl::Status broken_;                     // first error; non-OK means broken
  std::atomic<bool> interrupted_{false};    // Interrupt(): the waits give up
  absl::Mutex interrupt_mu_;
  std::string interrupt_reason_ ABSL_GUARDED_BY(interrupt_mu_);

  // The receive thread and its job: the running collective's recvs_, owned
  // by the thread from HandOffReceives until job_done_.
  std::thread recv_thread_;
  std::mutex job_mu_;
  std::condition_variable job_cv_;
  bool job_pending_ = false;  // guarded by job_mu_
  bool quit_ = false;         // guarded by job_mu_
  bool job_running_ = false;  // caller's view: a job was handed off and not yet ended
  std::atomic<bool> job_stop_{false};
  std::atomic<bool> job_done_{true};
  std::vector<std::atomic<bool>> awaiting_;  // by peer: a handed-off receive from it is outstanding
  absl::Status job_status_;    // written by the thread, read after job_done_
  absl::Status job_mismatch_;  // likewise
};

}  // namespace

UcxTransport::~UcxTransport() = default;

absl::StatusOr<std::unique_ptr<UcxTransport>> UcxTransport::Create(int rank, int world_size,
                                                                   const TransportOptions& options,
                                                                   const UcxOptions& ucx) {
  if (world_size < 1 || world_size > kMaxWorld) {
    return absl::InvalidArgumentError(
        absl::StrCat("ucx transport: world_size ", world_size, " is outside [1, ", kMaxWorld, "]"));
  }
  if (rank < 0 || rank >= world_size) {
    return absl::InvalidArgumentError(absl::StrCat("ucx transport: rank ", rank,
                                                   " is outside [0, ", world_size, ")"));
  }
  if (options.timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("ucx transport: timeout must be positive");
  }
  if (ucx.spin_before_naps < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("ucx transport: spin_before_naps must not be negative");
  }
  auto transport = std::make_unique<UcxTransportImpl>(rank, world_size, options, ucx);
  if (absl::Status s = transport->Init(); !s.ok()) return s;
  return transport;
}

}  // namespace joule::ep
