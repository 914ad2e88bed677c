// Expert parallelism on a device (a GPU worker; the fake device in tests):
// the dispatch, experts, combine and reduce stages of one MoE layer with
// every row in device memory, after the layout and the count exchange (on
// the host, ep_executor.cc).
//
// Per layer: the router's choices of each send row ([expert ids, router
// weights], small) go over the control transport in host memory, so the
// receiver groups its choices by expert on the host; the layout's index
// arrays and row addresses go up in one copy; then on the device's stream
//   pack     GatherRows: x (F32) -> payload rows (BF16 rounded, or F32),
//            written where the row path wants them;
//   dispatch the rows move (below);
//   experts  RunGroupedExperts over the received rows in place (grouped by
//            expert through an index), one F32 output row per choice;
//   return   BF16: ReduceRows sums each received row's weighted choices and
//            rounds once into its combine row; F32: GatherRows copies each
//            choice's row, unweighted;
//   combine  the rows move back;
//   reduce   BF16: ReduceRows adds each token's returned partial sums into
//            out; F32: Unpermute adds the choices with the router weights in
//            choice order, the single-GPU engine's bits.
//
// How rows move is chosen once per executor (ChooseRowPath), one kind per
// device and transport:
//   kWindows         ranks on one host write straight into each other's
//                    device windows (CUDA IPC; several ranks may share one
//                    GPU); the stream is synchronized, then a control
//                    barrier stands in for each all-to-all (BF16 payloads).
//   kDeviceTransport all-to-all-v of device buffers (NCCL), after the stream
//                    is synchronized.
//   kStaged          device rows copied to pinned host memory (on a copy
//                    stream, not behind the other micro-batch's kernels), the
//                    control transport's all-to-all-v (UCX), copied back on
//                    the backend's stream: GPU hosts without NVLink or a
//                    GPU-aware fabric.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/device/backend.h"
#include "worker/ep/combine.h"
#include "worker/ep/dispatch_layout.h"
#include "worker/ep/exchange_windows.h"
#include "worker/ep/transport.h"
#include "worker/model/device_weights.h"
#include "worker/model/experts.h"

namespace joule::ep {

enum class RowPath { kWindows, kDeviceTransport, kStaged };
std::string_view RowPathName(RowPath path);

// Shared windows in `backend`'s device memory on every rank of `control`'s
// group (collective): CUDA IPC windows on a GPU; on a device whose memory is
// this process's host memory (the fake device), the control transport's own
// windows. Unimplemented on every rank when some rank cannot map them.
absl::StatusOr<std::unique_ptr<SharedWindows>> MapDeviceWindows(device::Backend& backend,
                                                                Transport& control, size_t bytes);

// Before a window from MapDeviceWindows is freed (collective): a CUDA IPC
// window's peers close their mappings of it first, and pass a barrier.
absl::Status ReleaseDeviceWindow(device::Backend& backend, Transport& control,
                                 SharedWindows& window);

struct DeviceStagesOptions {
  device::Backend* backend = nullptr;
  Transport* control = nullptr;        // host memory: choices, barriers, staged rows
  Transport* row_transport = nullptr;  // device memory (NCCL), or null
  PayloadType payload = PayloadType::kBF16;
  bool shared_windows = true;          // try device windows first (BF16 only)
};

// Bytes sent to peers and seconds, per exchange, of one layer.
struct StageTraffic {
  uint64_t dispatch_bytes = 0;
  uint64_t combine_bytes = 0;
  // Host time in the phases (a second micro-batch's phases in between are
  // not counted): choices exchange, upload, pack launch and the rows' move;
  double dispatch_seconds = 0;
  // expert and return launches, waiting for them, the move back, the reduce launch.
  double combine_seconds = 0;
};

class DeviceStages {
 public:
  DeviceStages(const DeviceStagesOptions& options, int64_t hidden, int top_k);

  // The path rows take until the windows are first needed: kWindows may
  // still fall back when some rank cannot map them.
  RowPath row_path() const { return path_; }

  // Collective: frees this micro-batch's device windows in the order CUDA
  // IPC needs (ExchangeWindows::ReleaseAll).
  absl::Status ReleaseWindows() { return windows_.ReleaseAll(); }

  // Collective, after the count exchange set `layout`'s counts: dispatches
  // the rows of x [tokens, hidden] (device, F32) by `layout`, runs this
  // rank's experts (`held`: host views, to check what is held; `experts`:
  // the same experts in device memory), combines, and adds into out
  // (device). host_ids/host_weights: the router's [tokens * top_k] choices
  // on the host; device_weights: the same weights in device memory.
  // Run is the four phases below in order.
  absl::Status Run(DispatchLayout& layout, const ExpertsView& held, const ExpertsView& experts,
                   const float* x, const int32_t* host_ids, const float* host_weights,
                   const float* device_weights, int64_t tokens, float* out, StageTraffic* traffic);

  // The phases of Run. Two DeviceStages (two micro-batches of one layer)
  // interleave them on one stream, each phase collective in the same order
  // on every rank, so one micro-batch's host waits (for its rows to be
  // written, the exchange, its peers) overlap the other's kernels.
  struct Layer {
    DispatchLayout* layout = nullptr;
    const ExpertsView* held = nullptr;
    const ExpertsView* experts = nullptr;
    const float* x = nullptr;
    const int32_t* host_ids = nullptr;
    const float* host_weights = nullptr;
    const float* device_weights = nullptr;
    int64_t tokens = 0;
    float* out = nullptr;
  };
  // The choices exchange, buffers, the layout's upload and the pack launch.
  absl::Status Begin(const Layer& layer);
  // Waits for this micro-batch's pack (not later launches), moves the rows.
  absl::Status Dispatch();
  // Launches the experts over the received rows and the return rows.
  absl::Status Experts();
  // Waits for the return rows, moves them back, launches the reduce into out.
  // Returns the layer's traffic.
  absl::StatusOr<StageTraffic> Combine();

 private:
  // The layer's index arrays and row addresses in device memory.
  struct DeviceLayout {
    const int32_t* send_to_token = nullptr;   // [send rows]
    std::byte* const* send_rows = nullptr;     // [send rows] where each dispatch row goes
    const int64_t* expert_offsets = nullptr;  // [experts + 1]
    const int32_t* grouped_to_row = nullptr;  // [choices]
    const int64_t* row_choice_offsets = nullptr;  // [received rows + 1] (BF16 return)
    const int32_t* choice_to_grouped = nullptr;   // [choices]
    const float* choice_weight = nullptr;         // [choices] (BF16 return)
    std::byte* const* return_rows = nullptr;  // BF16: [received rows]; F32: [choices]
    const int64_t* token_row_offsets = nullptr;  // [tokens + 1] (BF16 reduce)
    const int32_t* token_rows = nullptr;         // [send rows] (BF16 reduce)
    const int32_t* slot_to_choice = nullptr;     // [slots] (F32 reduce)
  };

  absl::Status ExchangeChoices(DispatchLayout& L, const int32_t* host_ids,
                               const float* host_weights, int64_t slots,
                               const ExpertsView& held);
  // Buffers for this layer's rows and, with windows, the windows; false
  // when the rows go through a transport.
  absl::StatusOr<bool> PrepareRows(const DispatchLayout& L);
  absl::StatusOr<DeviceLayout> UploadLayout(const DispatchLayout& L, bool direct);
  // Moves rows as the path says; `bytes` are the all-to-all's (ignored
  // through windows).
  // Waits for this micro-batch's launches so far (`written_`).
  absl::Status MoveRows(bool direct, const std::byte* send, std::byte* recv,
                        const ExchangeBytes& bytes);
  size_t PayloadBytes() const;  // one dispatch or combine row
  kernels::RowType WireType() const;

  DeviceStagesOptions options_;
  device::Backend& backend_;
  Transport& control_;
  const int64_t hidden_;
  const int top_k_;
  RowPath path_;
  ExchangeWindows windows_;

  // Device memory: payload rows out and in, the experts' per-choice F32
  // outputs, combine rows out and back, the layer's index arrays.
  device::Buffer dispatch_send_, dispatch_recv_, expert_out_, combine_send_, combine_recv_,
      layout_;
  device::Buffer layout_staging_;  // pinned: the index arrays on their way up
  device::Buffer host_send_, host_recv_;  // pinned: kStaged rows
  std::unique_ptr<device::CopyStream> copies_;  // kStaged: the rows' way down
  GroupedExpertBuffers expert_buffers_;
  // Host: the choices of each send row / received row, the exchange's counts.
  std::vector<std::byte> choices_send_, choices_recv_;
  std::vector<std::byte*> choice_rows_;
  std::vector<std::byte*> send_rows_, return_rows_;
  ExchangeBytes bytes_;
  // Between the phases: the layer in flight, its device layout, whether rows
  // go through windows, its traffic so far; the event after this micro-batch's
  // latest launches.
  Layer layer_;
  DeviceLayout device_layout_;
  bool direct_ = false;
  StageTraffic traffic_;
  std::chrono::steady_clock::time_point combine_start_;
  std::unique_ptr<device::Event> written_;
};

}  // namespace joule::ep
