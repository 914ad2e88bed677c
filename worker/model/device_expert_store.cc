#include "worker/model/device_expert_store.h"

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace joule {
namespace {

bool SameShape(const MlpView& stored, const MlpWeights& host, device::Backend& backend) {
  return stored.gate.in_features == host.gate.in_features &&
         stored.gate.out_features == host.gate.out_features &&
         stored.down.out_features == host.down.out_features &&
         stored.gate.type == backend.weight_type(host.gate.type);
}

}  // namespace

DeviceExpertStore::DeviceExpertStore(device::Backend& backend, const DeviceWeights* resident,
                                     const ModelWeights* resident_host)
    : backend_(backend), resident_(resident), resident_host_(resident_host) {}

absl::StatusOr<std::unique_ptr<DeviceExperts>> DeviceExpertStore::Place(const ModelWeights& weights) {
  auto out = std::make_unique<DeviceExperts>();
  const size_t num_layers = weights.layers().size();
  out->layers_.assign(num_layers, ExpertsView{});
  std::vector<std::optional<ExpertTable>> tables(num_layers);  // MoE layers'
  absl::MutexLock lock(&mu_);
  absl::erase_if(stored_, [](const auto& kv) { return kv.second.expired(); });
  for (size_t l = 0; l < num_layers; ++l) {
    const LayerWeights& L = weights.layers()[l];
    if (!L.is_moe) continue;
    ExpertTable& table = tables[l].emplace(static_cast<int>(L.experts.size()));
    for (int e = 0; e < table.view.num_experts; ++e) {
      if (!L.experts[e].loaded) continue;
      ASSIGN_OR_RETURN(std::shared_ptr<const StoredExpert> expert,
                       Get(static_cast<int>(l), e, L.experts[e], &out->uploaded_bytes_));
      table.Add(e, expert->mlp);
      out->held_.push_back(std::move(expert));
    }
  }
  RETURN_IF_ERROR(UploadTables(tables, out.get()));
  return out;
}

absl::StatusOr<std::shared_ptr<const StoredExpert>> DeviceExpertStore::Get(int l, int e,
                                                                           const MlpWeights& host,
                                                                           size_t* uploaded) {
  std::weak_ptr<const StoredExpert>& slot = stored_[{l, e}];
  if (std::shared_ptr<const StoredExpert> kept = slot.lock()) {
    if (SameShape(kept->mlp, host, backend_)) return kept;
  }
  std::shared_ptr<const StoredExpert> expert = Resident(l, e);
  if (expert == nullptr || !SameShape(expert->mlp, host, backend_)) {
    auto fresh = std::make_shared<StoredExpert>();
    absl::StatusOr<MlpView> mlp = DeviceWeights::CreateMlp(host, backend_, &fresh->bytes);
    if (!mlp.ok()) return Annotate(mlp.status(), absl::StrCat("layer ", l, " expert ", e));
    fresh->mlp = *mlp;
    *uploaded += fresh->bytes.bytes();
    expert = std::move(fresh);
  }
  slot = expert;
  return expert;
}

std::shared_ptr<const StoredExpert> DeviceExpertStore::Resident(int l, int e) const {
  if (resident_ == nullptr || resident_host_ == nullptr ||
      l >= static_cast<int>(resident_host_->layers().size())) {
    return nullptr;
  }
  const LayerWeights& L = resident_host_->layers()[l];
  if (!L.is_moe || e >= static_cast<int>(L.experts.size()) || !L.experts[e].loaded) return nullptr;
  const std::vector<const void*>& table = resident_->expert_table(l);
  const ExpertsView& view = resident_->layers()[l].experts;
  const int E = view.num_experts;
  auto expert = std::make_shared<StoredExpert>();
  LinearView* parts[] = {&expert->mlp.gate, &expert->mlp.up, &expert->mlp.down};
  const Linear* host[] = {&L.experts[e].gate, &L.experts[e].up, &L.experts[e].down};
  for (int i = 0; i < 3; ++i) {
    *parts[i] = {.w = table[i * E + e], .type = view.type, .out_features = host[i]->out_features,
                 .in_features = host[i]->in_features, .blocks = view.blocks};
    if (view.type == kernels::DType::kF8E4M3) {
      parts[i]->scale_inv = static_cast<const float*>(table[(3 + i) * E + e]);
    }
  }
  return expert;
}

absl::Status DeviceExpertStore::UploadTables(const std::vector<std::optional<ExpertTable>>& tables,
                                             DeviceExperts* out) {
  size_t entries = 0;
  for (const auto& t : tables) entries += t ? t->pointers.size() : 0;
  if (entries == 0) return absl::OkStatus();
  ASSIGN_OR_RETURN(out->tables_, backend_.Allocate(device::MemoryKind::kDevice,
                                                   entries * sizeof(const void*)));
  auto* next = out->tables_.as<const void*>();
  for (size_t l = 0; l < tables.size(); ++l) {
    if (!tables[l]) continue;
    const std::vector<const void*>& pointers = tables[l]->pointers;
    RETURN_IF_ERROR(backend_.CopyAsync(next, pointers.data(), pointers.size() * sizeof(void*)));
    out->layers_[l] = tables[l]->At(next);
    next += pointers.size();
  }
  return backend_.Synchronize();  // the host tables go when this returns
}

int DeviceExpertStore::stored() const {
  absl::MutexLock lock(&mu_);
  int alive = 0;
  for (const auto& [key, expert] : stored_) alive += expert.expired() ? 0 : 1;
  return alive;
}

}  // namespace joule
