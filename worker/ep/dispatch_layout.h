// The layout of one MoE layer's expert-parallel exchange: the handle dispatch
// computes and combine reads back in reverse, so the two cannot disagree
// (DeepEP's get_dispatch_layout / dispatch / combine split).
//
// A token goes to each destination rank once, however many of its top_k
// experts live there (DeepEP's dedup: with top-k 8 over EP 2 that is 4x fewer
// bytes). A send row is [activations, expert id x top_k, router weight x
// top_k]: the ids and weights of the token's choices on that rank in choice
// order, the unused entries id -1. Send rows are grouped by destination, in
// token order; received rows sit at recv_offsets[p] in source-rank order.
// The receiver expands each row into one "choice" per expert it names and
// regroups the choices by expert for the grouped GEMMs (combine.h says how
// the outputs go back).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "common/placement.h"
#include "worker/ep/transport.h"
#include "worker/model/device_weights.h"

namespace joule::ep {

struct DispatchLayout {
  int layer = -1;
  int world = 0;
  int me = 0;
  // Sender side.
  std::vector<int32_t> dest;                 // [slots] destination rank of each slot
  std::vector<int64_t> send_offsets;         // [world + 1] first send row for each destination
  std::vector<int32_t> send_to_token;        // [send rows] token of each send row
  std::vector<int64_t> send_copy_of;         // [send rows] the token's first send row, or -1
  std::vector<int64_t> send_choice_offsets;  // [send rows + 1] first choice of each send row
  std::vector<int32_t> slot_row;             // [slots] send row carrying each slot
  std::vector<int32_t> slot_to_choice;       // [slots] sender-side choice index of each slot
  std::vector<int64_t> token_row_offsets;    // [tokens + 1] send rows of each token ...
  std::vector<int32_t> token_rows;           // ... in the order its choices first reach a rank
  // counts[src * world + dst]: rows src sends to dst, identical on every rank.
  std::vector<int64_t> counts;
  // Receiver side.
  std::vector<int64_t> recv_offsets;         // [world + 1] first received row from each source
  std::vector<int64_t> row_choice_offsets;   // [recv rows + 1] first choice of each received row
  std::vector<int32_t> choice_expert;        // [choices] expert of each choice
  std::vector<float> choice_weight;          // [choices] router weight of each choice
  std::vector<int32_t> choice_row;           // [choices] received row of each choice
  std::vector<int64_t> expert_offsets;       // [num_experts + 1] choices grouped by expert
  std::vector<int32_t> grouped_to_choice;    // grouped row -> choice
  std::vector<int32_t> choice_to_grouped;    // choice -> grouped row
  std::vector<int32_t> grouped_to_row;       // grouped row -> received row
  std::vector<float> grouped_weight;         // [choices] router weight of each grouped row

  int64_t send_rows() const { return send_offsets[world]; }
  int64_t recv_rows() const { return recv_offsets[world]; }
  int64_t recv_choices() const { return static_cast<int64_t>(choice_expert.size()); }
  // Rank p's rows for rank d sit at row RowsBefore(p, d) of p's send layout;
  // rank d receives them at row RowsFrom(d, p) (sources in rank order).
  int64_t RowsBefore(int p, int d) const;
  int64_t RowsFrom(int d, int p) const;
};

// (a) The sender side for `slots` (token, choice) slots: a replica for every
// slot, then one send row per (token, destination rank), grouped by
// destination. `rank_token` and `rank_row` are scratch. `first_token`: the
// first slot's token in the layer's call (a second micro-batch), so replicas
// are chosen as for the whole call.
void BuildSendLayout(const Placement& placement, int layer, const int32_t* expert_ids,
                     int64_t slots, int top_k, DispatchLayout* layout,
                     std::vector<int32_t>* rank_token, std::vector<int32_t>* rank_row,
                     int64_t first_token = 0);

// (b) The world x world count matrix from the all-gathered count rows (each
// [rows to every rank, ...] of row_len entries) and this rank's receive
// offsets. Returns the rows that move in all.
int64_t SetCounts(const std::vector<int64_t>& count_all, int row_len, DispatchLayout* layout);

// (d) The receiver side: every received row (`stride` bytes apart, its
// expert ids and weights after `payload` bytes) becomes one choice per expert
// it names, grouped by expert (stable: source rank, then the source's token
// and choice order). Internal error for a row naming an expert `held` lacks.
absl::Status GroupReceivedChoices(const std::byte* received, size_t stride, size_t payload,
                                  int top_k, const ExpertsView& held, DispatchLayout* layout);

// Byte counts and offsets of one all-to-all-v, per peer.
struct ExchangeBytes {
  std::vector<size_t> send, send_offsets, recv, recv_offsets;
  void Resize(int world) {
    send.resize(world);
    send_offsets.resize(world);
    recv.resize(world);
    recv_offsets.resize(world);
  }
};

// The byte counts of an all-to-all-v moving one row of `row_bytes` per
// send row: dispatch (each rank's send rows to their destinations) or, with
// `back`, the same rows returning (combine: received rows back to their
// sources). Rows for this rank itself count 0 bytes: they are written in
// place. Returns the bytes this rank sends to peers.
uint64_t RowExchangeBytes(const DispatchLayout& layout, size_t row_bytes, bool back,
                          ExchangeBytes* bytes);
// The same for a combine that returns one row per received choice (F32:
// the source un-permutes them in choice order).
uint64_t ChoiceReturnBytes(const DispatchLayout& layout, size_t row_bytes, ExchangeBytes* bytes);

// Where each dispatch row is written, [send rows] into *rows: straight into
// each destination's window (`windows`, ranks on one host), or for an
// all-to-all into `send` at its send row, this rank's own rows straight
// into `recv` where they would arrive. Rows are `stride` bytes.
void PlaceSendRows(const DispatchLayout& layout, size_t stride, const SharedWindows* windows,
                   std::byte* send, std::byte* recv, std::vector<std::byte*>* rows);
// Where each received row's combine row (one per received row) is written,
// [received rows]: straight into its source's window at the source's send
// row, or for an all-to-all into `send` in received order, this rank's own
// rows straight into `recv` at their send rows.
void PlaceReturnRows(const DispatchLayout& layout, size_t stride, const SharedWindows* windows,
                     std::byte* send, std::byte* recv, std::vector<std::byte*>* rows);

// Writes each send row's expert ids and router weights ([top_k ids, top_k
// weights], unused ids -1, in the row's choice order) at rows[row] + offset.
void WriteRowChoices(const DispatchLayout& layout, const int32_t* expert_ids,
                     const float* router_weights, int64_t slots, int top_k,
                     std::byte* const* rows, size_t offset);

// A byte buffer handed to the transport. Grows geometrically and registers
// each new allocation (a hint for zero-copy transports), so steady-state
// steps neither allocate nor re-register.
class ExchangeBuffer {
 public:
  absl::Status Reserve(size_t bytes, Transport* transport);
  std::byte* data() { return data_.get(); }

 private:
  HostBuffer data_;
  size_t capacity_ = 0;
};

// Rows [0, n) written by fn(begin, end, dst) in up to three ranges: this
// rank's own rows [self_begin, self_end) land at self_dst (row self_begin
// first) — straight where the receiving side reads them, so they skip the
// transport and its copy — the others at peer + row * stride.
template <typename Fn>
void WriteRowsSplitSelf(int64_t n, int64_t self_begin, int64_t self_end, std::byte* peer,
                        size_t stride, std::byte* self_dst, Fn fn) {
  if (self_begin > 0) fn(0, self_begin, peer);
  if (self_end > self_begin) fn(self_begin, self_end, self_dst);
  if (n > self_end) fn(self_end, n, peer + self_end * stride);
}

}  // namespace joule::ep
