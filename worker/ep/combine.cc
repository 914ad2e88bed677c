#include "worker/ep/combine.h"

#include "common/status.h"
#include "kernels/cpu/moe.h"

namespace joule::ep {
namespace {

namespace kc = kernels::cpu;
using kernels::RowType;

// BF16: each received row's weighted sum is fused into the down projection,
// which runs in column chunks; every finished chunk is rounded straight into
// the row that goes back (a peer's window, or the combine send buffer) while
// it is in cache, so the F32 sums never reach memory.
class SummedBf16Combine final : public CombineStrategy {
 public:
  RowType payload_type() const override { return RowType::kBF16; }

  size_t ReturnBytes(const DispatchLayout& L, int64_t hidden) const override {
    return L.send_rows() * PayloadBytes(hidden);  // one row back per send row
  }

  absl::Status RunExperts(const Exchange& x, const GroupedInput& rows, device::Backend& backend,
                          const ExpertsView& experts, GroupedExpertBuffers* buffers) override {
    const DispatchLayout& L = *x.layout;
    const size_t payload = PayloadBytes(x.hidden);
    const int64_t recv_rows = L.recv_rows();
    // Where received row r's combine row goes: rank p's rows straight into
    // its window where its own combine reads them (row RowsBefore(p, me) on);
    // otherwise as the all-to-all sends them, from `b` in received order, but
    // this rank's own rows straight into `a`. `b` already holds recv_rows
    // dispatch rows, longer than combine rows, and the gate/up projections
    // are done with the received rows before the first chunk lands on them.
    PlaceReturnRows(L, payload, x.direct ? x.win_a : nullptr, x.b->data(), x.a->data(),
                    &combine_row_);
    const FusedCombine fused{
        .rows = L.grouped_to_row.data(), .weights = L.grouped_weight.data(),
        .out_rows = recv_rows, .sink = [&](int64_t col0, int64_t cols, const float* y) {
          chunk_row_.resize(recv_rows);
          for (int64_t r = 0; r < recv_rows; ++r) chunk_row_[r] = combine_row_[r] + col0 * sizeof(uint16_t);
          kc::LaunchGatherRows({.in = y, .in_type = RowType::kF32, .in_stride_bytes = cols * 4,
                                .out_type = RowType::kBF16, .rows = recv_rows, .hidden = cols,
                                .out_rows = chunk_row_.data()},
                               x.stream);
        }};
    return RunGroupedExperts(backend, experts, L.layer, rows, L.expert_offsets.data(),
                             L.expert_offsets[experts.num_experts], nullptr, buffers, &fused);
  }

  absl::StatusOr<uint64_t> PrepareReturn(const Exchange& x, ExchangeBytes* bytes) override {
    return RowExchangeBytes(*x.layout, PayloadBytes(x.hidden), /*back=*/true, bytes);
  }

  // Each token adds its ranks' partial sums (widened, no intermediate copy).
  void Reduce(const Exchange& x, const std::byte* returned, const float*, int64_t tokens, int,
              float* out) override {
    const DispatchLayout& L = *x.layout;
    kc::LaunchReduceRows({.in = returned, .in_type = RowType::kBF16,
                          .in_stride_bytes = static_cast<int64_t>(PayloadBytes(x.hidden)),
                          .offsets = L.token_row_offsets.data(), .index = L.token_rows.data(),
                          .out = out, .out_type = RowType::kF32, .out_stride_bytes = x.hidden * 4,
                          .accumulate = true, .rows = tokens, .hidden = x.hidden},
                         x.stream);
  }

 private:
  std::vector<std::byte*> combine_row_;  // [received rows] where each combine row goes
  std::vector<std::byte*> chunk_row_;    // the same, at one column chunk
};

// F32: one unweighted row per choice goes back, in choice order; the source
// adds them with the router weights in choice order, bit-identical to the
// single-process engine.
class PerChoiceF32Combine final : public CombineStrategy {
 public:
  RowType payload_type() const override { return RowType::kF32; }

  size_t ReturnBytes(const DispatchLayout& L, int64_t hidden) const override {
    return L.send_choice_offsets[L.send_rows()] * PayloadBytes(hidden);  // one row per choice
  }

  absl::Status RunExperts(const Exchange& x, const GroupedInput& rows, device::Backend& backend,
                          const ExpertsView& experts, GroupedExpertBuffers* buffers) override {
    const DispatchLayout& L = *x.layout;
    down_.resize(L.recv_choices() * x.hidden);
    return RunGroupedExperts(backend, experts, L.layer, rows, L.expert_offsets.data(),
                             L.expert_offsets[experts.num_experts], down_.data(), buffers);
  }

  absl::StatusOr<uint64_t> PrepareReturn(const Exchange& x, ExchangeBytes* bytes) override {
    const DispatchLayout& L = *x.layout;
    const int64_t H = x.hidden;
    const size_t f32_row = PayloadBytes(H);
    const int me = L.me;
    // `b` is free again (the experts are done with its rows), so it may grow.
    RETURN_IF_ERROR(x.b->Reserve(L.recv_choices() * f32_row, x.transport));
    const int64_t self_choice = L.row_choice_offsets[L.recv_offsets[me]];
    const int64_t self_choice_end = L.row_choice_offsets[L.recv_offsets[me + 1]];
    WriteRowsSplitSelf(L.recv_choices(), self_choice, self_choice_end, x.b->data(), f32_row,
                       x.a->data() + L.send_choice_offsets[L.send_offsets[me]] * f32_row,
                       [&](int64_t begin, int64_t end, std::byte* dst) {
                         kc::LaunchGatherRows(
                             {.in = down_.data(), .in_type = RowType::kF32, .in_stride_bytes = H * 4,
                              .index = L.choice_to_grouped.data() + begin, .out = dst,
                              .out_type = RowType::kF32, .out_stride_bytes = H * 4,
                              .rows = end - begin, .hidden = H},
                             x.stream);
                       });
    return ChoiceReturnBytes(L, f32_row, bytes);
  }

  // The local executor's weighted un-permute: each token's top_k
  // contributions added in choice order, wherever the experts ran.
  void Reduce(const Exchange& x, const std::byte* returned, const float* router_weights,
              int64_t tokens, int top_k, float* out) override {
    kc::LaunchUnpermute({.expert_out = reinterpret_cast<const float*>(returned),
                         .slot_to_permuted = x.layout->slot_to_choice.data(),
                         .weights = router_weights, .tokens = tokens, .top_k = top_k,
                         .hidden = x.hidden, .out = out, .accumulate = true},
                        x.stream);
  }

 private:
  std::vector<float> down_;  // expert outputs, one row per choice, grouped by expert
};

}  // namespace

std::unique_ptr<CombineStrategy> MakeCombineStrategy(PayloadType payload) {
  if (payload == PayloadType::kBF16) return std::make_unique<SummedBf16Combine>();
  return std::make_unique<PerChoiceF32Combine>();
}

}  // namespace joule::ep
