#include "worker/ep/dispatch_layout.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/moe.h"

namespace joule::ep {

int64_t DispatchLayout::RowsBefore(int p, int d) const {
  int64_t r = 0;
  for (int q = 0; q < d; ++q) r += counts[p * world + q];
  return r;
}

int64_t DispatchLayout::RowsFrom(int d, int p) const {
  int64_t r = 0;
  for (int q = 0; q < p; ++q) r += counts[q * world + d];
  return r;
}

void BuildSendLayout(const Placement& placement, int layer, const int32_t* expert_ids,
                     int64_t slots, int top_k, DispatchLayout* layout,
                     std::vector<int32_t>* rank_token_scratch,
                     std::vector<int32_t>* rank_row_scratch, int64_t first_token) {
  DispatchLayout& L = *layout;
  const int W = L.world;
  const int K = top_k;
  std::vector<int32_t>& rank_token = *rank_token_scratch;
  std::vector<int32_t>& rank_row = *rank_row_scratch;
  L.layer = layer;
  L.dest.resize(slots);
  for (int64_t s = 0; s < slots; ++s) {
    L.dest[s] = ChooseReplica(placement, layer, expert_ids[s], first_token + s / K, L.me);
  }
  const int64_t send_tokens = slots / K;
  L.send_offsets.assign(W + 1, 0);
  rank_token.assign(W, -1);
  for (int64_t s = 0; s < slots; ++s) {
    const int32_t d = L.dest[s];
    if (rank_token[d] != s / K) {
      rank_token[d] = static_cast<int32_t>(s / K);
      ++L.send_offsets[d + 1];
    }
  }
  for (int d = 0; d < W; ++d) L.send_offsets[d + 1] += L.send_offsets[d];
  const int64_t send_rows = L.send_offsets[W];
  L.send_to_token.resize(send_rows);
  L.send_copy_of.resize(send_rows);
  L.send_choice_offsets.assign(send_rows + 1, 0);
  L.slot_row.resize(slots);
  L.slot_to_choice.resize(slots);
  L.token_row_offsets.resize(send_tokens + 1);
  L.token_rows.resize(send_rows);
  rank_token.assign(W, -1);
  rank_row.assign(L.send_offsets.begin(), L.send_offsets.end() - 1);  // next free row per rank
  int64_t token_row = 0;
  for (int64_t t = 0; t < send_tokens; ++t) {
    L.token_row_offsets[t] = token_row;
    for (int k = 0; k < K; ++k) {
      const int64_t s = t * K + k;
      const int32_t d = L.dest[s];
      if (rank_token[d] != t) {
        rank_token[d] = static_cast<int32_t>(t);
        const int32_t row = rank_row[d]++;
        L.send_to_token[row] = static_cast<int32_t>(t);
        const int64_t first = L.token_row_offsets[t];
        L.send_copy_of[row] = token_row == first ? -1 : L.token_rows[first];
        L.token_rows[token_row++] = row;
      }
      const int32_t row = rank_row[d] - 1;  // this token's row for d, taken above or earlier
      L.slot_row[s] = row;
      L.slot_to_choice[s] = static_cast<int32_t>(L.send_choice_offsets[row + 1]++);  // index in row
    }
  }
  L.token_row_offsets[send_tokens] = token_row;
  for (int64_t r = 0; r < send_rows; ++r) L.send_choice_offsets[r + 1] += L.send_choice_offsets[r];
  for (int64_t s = 0; s < slots; ++s) L.slot_to_choice[s] += L.send_choice_offsets[L.slot_row[s]];
}

int64_t SetCounts(const std::vector<int64_t>& count_all, int row_len, DispatchLayout* layout) {
  DispatchLayout& L = *layout;
  const int W = L.world;
  L.counts.resize(static_cast<size_t>(W) * W);
  int64_t global_rows = 0;
  for (int p = 0; p < W; ++p) {
    for (int d = 0; d < W; ++d) {
      L.counts[p * W + d] = count_all[p * row_len + d];
      global_rows += L.counts[p * W + d];
    }
  }
  L.recv_offsets.assign(W + 1, 0);
  for (int p = 0; p < W; ++p) L.recv_offsets[p + 1] = L.recv_offsets[p] + L.counts[p * W + L.me];
  return global_rows;
}

absl::Status GroupReceivedChoices(const std::byte* received, size_t stride, size_t payload,
                                  int top_k, const ExpertsView& held, DispatchLayout* layout) {
  DispatchLayout& L = *layout;
  const int K = top_k;
  const int E = held.num_experts;
  const int64_t recv_rows = L.recv_rows();
  L.row_choice_offsets.resize(recv_rows + 1);
  L.choice_expert.clear();
  L.choice_weight.clear();
  L.choice_row.clear();
  for (int64_t r = 0; r < recv_rows; ++r) {
    L.row_choice_offsets[r] = L.recv_choices();
    const std::byte* meta = received + r * stride + payload;
    for (int j = 0; j < K; ++j) {
      int32_t e;
      std::memcpy(&e, meta + j * sizeof(int32_t), sizeof(int32_t));
      if (e == -1) break;
      if (e < 0 || e >= E || held.gate[e] == nullptr) {
        // Unreachable while placements agree (the count exchange checks) and
        // SetPlacement checked the weights; peers then time out in combine.
        return absl::InternalError(absl::StrCat("received a row for expert ", e, " which rank ",
                                                L.me, " does not hold"));
      }
      float w;
      std::memcpy(&w, meta + (K + j) * sizeof(int32_t), sizeof(float));
      L.choice_expert.push_back(e);
      L.choice_weight.push_back(w);
      L.choice_row.push_back(static_cast<int32_t>(r));
    }
  }
  const int64_t choices = L.recv_choices();
  L.row_choice_offsets[recv_rows] = choices;
  L.expert_offsets.resize(E + 1);
  L.grouped_to_choice.resize(choices);
  L.choice_to_grouped.resize(choices);
  kernels::cpu::ComputeMoeLayout({.expert_ids = L.choice_expert.data(), .tokens = choices,
                                  .top_k = 1, .num_experts = E,
                                  .expert_offsets = L.expert_offsets.data(),
                                  .permuted_to_slot = L.grouped_to_choice.data(),
                                  .slot_to_permuted = L.choice_to_grouped.data()});
  L.grouped_to_row.resize(choices);
  L.grouped_weight.resize(choices);
  for (int64_t g = 0; g < choices; ++g) {
    L.grouped_to_row[g] = L.choice_row[L.grouped_to_choice[g]];
    L.grouped_weight[g] = L.choice_weight[L.grouped_to_choice[g]];
  }
  return absl::OkStatus();
}

uint64_t RowExchangeBytes(const DispatchLayout& L, size_t row_bytes, bool back,
                          ExchangeBytes* bytes) {
  bytes->Resize(L.world);
  uint64_t peer_bytes = 0;
  for (int p = 0; p < L.world; ++p) {
    const bool peer = p != L.me;  // rows for this rank itself are in place already
    const int64_t send_rows = L.send_offsets[p + 1] - L.send_offsets[p];
    const int64_t recv_rows = L.recv_offsets[p + 1] - L.recv_offsets[p];
    bytes->send[p] = peer ? (back ? recv_rows : send_rows) * row_bytes : 0;
    bytes->send_offsets[p] = (back ? L.recv_offsets[p] : L.send_offsets[p]) * row_bytes;
    bytes->recv[p] = peer ? (back ? send_rows : recv_rows) * row_bytes : 0;
    bytes->recv_offsets[p] = (back ? L.send_offsets[p] : L.recv_offsets[p]) * row_bytes;
    peer_bytes += bytes->send[p];
  }
  return peer_bytes;
}

uint64_t ChoiceReturnBytes(const DispatchLayout& L, size_t row_bytes, ExchangeBytes* bytes) {
  bytes->Resize(L.world);
  uint64_t peer_bytes = 0;
  for (int p = 0; p < L.world; ++p) {
    const bool peer = p != L.me;
    const int64_t from = L.row_choice_offsets[L.recv_offsets[p]];
    const int64_t to = L.send_choice_offsets[L.send_offsets[p]];
    bytes->send[p] = peer ? (L.row_choice_offsets[L.recv_offsets[p + 1]] - from) * row_bytes : 0;
    bytes->send_offsets[p] = from * row_bytes;
    bytes->recv[p] = peer ? (L.send_choice_offsets[L.send_offsets[p + 1]] - to) * row_bytes : 0;
    bytes->recv_offsets[p] = to * row_bytes;
    peer_bytes += bytes->send[p];
  }
  return peer_bytes;
}

void PlaceSendRows(const DispatchLayout& L, size_t stride, const SharedWindows* windows,
                   std::byte* send, std::byte* recv, std::vector<std::byte*>* rows) {
  const int me = L.me;
  rows->resize(L.send_rows());
  for (int d = 0; d < L.world; ++d) {
    std::byte* base = windows != nullptr ? windows->at(d) + L.RowsFrom(d, me) * stride
                      : d == me          ? recv + L.recv_offsets[me] * stride
                                         : send + L.send_offsets[d] * stride;
    for (int64_t r = L.send_offsets[d]; r < L.send_offsets[d + 1]; ++r) {
      (*rows)[r] = base + (r - L.send_offsets[d]) * stride;
    }
  }
}

void PlaceReturnRows(const DispatchLayout& L, size_t stride, const SharedWindows* windows,
                     std::byte* send, std::byte* recv, std::vector<std::byte*>* rows) {
  const int me = L.me;
  rows->resize(L.recv_rows());
  for (int p = 0; p < L.world; ++p) {
    std::byte* base = windows != nullptr ? windows->at(p) + L.RowsBefore(p, me) * stride
                      : p == me          ? recv + L.send_offsets[me] * stride
                                         : send + L.recv_offsets[p] * stride;
    for (int64_t r = L.recv_offsets[p]; r < L.recv_offsets[p + 1]; ++r) {
      (*rows)[r] = base + (r - L.recv_offsets[p]) * stride;
    }
  }
}

void WriteRowChoices(const DispatchLayout& L, const int32_t* expert_ids,
                     const float* router_weights, int64_t slots, int top_k,
                     std::byte* const* rows, size_t offset) {
  const int K = top_k;
  constexpr int32_t kUnused = -1;
  for (int64_t r = 0; r < L.send_rows(); ++r) {
    std::byte* ids = rows[r] + offset;
    for (int j = 0; j < K; ++j) std::memcpy(ids + j * sizeof(int32_t), &kUnused, sizeof(int32_t));
  }
  for (int64_t s = 0; s < slots; ++s) {
    const int64_t row = L.slot_row[s];
    const int64_t j = L.slot_to_choice[s] - L.send_choice_offsets[row];
    std::byte* meta = rows[row] + offset;
    std::memcpy(meta + j * sizeof(int32_t), &expert_ids[s], sizeof(int32_t));
    std::memcpy(meta + (K + j) * sizeof(int32_t), &router_weights[s], sizeof(float));
  }
}

absl::Status ExchangeBuffer::Reserve(size_t bytes, Transport* transport) {
  if (bytes <= capacity_) return absl::OkStatus();
  capacity_ = std::max(bytes, 2 * capacity_);
  data_ = AllocateHostBuffer(capacity_);
  return transport->RegisterBuffer(data_.get(), capacity_);
}

}  // namespace joule::ep
