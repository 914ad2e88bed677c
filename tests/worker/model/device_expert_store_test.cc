// DeviceExpertStore on the fake device (memory the CPU reaches only through
// the backend, as a GPU's): a placement reuses the copies the last one
// uploaded, uploads only what is new, frees what nobody uses, and takes the
// resident model's experts in place; the tables it builds point at the same
// bytes a whole-model upload holds.
#include "worker/model/device_expert_store.h"

#include <cstring>
#include <functional>

#include "gtest/gtest.h"
#include "tests/testing/paths.h"
#include "worker/device/fake_device_backend.h"

namespace joule {
namespace {

class DeviceExpertStoreTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    auto config = LoadModelConfig(Dir());
    ASSERT_TRUE(config.ok()) << config.status();
    experts_ = config->num_experts;
  }

  std::string Dir() const { return testing::TinyModelDir(GetParam()); }

  // The model with only the experts `holds` picks.
  std::unique_ptr<ModelWeights> Load(std::function<bool(int expert)> holds) {
    WeightLoadOptions options{.owns_expert = [holds](int, int expert) { return holds(expert); }};
    auto weights = ModelWeights::Load(Dir(), options);
    EXPECT_TRUE(weights.ok()) << weights.status();
    return weights.ok() ? *std::move(weights) : nullptr;
  }

  // A layer's device table, read back: [gate x E, up x E, down x E, scales...].
  std::vector<const void*> Table(const ExpertsView& v) {
    const int parts = v.gate_scale_inv != nullptr ? 6 : 3;
    std::vector<const void*> table(parts * static_cast<size_t>(v.num_experts));
    EXPECT_TRUE(backend_.CopyAsync(table.data(), v.gate, table.size() * sizeof(void*)).ok());
    EXPECT_TRUE(backend_.Synchronize().ok());
    return table;
  }

  // The bytes at a device pointer.
  std::vector<std::byte> Bytes(const void* device, size_t n) {
    std::vector<std::byte> host(n);
    EXPECT_TRUE(backend_.CopyAsync(host.data(), device, n).ok());
    EXPECT_TRUE(backend_.Synchronize().ok());
    return host;
  }

  int MoeLayers(const ModelWeights& w) const {
    int n = 0;
    for (const LayerWeights& L : w.layers()) n += L.is_moe ? 1 : 0;
    return n;
  }

  device::FakeDeviceBackend backend_{1, /*asynchronous=*/true};
  int experts_ = 0;
};

TEST_P(DeviceExpertStoreTest, APlacementUploadsOnlyWhatTheLastOneDidNotHold) {
  const int half = experts_ / 2;
  auto first = Load([&](int e) { return e < half; });
  auto second = Load([&](int e) { return e <= half; });  // one more expert per layer
  DeviceExpertStore store(backend_, nullptr, nullptr);
  auto a = store.Place(*first);
  ASSERT_TRUE(a.ok()) << a.status();
  const int moe = MoeLayers(*first);
  EXPECT_GT((*a)->uploaded_bytes(), 0u);
  EXPECT_EQ(store.stored(), half * moe);

  auto b = store.Place(*second);
  ASSERT_TRUE(b.ok()) << b.status();
  // Every expert has one size: one new expert per layer out of `half`.
  EXPECT_EQ((*b)->uploaded_bytes() * half, (*a)->uploaded_bytes());
  EXPECT_EQ(store.stored(), (half + 1) * moe);
  for (size_t l = 0; l < first->layers().size(); ++l) {
    if (!first->layers()[l].is_moe) continue;
    const ExpertsView& va = (*a)->layers()[l];
    const ExpertsView& vb = (*b)->layers()[l];
    EXPECT_EQ(va.held, half);
    EXPECT_EQ(vb.held, half + 1);
    const std::vector<const void*> ta = Table(va), tb = Table(vb);
    for (int e = 0; e < experts_; ++e) {
      for (int part = 0; part < static_cast<int>(tb.size()) / experts_; ++part) {
        const size_t i = part * static_cast<size_t>(experts_) + e;
        if (e < half) {
          EXPECT_EQ(tb[i], ta[i]) << "layer " << l << " expert " << e << ": the same copy";
        } else if (e == half) {
          EXPECT_NE(tb[i], nullptr);
        } else {
          EXPECT_EQ(tb[i], nullptr) << "not held";
        }
      }
    }
  }
  a->reset();  // the old executor goes: the copies only the new one uses stay
  EXPECT_EQ(store.stored(), (half + 1) * moe);
  auto first_again = store.Place(*first);
  ASSERT_TRUE(first_again.ok());
  EXPECT_EQ((*first_again)->uploaded_bytes(), 0u);
  b->reset();
  first_again->reset();
  EXPECT_EQ(store.stored(), 0) << "nobody uses them: freed";
  auto again = store.Place(*first);
  ASSERT_TRUE(again.ok());
  EXPECT_GT((*again)->uploaded_bytes(), 0u) << "uploaded afresh";
}

// The resident model's experts are used in place, and an uploaded expert's
// bytes are the ones the whole-model upload holds (same conversion).
TEST_P(DeviceExpertStoreTest, ResidentExpertsAreUsedInPlaceAndUploadsMatchThem) {
  const int half = experts_ / 2;
  auto all = ModelWeights::Load(Dir());
  ASSERT_TRUE(all.ok());
  auto resident = DeviceWeights::Create(**all, backend_);
  ASSERT_TRUE(resident.ok()) << resident.status();
  auto mine = Load([&](int e) { return e < half; });
  DeviceExpertStore with_resident(backend_, resident->get(), all->get());
  DeviceExpertStore without(backend_, nullptr, nullptr);
  auto in_place = with_resident.Place(*mine);
  auto uploaded = without.Place(*mine);
  ASSERT_TRUE(in_place.ok() && uploaded.ok());
  EXPECT_EQ((*in_place)->uploaded_bytes(), 0u);
  for (size_t l = 0; l < mine->layers().size(); ++l) {
    if (!mine->layers()[l].is_moe) continue;
    const ExpertsView& r = (*resident)->layers()[l].experts;
    const ExpertsView& p = (*in_place)->layers()[l];
    const ExpertsView& u = (*uploaded)->layers()[l];
    EXPECT_EQ(p.type, r.type);
    EXPECT_EQ(u.type, r.type);
    EXPECT_EQ(r.gate_scale_inv != nullptr, GetParam().find("fp8") != std::string::npos);
    EXPECT_EQ(p.gate_scale_inv != nullptr, r.gate_scale_inv != nullptr) << "FP8 scales travel";
    EXPECT_EQ(u.gate_scale_inv != nullptr, r.gate_scale_inv != nullptr);
    const std::vector<const void*> tr = Table(r), tp = Table(p), tu = Table(u);
    ASSERT_EQ(tp.size(), tr.size());
    ASSERT_EQ(tu.size(), tr.size());
    // Every matrix has I x H elements; every FP8 scale grid as many blocks.
    const size_t matrix = static_cast<size_t>(r.intermediate * r.hidden) * kernels::ElementBytes(r.type);
    const size_t grid = sizeof(float) * ((r.intermediate + r.blocks.rows - 1) / r.blocks.rows) *
                        ((r.hidden + r.blocks.cols - 1) / r.blocks.cols);
    for (int e = 0; e < half; ++e) {
      for (size_t part = 0; part < tr.size() / experts_; ++part) {
        const size_t i = part * experts_ + e;
        EXPECT_EQ(tp[i], tr[i]) << "layer " << l << " expert " << e << " part " << part;
        const size_t n = part < 3 ? matrix : grid;
        EXPECT_EQ(Bytes(tu[i], n), Bytes(tr[i], n)) << "layer " << l << " expert " << e << " part " << part;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(TinyModels, DeviceExpertStoreTest,
                         ::testing::Values("qwen3_moe-tiny", "deepseek_v3_fp8-tiny"));

}  // namespace
}  // namespace joule
