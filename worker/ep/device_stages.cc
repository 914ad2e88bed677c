#include "worker/ep/device_stages.h"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#ifdef JOULE_HAVE_CUDA_IPC
#include "worker/ep/cuda_ipc_windows.h"
#endif

namespace joule::ep {
namespace {

using kernels::RowType;

double SecondsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Grows `buffer` to at least `bytes` (geometrically, so steady-state layers
// allocate nothing). A buffer still read by an earlier launch is never freed
// early: cudaFree and cudaFreeHost wait for the device.
absl::Status Grow(device::Backend& backend, device::MemoryKind kind, size_t bytes,
                  device::Buffer* buffer) {
  if (!buffer->empty() && buffer->bytes() >= bytes) return absl::OkStatus();
  const size_t grown = std::max({bytes, 2 * buffer->bytes(), size_t{256}});
  buffer->Reset();
  ASSIGN_OR_RETURN(*buffer, backend.Allocate(kind, grown));
  return absl::OkStatus();
}

RowPath FirstRowPath(const DeviceStagesOptions& o) {
  if (o.shared_windows && o.payload == PayloadType::kBF16) return RowPath::kWindows;
  return o.row_transport != nullptr ? RowPath::kDeviceTransport : RowPath::kStaged;
}

// Copies `src` into the staging slice at `offset`; returns where the slice
// will be on the device.
template <typename T>
const T* Stage(const std::vector<T>& src, size_t offset, std::byte* staging, std::byte* device) {
  if (!src.empty()) std::memcpy(staging + offset, src.data(), src.size() * sizeof(T));
  return reinterpret_cast<const T*>(device + offset);
}

}  // namespace

std::string_view RowPathName(RowPath path) {
  switch (path) {
    case RowPath::kWindows: return "device windows";
    case RowPath::kDeviceTransport: return "device all-to-all";
    case RowPath::kStaged: return "host-staged all-to-all";
  }
  return "?";
}

absl::StatusOr<std::unique_ptr<SharedWindows>> MapDeviceWindows(device::Backend& backend,
                                                                Transport& control, size_t bytes) {
  if (!backend.spec().is_cuda()) return control.MapSharedWindows(bytes);  // the fake device
#ifdef JOULE_HAVE_CUDA_IPC
  return MapCudaIpcWindows(control, backend.spec().index, bytes);
#else
  return absl::UnimplementedError("this build has no CUDA IPC windows");
#endif
}

absl::Status ReleaseDeviceWindow(device::Backend& backend, Transport& control,
                                 SharedWindows& window) {
#ifdef JOULE_HAVE_CUDA_IPC
  if (backend.spec().is_cuda()) {
    ClosePeerWindows(window);  // nobody frees memory a peer still has open
    return control.Barrier();
  }
#endif
  return absl::OkStatus();
}

DeviceStages::DeviceStages(const DeviceStagesOptions& options, int64_t hidden, int top_k)
    : options_(options),
      backend_(*options.backend),
      control_(*options.control),
      hidden_(hidden),
      top_k_(top_k),
      path_(FirstRowPath(options)),
      windows_([this](size_t bytes) { return MapDeviceWindows(backend_, control_, bytes); },
               path_ == RowPath::kWindows, options.control->rank(),
               [this](SharedWindows& window) { return ReleaseDeviceWindow(backend_, control_, window); }) {}

size_t DeviceStages::PayloadBytes() const {
  return static_cast<size_t>(hidden_) * (options_.payload == PayloadType::kBF16 ? 2 : 4);
}

RowType DeviceStages::WireType() const {
  return options_.payload == PayloadType::kBF16 ? RowType::kBF16 : RowType::kF32;
}

// Each send row's [expert ids, router weights] to its destination over the
// control transport, grouped by expert on arrival.
absl::Status DeviceStages::ExchangeChoices(DispatchLayout& L, const int32_t* host_ids,
                                           const float* host_weights, int64_t slots,
                                           const ExpertsView& held) {
  const size_t row = 2 * static_cast<size_t>(top_k_) * sizeof(int32_t);
  choices_send_.resize(std::max<size_t>(1, L.send_rows() * row));
  choices_recv_.resize(std::max<size_t>(1, L.recv_rows() * row));
  PlaceSendRows(L, row, nullptr, choices_send_.data(), choices_recv_.data(), &choice_rows_);
  WriteRowChoices(L, host_ids, host_weights, slots, top_k_, choice_rows_.data(), 0);
  RowExchangeBytes(L, row, /*back=*/false, &bytes_);
  RETURN_IF_ERROR(control_.AllToAllV(choices_send_.data(), bytes_.send.data(),
                                     bytes_.send_offsets.data(), choices_recv_.data(),
                                     bytes_.recv.data(), bytes_.recv_offsets.data()));
  return GroupReceivedChoices(choices_recv_.data(), row, 0, top_k_, held, &L);
}

absl::StatusOr<bool> DeviceStages::PrepareRows(const DispatchLayout& L) {
  const int W = L.world;
  const size_t payload = PayloadBytes();
  bool direct = false;
  if (path_ == RowPath::kWindows) {
    // Sized for the rank that needs the most (every rank computes the same).
    size_t combine_bytes = 0, dispatch_bytes = 0;
    for (int r = 0; r < W; ++r) {
      combine_bytes = std::max<size_t>(combine_bytes, L.RowsBefore(r, W) * payload);
      dispatch_bytes = std::max<size_t>(dispatch_bytes, L.RowsFrom(r, W) * payload);
    }
    ASSIGN_OR_RETURN(direct, windows_.Ensure(combine_bytes, dispatch_bytes));
    if (!direct) path_ = options_.row_transport != nullptr ? RowPath::kDeviceTransport : RowPath::kStaged;
  }
  const size_t f32_row = static_cast<size_t>(hidden_) * sizeof(float);
  const int64_t choices = L.recv_choices();
  RETURN_IF_ERROR(Grow(backend_, device::MemoryKind::kDevice, choices * f32_row, &expert_out_));
  if (direct) return true;
  const bool per_choice = options_.payload == PayloadType::kF32;
  const int64_t send_choices = L.send_choice_offsets[L.send_rows()];
  const size_t combine_send = per_choice ? choices * f32_row : L.recv_rows() * payload;
  const size_t combine_recv = per_choice ? send_choices * f32_row : L.send_rows() * payload;
  for (auto [buffer, bytes] : {std::pair{&dispatch_send_, L.send_rows() * payload},
                               std::pair{&dispatch_recv_, L.recv_rows() * payload},
                               std::pair{&combine_send_, combine_send},
                               std::pair{&combine_recv_, combine_recv}}) {
    RETURN_IF_ERROR(Grow(backend_, device::MemoryKind::kDevice, bytes, buffer));
  }
  return false;
}

absl::StatusOr<DeviceStages::DeviceLayout> DeviceStages::UploadLayout(const DispatchLayout& L,
                                                                      bool direct) {
  const int me = L.me;
  const bool per_choice = options_.payload == PayloadType::kF32;
  const int64_t choices = L.recv_choices();
  std::byte* dispatch_send = dispatch_send_.as<std::byte>();
  std::byte* dispatch_recv = dispatch_recv_.as<std::byte>();
  std::byte* combine_send = combine_send_.as<std::byte>();
  std::byte* combine_recv = combine_recv_.as<std::byte>();
  PlaceSendRows(L, PayloadBytes(), direct ? windows_.dispatch() : nullptr, dispatch_send,
                dispatch_recv, &send_rows_);
  if (per_choice) {  // one row per choice, in received order; this rank's own at its send choices
    const size_t row = PayloadBytes();  // F32
    const int64_t self_begin = L.row_choice_offsets[L.recv_offsets[me]];
    const int64_t self_end = L.row_choice_offsets[L.recv_offsets[me + 1]];
    std::byte* self = combine_recv + L.send_choice_offsets[L.send_offsets[me]] * row;
    return_rows_.resize(choices);
    for (int64_t c = 0; c < choices; ++c) {
      return_rows_[c] = c >= self_begin && c < self_end ? self + (c - self_begin) * row
                                                        : combine_send + c * row;
    }
  } else {
    PlaceReturnRows(L, PayloadBytes(), direct ? windows_.combine() : nullptr, combine_send,
                    combine_recv, &return_rows_);
  }
  device::WorkspaceLayout slices;
  auto bytes_of = [](const auto& v) { return v.size() * sizeof(v[0]); };
  const size_t send_to_token = slices.Reserve(bytes_of(L.send_to_token));
  const size_t send_rows = slices.Reserve(bytes_of(send_rows_));
  const size_t expert_offsets = slices.Reserve(bytes_of(L.expert_offsets));
  const size_t grouped_to_row = slices.Reserve(bytes_of(L.grouped_to_row));
  const size_t choice_to_grouped = slices.Reserve(bytes_of(L.choice_to_grouped));
  const size_t return_rows = slices.Reserve(bytes_of(return_rows_));
  const size_t row_choice_offsets = slices.Reserve(bytes_of(L.row_choice_offsets));
  const size_t choice_weight = slices.Reserve(bytes_of(L.choice_weight));
  const size_t token_row_offsets = slices.Reserve(bytes_of(L.token_row_offsets));
  const size_t token_rows = slices.Reserve(bytes_of(L.token_rows));
  const size_t slot_to_choice = slices.Reserve(bytes_of(L.slot_to_choice));
  RETURN_IF_ERROR(Grow(backend_, device::MemoryKind::kPinned, slices.bytes(), &layout_staging_));
  RETURN_IF_ERROR(Grow(backend_, device::MemoryKind::kDevice, slices.bytes(), &layout_));
  std::byte* host = layout_staging_.as<std::byte>();
  std::byte* dev = layout_.as<std::byte>();
  DeviceLayout d;
  d.send_to_token = Stage(L.send_to_token, send_to_token, host, dev);
  d.send_rows = Stage(send_rows_, send_rows, host, dev);
  d.expert_offsets = Stage(L.expert_offsets, expert_offsets, host, dev);
  d.grouped_to_row = Stage(L.grouped_to_row, grouped_to_row, host, dev);
  d.choice_to_grouped = Stage(L.choice_to_grouped, choice_to_grouped, host, dev);
  d.return_rows = Stage(return_rows_, return_rows, host, dev);
  d.row_choice_offsets = Stage(L.row_choice_offsets, row_choice_offsets, host, dev);
  d.choice_weight = Stage(L.choice_weight, choice_weight, host, dev);
  d.token_row_offsets = Stage(L.token_row_offsets, token_row_offsets, host, dev);
  d.token_rows = Stage(L.token_rows, token_rows, host, dev);
  d.slot_to_choice = Stage(L.slot_to_choice, slot_to_choice, host, dev);
  // The staging memory is written again only next layer, after this layer
  // synchronized the stream at its first exchange.
  RETURN_IF_ERROR(backend_.CopyAsync(dev, host, slices.bytes()));
  return d;
}

absl::Status DeviceStages::MoveRows(bool direct, const std::byte* send, std::byte* recv,
                                    const ExchangeBytes& bytes) {
  RETURN_IF_ERROR(written_->Wait());  // the rows are written (also into peers' windows)
  if (direct) return control_.Barrier();
  if (path_ == RowPath::kDeviceTransport) {
    return options_.row_transport->AllToAllV(send, bytes.send.data(), bytes.send_offsets.data(),
                                             recv, bytes.recv.data(), bytes.recv_offsets.data());
  }
  // kStaged: through pinned host memory at the same offsets.
  const int W = static_cast<int>(bytes.send.size());
  size_t send_end = 1, recv_end = 1;
  for (int p = 0; p < W; ++p) {
    send_end = std::max(send_end, bytes.send_offsets[p] + bytes.send[p]);
    recv_end = std::max(recv_end, bytes.recv_offsets[p] + bytes.recv[p]);
  }
  for (auto [buffer, need] : {std::pair{&host_send_, send_end}, std::pair{&host_recv_, recv_end}}) {
    const bool grows = buffer->empty() || buffer->bytes() < need;
    RETURN_IF_ERROR(Grow(backend_, device::MemoryKind::kPinned, need, buffer));
    if (grows) RETURN_IF_ERROR(control_.RegisterBuffer(buffer->data(), buffer->bytes()));
  }
  std::byte* host_send = host_send_.as<std::byte>();
  std::byte* host_recv = host_recv_.as<std::byte>();
  // Down on the copy stream: the other micro-batch's kernels, queued on the
  // backend's stream since this one's pack, are not waited for.
  if (copies_ == nullptr) {
    ASSIGN_OR_RETURN(copies_, backend_.CreateCopyStream());
  }
  for (int p = 0; p < W; ++p) {
    if (bytes.send[p] == 0) continue;
    RETURN_IF_ERROR(copies_->CopyAsync(host_send + bytes.send_offsets[p],
                                       send + bytes.send_offsets[p], bytes.send[p]));
  }
  RETURN_IF_ERROR(copies_->Synchronize());
  // Up on the backend's stream: ordered before this micro-batch's experts.
  RETURN_IF_ERROR(control_.AllToAllV(host_send, bytes.send.data(), bytes.send_offsets.data(),
                                     host_recv, bytes.recv.data(), bytes.recv_offsets.data()));
  for (int p = 0; p < W; ++p) {
    if (bytes.recv[p] == 0) continue;
    RETURN_IF_ERROR(backend_.CopyAsync(recv + bytes.recv_offsets[p],
                                       host_recv + bytes.recv_offsets[p], bytes.recv[p]));
  }
  return absl::OkStatus();
}

absl::Status DeviceStages::Run(DispatchLayout& L, const ExpertsView& held,
                               const ExpertsView& experts, const float* x,
                               const int32_t* host_ids, const float* host_weights,
                               const float* device_weights, int64_t tokens, float* out,
                               StageTraffic* traffic) {
  RETURN_IF_ERROR(Begin({.layout = &L, .held = &held, .experts = &experts, .x = x,
                         .host_ids = host_ids, .host_weights = host_weights,
                         .device_weights = device_weights, .tokens = tokens, .out = out}));
  RETURN_IF_ERROR(Dispatch());
  RETURN_IF_ERROR(Experts());
  ASSIGN_OR_RETURN(*traffic, Combine());
  return absl::OkStatus();
}

absl::Status DeviceStages::Begin(const Layer& layer) {
  const auto t_start = std::chrono::steady_clock::now();
  if (written_ == nullptr) {
    ASSIGN_OR_RETURN(written_, backend_.CreateEvent());
  }
  layer_ = layer;
  traffic_ = {};
  DispatchLayout& L = *layer.layout;
  RETURN_IF_ERROR(ExchangeChoices(L, layer.host_ids, layer.host_weights, layer.tokens * top_k_,
                                  *layer.held));
  ASSIGN_OR_RETURN(direct_, PrepareRows(L));
  ASSIGN_OR_RETURN(device_layout_, UploadLayout(L, direct_));
  const int64_t H = hidden_;
  RETURN_IF_ERROR(backend_.GatherRows({.in = layer.x, .in_type = RowType::kF32,
                                       .in_stride_bytes = H * 4,
                                       .index = device_layout_.send_to_token, .out_type = WireType(),
                                       .out_stride_bytes = static_cast<int64_t>(PayloadBytes()),
                                       .rows = L.send_rows(), .hidden = H,
                                       .out_rows = device_layout_.send_rows}));
  RETURN_IF_ERROR(written_->Record());
  traffic_.dispatch_seconds = SecondsSince(t_start);
  return absl::OkStatus();
}

absl::Status DeviceStages::Dispatch() {
  const auto t_start = std::chrono::steady_clock::now();
  const DispatchLayout& L = *layer_.layout;
  traffic_.dispatch_bytes = RowExchangeBytes(L, PayloadBytes(), /*back=*/false, &bytes_);
  RETURN_IF_ERROR(Annotate(MoveRows(direct_, dispatch_send_.as<std::byte>(),
                                    dispatch_recv_.as<std::byte>(), bytes_),
                           "dispatch"));
  traffic_.dispatch_seconds += SecondsSince(t_start);
  return absl::OkStatus();
}

// This rank's experts, reading the received rows where they landed, then
// the rows that go back: BF16 each received row's weighted sum, F32 each
// choice's row.
absl::Status DeviceStages::Experts() {
  const auto t_start = std::chrono::steady_clock::now();
  const DispatchLayout& L = *layer_.layout;
  const DeviceLayout& d = device_layout_;
  const int64_t H = hidden_;
  const int64_t payload = static_cast<int64_t>(PayloadBytes());
  const std::byte* received =
      direct_ ? windows_.dispatch()->at(L.me) : dispatch_recv_.as<std::byte>();
  const int64_t choices = L.recv_choices();
  RETURN_IF_ERROR(Annotate(
      RunGroupedExperts(backend_, *layer_.experts, L.layer,
                        {.x = received, .type = WireType(), .stride = H, .rows = d.grouped_to_row},
                        d.expert_offsets, choices, expert_out_.as<float>(), &expert_buffers_),
      "experts"));
  if (options_.payload == PayloadType::kBF16) {
    RETURN_IF_ERROR(backend_.ReduceRows({.in = expert_out_.data(), .in_type = RowType::kF32,
                                         .in_stride_bytes = H * 4,
                                         .offsets = d.row_choice_offsets,
                                         .index = d.choice_to_grouped, .weights = d.choice_weight,
                                         .out_type = RowType::kBF16, .out_stride_bytes = payload,
                                         .rows = L.recv_rows(), .hidden = H,
                                         .out_rows = d.return_rows}));
  } else {
    RETURN_IF_ERROR(backend_.GatherRows({.in = expert_out_.data(), .in_type = RowType::kF32,
                                         .in_stride_bytes = H * 4, .index = d.choice_to_grouped,
                                         .out_type = RowType::kF32, .out_stride_bytes = H * 4,
                                         .rows = choices, .hidden = H,
                                         .out_rows = d.return_rows}));
  }
  RETURN_IF_ERROR(written_->Record());
  traffic_.combine_seconds = SecondsSince(t_start);
  return absl::OkStatus();
}

// The rows back, then the reduce: BF16 adds each token's returned partial
// sums; F32 adds the choices with the router weights in choice order, the
// single-GPU engine's bits.
absl::StatusOr<StageTraffic> DeviceStages::Combine() {
  const auto t_start = std::chrono::steady_clock::now();
  const DispatchLayout& L = *layer_.layout;
  const DeviceLayout& d = device_layout_;
  const int64_t H = hidden_;
  const bool bf16 = options_.payload == PayloadType::kBF16;
  traffic_.combine_bytes = bf16 ? RowExchangeBytes(L, PayloadBytes(), /*back=*/true, &bytes_)
                                : ChoiceReturnBytes(L, H * 4, &bytes_);
  RETURN_IF_ERROR(Annotate(MoveRows(direct_, combine_send_.as<std::byte>(),
                                    combine_recv_.as<std::byte>(), bytes_),
                           "combine"));
  const std::byte* returned =
      direct_ ? windows_.combine()->at(L.me) : combine_recv_.as<std::byte>();
  if (bf16) {
    RETURN_IF_ERROR(backend_.ReduceRows({.in = returned, .in_type = RowType::kBF16,
                                         .in_stride_bytes = static_cast<int64_t>(PayloadBytes()),
                                         .offsets = d.token_row_offsets, .index = d.token_rows,
                                         .out = layer_.out, .out_type = RowType::kF32,
                                         .out_stride_bytes = H * 4, .accumulate = true,
                                         .rows = layer_.tokens, .hidden = H}));
  } else {
    RETURN_IF_ERROR(backend_.Unpermute({.expert_out = reinterpret_cast<const float*>(returned),
                                        .slot_to_permuted = d.slot_to_choice,
                                        .weights = layer_.device_weights, .tokens = layer_.tokens,
                                        .top_k = top_k_, .hidden = H, .out = layer_.out,
                                        .accumulate = true}));
  }
  traffic_.combine_seconds += SecondsSince(t_start);
  return traffic_;
}

}  // namespace joule::ep
