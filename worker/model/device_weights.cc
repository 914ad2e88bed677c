#include "worker/model/device_weights.h"

#include <cstring>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/dtype.h"
#include "common/status.h"

namespace joule {

kernels::GemmParams LinearGemm(const LinearView& w, const float* x, int64_t m, float* y,
                               void* workspace) {
  return {.x = x, .m = m, .k = w.in_features, .w = w.w, .w_type = w.type, .n = w.out_features,
          .bias = w.bias, .y = y, .workspace = workspace, .w_scale_inv = w.scale_inv,
          .w_blocks = w.blocks};
}

// Walks the weights once per mode, in the same order every time: kView hands
// out host pointers; kPlan only reserves each tensor's slice of the arena;
// kUpload copies (converting to the device's type) into those slices.
class DeviceWeights::Placer {
 public:
  enum class Mode { kView, kPlan, kUpload };
  Placer(Mode mode, device::Backend& backend, std::byte* arena)
      : mode_(mode), backend_(backend), arena_(arena) {}

  LinearView Linear(const joule::Linear& l) {
    LinearView v{.w = Matrix(l), .type = backend_.weight_type(l.type),
                 .out_features = l.out_features, .in_features = l.in_features};
    if (!l.bias.empty()) v.bias = Vector(l.bias);
    if (v.type == kernels::DType::kF8E4M3) {  // the codes' block scales go along
      v.scale_inv = Scales(l);
      v.blocks = l.blocks;
    }
    return v;
  }

  MlpView Mlp(const MlpWeights& m) { return MlpView{Linear(m.gate), Linear(m.up), Linear(m.down)}; }

  const float* Vector(const std::vector<float>& values) {
    if (values.empty()) return nullptr;
    return static_cast<const float*>(Place(values.data(), values.size() * sizeof(float)));
  }

  // The device's pointer table: [gate x E, up x E, down x E], then for FP8
  // the scales of each in the same order (ViewExperts' layout).
  ExpertsView Experts(const LayerWeights& L, std::vector<const void*>* table) {
    if (mode_ == Mode::kView) return ViewExperts(L, table);
    ExpertTable experts(static_cast<int>(L.experts.size()));
    for (int e = 0; e < experts.view.num_experts; ++e) {
      if (L.experts[e].loaded) experts.Add(e, Mlp(L.experts[e]));
    }
    *table = experts.pointers;  // kept: the host copy of the device table (expert_table)
    return experts.At(
        static_cast<const void* const*>(Place(table->data(), table->size() * sizeof(void*))));
  }

  size_t bytes() const { return layout_.bytes(); }
  const absl::Status& status() const { return status_; }

 private:
  // Device bytes of a matrix; each distinct host matrix is placed once (tied
  // embeddings share one copy).
  const void* Matrix(const joule::Linear& l) {
    if (mode_ == Mode::kView) return l.w;
    auto it = placed_.find(l.w);
    if (it != placed_.end()) return it->second;
    const kernels::DType to = backend_.weight_type(l.type);
    if (l.type == kernels::DType::kF8E4M3 && to != l.type && status_.ok()) {
      // Only F32 is converted below; FP8 codes are never widened here.
      status_ = absl::UnimplementedError(absl::StrCat(
          "block-scaled FP8 weights on ", backend_.spec().ToString(), " would be kept as ",
          kernels::DTypeName(to), ", a conversion the upload does not make"));
    }
    const size_t n = static_cast<size_t>(l.out_features * l.in_features);
    const size_t offset = layout_.Reserve(n * kernels::ElementBytes(to));
    void* dst = mode_ == Mode::kUpload ? arena_ + offset : nullptr;
    if (dst != nullptr && status_.ok()) {
      if (to == l.type) {  // as stored: BF16, or FP8 codes byte for byte
        Copy(dst, l.w, n * kernels::ElementBytes(to));
      } else {  // F32 (or widened F16) -> BF16, rounded to nearest even
        staging_.resize(n);
        const auto* src = static_cast<const float*>(l.w);
        for (size_t i = 0; i < n; ++i) staging_[i] = F32ToBf16(src[i]);
        Copy(dst, staging_.data(), n * sizeof(uint16_t));
        Sync();  // staging_ is reused by the next conversion
      }
    }
    placed_[l.w] = dst;
    return dst;
  }

  // An FP8 matrix's F32 scale grid, [ceil(out / rows), ceil(in / cols)],
  // copied as is (placed once per grid, like the matrices).
  const float* Scales(const joule::Linear& l) {
    if (mode_ == Mode::kView || l.scale_inv == nullptr) return l.scale_inv;
    auto it = placed_.find(l.scale_inv);
    if (it != placed_.end()) return static_cast<const float*>(it->second);
    const int64_t grid = ((l.out_features + l.blocks.rows - 1) / l.blocks.rows) *
                         ((l.in_features + l.blocks.cols - 1) / l.blocks.cols);
    const auto* placed = static_cast<const float*>(
        Place(l.scale_inv, static_cast<size_t>(grid) * sizeof(float), /*sync=*/false));
    placed_[l.scale_inv] = placed;
    return placed;
  }

  const void* Place(const void* src, size_t bytes, bool sync = true) {
    if (mode_ == Mode::kView) return src;
    const size_t offset = layout_.Reserve(bytes);
    if (mode_ == Mode::kPlan) return nullptr;
    Copy(arena_ + offset, src, bytes);
    if (sync) Sync();  // the source may be a temporary (expert tables)
    return arena_ + offset;
  }

  void Copy(void* dst, const void* src, size_t bytes) {
    if (status_.ok()) status_ = backend_.CopyAsync(dst, src, bytes);
  }
  void Sync() {
    if (status_.ok()) status_ = backend_.Synchronize();
  }

  const Mode mode_;
  device::Backend& backend_;
  std::byte* const arena_;
  device::WorkspaceLayout layout_;
  absl::flat_hash_map<const void*, const void*> placed_;
  std::vector<uint16_t> staging_;
  absl::Status status_;
};

ExpertTable::ExpertTable(int num_experts)
    : pointers(3 * static_cast<size_t>(num_experts), nullptr), view{.num_experts = num_experts} {}

void ExpertTable::Add(int e, const MlpView& m) {
  const int E = view.num_experts;
  const bool fp8 = m.gate.type == kernels::DType::kF8E4M3;
  if (fp8) pointers.resize(6 * static_cast<size_t>(E), nullptr);
  pointers[e] = m.gate.w;
  pointers[E + e] = m.up.w;
  pointers[2 * E + e] = m.down.w;
  if (fp8) {
    pointers[3 * E + e] = m.gate.scale_inv;
    pointers[4 * E + e] = m.up.scale_inv;
    pointers[5 * E + e] = m.down.scale_inv;
    view.blocks = m.gate.blocks;
  }
  view.type = m.gate.type;
  view.hidden = m.gate.in_features;
  view.intermediate = m.gate.out_features;
  ++view.held;
}

ExpertsView ExpertTable::At(const void* const* table) const {
  ExpertsView v = view;
  const int E = v.num_experts;
  v.gate = table;
  v.up = table + E;
  v.down = table + 2 * E;
  if (pointers.size() == 6 * static_cast<size_t>(E)) {
    v.gate_scale_inv = table + 3 * E;
    v.up_scale_inv = table + 4 * E;
    v.down_scale_inv = table + 5 * E;
  }
  return v;
}

ExpertsView ViewExperts(const LayerWeights& L, std::vector<const void*>* table) {
  const int E = static_cast<int>(L.experts.size());
  table->assign(6 * static_cast<size_t>(E), nullptr);
  const void* const* t = table->data();
  ExpertsView v{.gate = t, .up = t + E, .down = t + 2 * E, .gate_scale_inv = t + 3 * E,
                .up_scale_inv = t + 4 * E, .down_scale_inv = t + 5 * E, .num_experts = E};
  for (int e = 0; e < E; ++e) {
    const MlpWeights& m = L.experts[e];
    if (!m.loaded) continue;
    (*table)[e] = m.gate.w;
    (*table)[E + e] = m.up.w;
    (*table)[2 * E + e] = m.down.w;
    (*table)[3 * E + e] = m.gate.scale_inv;
    (*table)[4 * E + e] = m.up.scale_inv;
    (*table)[5 * E + e] = m.down.scale_inv;
    v.type = m.gate.type;
    v.blocks = m.gate.blocks;
    v.hidden = m.gate.in_features;
    v.intermediate = m.gate.out_features;
    ++v.held;
  }
  return v;
}

absl::StatusOr<std::unique_ptr<DeviceWeights>> DeviceWeights::Create(const ModelWeights& weights,
                                                                     device::Backend& backend) {
  auto dw = std::unique_ptr<DeviceWeights>(new DeviceWeights());
  auto traverse = [&](Placer& placer) {
    dw->embed_ = placer.Linear(weights.embed_tokens());
    dw->lm_head_ = placer.Linear(weights.lm_head());
    dw->final_norm_ = placer.Vector(weights.final_norm());
    dw->tables_.assign(weights.layers().size(), {});
    dw->layers_.assign(weights.layers().size(), LayerView{});
    for (size_t i = 0; i < weights.layers().size(); ++i) {
      const LayerWeights& L = weights.layers()[i];
      LayerView& v = dw->layers_[i];
      v.input_norm = placer.Vector(L.input_norm);
      v.post_attention_norm = placer.Vector(L.post_attention_norm);
      v.q_norm = placer.Vector(L.q_norm);
      v.k_norm = placer.Vector(L.k_norm);
      v.q_proj = placer.Linear(L.q_proj);
      v.k_proj = placer.Linear(L.k_proj);
      v.v_proj = placer.Linear(L.v_proj);
      v.o_proj = placer.Linear(L.o_proj);
      // MLA's matrices, where the layer has them (an absent one places nothing).
      for (auto [from, to] : {std::pair{&L.q_a_proj, &v.q_a_proj}, std::pair{&L.q_b_proj, &v.q_b_proj},
                              std::pair{&L.kv_a_proj, &v.kv_a_proj}, std::pair{&L.kv_b_proj, &v.kv_b_proj}}) {
        if (from->w != nullptr) *to = placer.Linear(*from);
      }
      v.q_a_norm = placer.Vector(L.q_a_norm);
      v.kv_a_norm = placer.Vector(L.kv_a_norm);
      v.is_moe = L.is_moe;
      if (!L.is_moe) {
        v.dense = placer.Mlp(L.dense);
        continue;
      }
      v.router = placer.Linear(L.router);
      v.router_bias = placer.Vector(L.router_bias);
      v.experts = placer.Experts(L, &dw->tables_[i]);
      v.has_shared_expert = L.shared_expert.loaded;
      if (v.has_shared_expert) {
        v.shared_expert = placer.Mlp(L.shared_expert);
        if (L.shared_expert_gate.w != nullptr) v.shared_expert_gate = placer.Linear(L.shared_expert_gate);
      }
    }
  };
  if (backend.device_memory_is_host()) {
    Placer placer(Placer::Mode::kView, backend, nullptr);
    traverse(placer);
    return dw;
  }
  RETURN_IF_ERROR(PlaceInArena(backend, &dw->arena_, traverse));
  return dw;
}

absl::StatusOr<MlpView> DeviceWeights::CreateMlp(const MlpWeights& mlp, device::Backend& backend,
                                                 device::Buffer* buffer) {
  MlpView view;
  if (backend.device_memory_is_host()) {
    Placer placer(Placer::Mode::kView, backend, nullptr);
    return placer.Mlp(mlp);
  }
  RETURN_IF_ERROR(PlaceInArena(backend, buffer, [&](Placer& placer) { view = placer.Mlp(mlp); }));
  RETURN_IF_ERROR(backend.Synchronize());  // BF16 matrices are copied asynchronously
  return view;
}

absl::Status DeviceWeights::PlaceInArena(device::Backend& backend, device::Buffer* arena,
                                         absl::FunctionRef<void(Placer&)> walk) {
  Placer plan(Placer::Mode::kPlan, backend, nullptr);
  walk(plan);
  RETURN_IF_ERROR(plan.status());
  absl::StatusOr<device::Buffer> allocated = backend.Allocate(device::MemoryKind::kDevice, plan.bytes());
  if (!allocated.ok()) {
    return Annotate(allocated.status(),
                    absl::StrFormat("uploading %.2f GiB of weights to %s", plan.bytes() / double(1 << 30),
                                    backend.spec().ToString()));
  }
  *arena = *std::move(allocated);
  Placer upload(Placer::Mode::kUpload, backend, arena->as<std::byte>());
  walk(upload);
  return upload.status();
}

}  // namespace joule
