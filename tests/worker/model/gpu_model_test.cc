// The forward pass on a GPU (--device cuda:0) through the same paths as the
// CPU golden tests: batched prefill, chunked paged prefill, token by token,
// and the engine loop; CUDA-graph replay against eager launches; and the bad
// input a GPU worker must refuse clearly. Skips without a GPU (fails instead
// under JOULE_REQUIRE_GPU=1, as tests/gpu/run.sh sets it).
//
// Tolerance. The GPU rounds every GEMM input (F32 activations) and the KV
// cache to BF16, so it is compared with the reference run with the same
// roundings (tests/data/golden/<model>.bf16act.json; reference.py
// --bf16-activations). What remains is the order of F32 sums (tensor-core
// GEMMs, split attention), and through the BF16 roundings that is not tiny:
// the reference itself moved by up to 5e-3 on these models between F32 and
// F64 sums (a value at a BF16 tie rounds the other way and the difference
// propagates). |gpu - reference| <= 2e-2 * max(1, max |logit| at the
// position) leaves 4x headroom over that, while a wrong norm, rope, routing
// or layout moves logits by more than 1e-1. DeepSeek-V3 (MLA, absorbed as the
// GPU runs it) moved by up to 1.2e-2 with F64 sums, where the bound is 3.5e-2
// (max |logit| 1.75 at that position).
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <tuple>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/cuda/cuda_check.h"
#include "tests/kernels/cuda/cuda_test_util.h"
#include "tests/testing/paths.h"
#include "tests/worker/model/golden_harness.h"
#include "worker/device/backend.h"
#include "worker/engine/engine.h"
#include "worker/model/device_weights.h"
#include "worker/model/model.h"
#include "worker/model/weights.h"

namespace joule {
namespace {

using ::testing::HasSubstr;
using testing::ExpectGreedyMatches;
using testing::ExpectLogitsNear;
using testing::LoadFixture;
using testing::Prompt;
using testing::RunGreedy;
using testing::RunPrompts;

constexpr float kGpuTolerance = 2e-2f;
const testing::LogitTolerance kTolerance = [](float, float max_abs) {
  return kGpuTolerance * std::max(1.0f, max_abs);
};
// A greedy step may differ from the reference only where the reference's top
// two logits are closer than the GPU's error can be.
constexpr float kTieMargin = 2 * kGpuTolerance * 4;  // logits here are below 4

const device::DeviceSpec kGpu{.kind = device::DeviceKind::kCuda, .index = 0};

std::unique_ptr<Model> LoadOnGpu(const std::string& name, bool cuda_graphs) {
  auto m = Model::Load(testing::TinyModelDir(name),
                       {.num_threads = 1, .device = kGpu, .cuda_graphs = cuda_graphs});
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? *std::move(m) : nullptr;
}

class GpuGoldenTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    JOULE_SKIP_WITHOUT_CUDA_DEVICE();
    prompts_ = LoadFixture(GetParam() + ".bf16act");
    ASSERT_FALSE(prompts_.empty());
    model_ = LoadOnGpu(GetParam(), /*cuda_graphs=*/true);
    ASSERT_NE(model_, nullptr);
    ASSERT_TRUE(model_->backend().spec().is_cuda());
    std::printf("device: %s\n", model_->backend().Describe().c_str());
  }
  std::vector<Prompt> prompts_;
  std::unique_ptr<Model> model_;
};

TEST_P(GpuGoldenTest, BatchedPrefillLogitsMatchReference) {
  ExpectLogitsNear(prompts_, RunPrompts(*model_, prompts_, 16, 1 << 20, 1), "gpu_batched_prefill",
                   kTolerance);
}

TEST_P(GpuGoldenTest, ChunkedPagedPrefillLogitsMatchReference) {
  ExpectLogitsNear(prompts_, RunPrompts(*model_, prompts_, 4, 5, 7), "gpu_chunked_paged", kTolerance);
}

TEST_P(GpuGoldenTest, TokenByTokenLogitsMatchReference) {
  ExpectLogitsNear(prompts_, RunPrompts(*model_, prompts_, 1, 1, 3), "gpu_token_by_token", kTolerance);
}

TEST_P(GpuGoldenTest, GreedyContinuationMatchesReference) {
  // The engine captures decode graphs at creation, so its decode steps replay them.
  const auto got = RunGreedy(*model_, prompts_,
                             {.block_size = 4, .max_batch_tokens = 16, .max_running = 8});
  ExpectGreedyMatches(prompts_, got, kTieMargin);
  EXPECT_GT(model_->graph_replays(), 0) << "no decode step replayed a graph";
}

// Prompt logprobs (prompt rows' logits copied back among device-sampled
// ones) and the first token's: a log-softmax moves by at most twice its
// logits' error.
TEST_P(GpuGoldenTest, LogprobsMatchReference) {
  const auto got = testing::RunLogprobs(*model_, prompts_,
                                        {.block_size = 4, .max_batch_tokens = 24, .max_running = 8,
                                         .prompt_logprob_rows = 16},
                                        5);
  testing::ExpectLogprobsNear(prompts_, got, 2 * kGpuTolerance * 4);
}

INSTANTIATE_TEST_SUITE_P(Families, GpuGoldenTest,
                         ::testing::Values("qwen3_moe-tiny", "qwen2_moe-tiny", "mixtral-tiny",
                                           "deepseek_v3-tiny"),
                         [](const auto& info) {
                           std::string n = info.param;
                           std::replace(n.begin(), n.end(), '-', '_');
                           return n;
                         });

// DeepSeek-V3 with block-scaled FP8 weights (deepseek_v3_fp8-tiny): the GPU
// keeps the E4M3 codes and their F32 scale grids (one byte per weight) and
// runs the FP8 GEMMs (kernels/cuda/gemm.cu, grouped_gemm.cu; MLA's absorbed
// matrices are F32 for FP8 checkpoints and take the SIMT GEMM too), every
// GEMM input rounded to BF16 as elsewhere on the GPU.
//
// There is no bf16act fixture for FP8 yet (reference.py refuses
// --bf16-activations for FP8 checkpoints), so this compares with the F32
// reference (tests/data/golden/deepseek_v3_fp8-tiny.json) at the GPU
// tolerance kTolerance. That is enough here: the reference with the GPU's
// roundings (reference.py --bf16-activations with the refusal lifted) is
// within 0.55 x kTolerance of the F32 one at every position of these
// prompts, with the same expert choices (no routing flip: the smallest
// router gap is 3.3e-4 there, 1.6e-3 in F32), and its greedy continuations
// leave the F32 ones only at near ties (margins 4.5e-3 and 7.4e-2, below
// kTieMargin). Were a routing decision to flip, logits would move by up to
// 18 x kTolerance (seen between the BF16 twin's two fixtures): then this needs
// the bf16act fixture.
class GpuFp8GoldenTest : public ::testing::Test {
 protected:
  void SetUp() override {
    JOULE_SKIP_WITHOUT_CUDA_DEVICE();
    prompts_ = LoadFixture("deepseek_v3_fp8-tiny");
    ASSERT_FALSE(prompts_.empty());
    model_ = LoadOnGpu("deepseek_v3_fp8-tiny", /*cuda_graphs=*/true);
    ASSERT_NE(model_, nullptr);
    ASSERT_TRUE(model_->backend().spec().is_cuda());
  }
  std::vector<Prompt> prompts_;
  std::unique_ptr<Model> model_;
};

TEST_F(GpuFp8GoldenTest, BatchedPrefillLogitsMatchReference) {
  ExpectLogitsNear(prompts_, RunPrompts(*model_, prompts_, 16, 1 << 20, 1), "gpu_fp8_batched_prefill",
                   kTolerance);
}

TEST_F(GpuFp8GoldenTest, ChunkedPagedPrefillLogitsMatchReference) {
  ExpectLogitsNear(prompts_, RunPrompts(*model_, prompts_, 4, 5, 7), "gpu_fp8_chunked_paged",
                   kTolerance);
}

TEST_F(GpuFp8GoldenTest, TokenByTokenLogitsMatchReference) {
  ExpectLogitsNear(prompts_, RunPrompts(*model_, prompts_, 1, 1, 3), "gpu_fp8_token_by_token",
                   kTolerance);
}

TEST_F(GpuFp8GoldenTest, GreedyContinuationMatchesReference) {
  const auto got = RunGreedy(*model_, prompts_,
                             {.block_size = 4, .max_batch_tokens = 16, .max_running = 8});
  ExpectGreedyMatches(prompts_, got, kTieMargin);
  EXPECT_GT(model_->graph_replays(), 0) << "no decode step replayed a graph";
}

// `bytes` of device memory at `device`, copied back.
template <typename T>
std::vector<T> Download(device::Backend& backend, const void* device, size_t count) {
  std::vector<T> host(count);
  EXPECT_TRUE(backend.CopyAsync(host.data(), device, count * sizeof(T)).ok());
  EXPECT_TRUE(backend.Synchronize().ok());
  return host;
}

// An FP8 matrix on the GPU: the checkpoint's codes byte for byte, and its scale grid.
void ExpectFp8OnDevice(device::Backend& backend, const Linear& host, const void* w,
                       const void* scale_inv, const std::string& what) {
  SCOPED_TRACE(what);
  ASSERT_EQ(host.type, kernels::DType::kF8E4M3);
  ASSERT_NE(w, nullptr);
  ASSERT_NE(scale_inv, nullptr);
  const size_t n = static_cast<size_t>(host.out_features * host.in_features);
  const std::vector<uint8_t> codes = Download<uint8_t>(backend, w, n);
  EXPECT_EQ(std::memcmp(codes.data(), host.w, n), 0);
  const size_t grid = static_cast<size_t>(
      ((host.out_features + host.blocks.rows - 1) / host.blocks.rows) *
      ((host.in_features + host.blocks.cols - 1) / host.blocks.cols));
  const std::vector<float> scales = Download<float>(backend, scale_inv, grid);
  EXPECT_EQ(std::memcmp(scales.data(), host.scale_inv, grid * sizeof(float)), 0);
}

// FP8 matrices of the model, with their element counts (what one byte per weight means).
int64_t Fp8Weights(const ModelWeights& w) {
  int64_t total = 0;
  auto add = [&](const Linear& l) {
    if (l.type == kernels::DType::kF8E4M3) total += l.out_features * l.in_features;
  };
  for (const LayerWeights& L : w.layers()) {
    for (const Linear* l : {&L.q_proj, &L.k_proj, &L.v_proj, &L.o_proj, &L.q_a_proj, &L.q_b_proj,
                            &L.kv_a_proj, &L.kv_b_proj}) {
      add(*l);
    }
    for (const MlpWeights* m : {&L.dense, &L.shared_expert}) {
      if (m->loaded) {
        add(m->gate);
        add(m->up);
        add(m->down);
      }
    }
    for (const MlpWeights& e : L.experts) {
      if (!e.loaded) continue;
      add(e.gate);
      add(e.up);
      add(e.down);
    }
  }
  return total;
}

// DeviceWeights on a CUDA backend keeps FP8 as FP8: the view says f8_e4m3,
// the device holds the checkpoint's codes and scales, and the arena is
// smaller than the BF16 twin's by more than half a byte per FP8 weight
// (widened to BF16 it would be larger; the scale grids and the longer expert
// pointer tables cost a few KiB).
TEST(GpuFp8WeightsTest, DeviceWeightsKeepFp8CodesAndScales) {
  JOULE_SKIP_WITHOUT_CUDA_DEVICE();
  auto backend = device::CreateBackend(kGpu);
  ASSERT_TRUE(backend.ok()) << backend.status();
  device::Backend& gpu = **backend;
  EXPECT_EQ(gpu.weight_type(kernels::DType::kF8E4M3), kernels::DType::kF8E4M3);
  EXPECT_EQ(gpu.weight_type(kernels::DType::kF32), kernels::DType::kBF16);
  auto fp8 = ModelWeights::Load(testing::TinyModelDir("deepseek_v3_fp8-tiny"));
  auto bf16 = ModelWeights::Load(testing::TinyModelDir("deepseek_v3-tiny"));
  ASSERT_TRUE(fp8.ok()) << fp8.status();
  ASSERT_TRUE(bf16.ok()) << bf16.status();
  auto placed = DeviceWeights::Create(**fp8, gpu);
  ASSERT_TRUE(placed.ok()) << placed.status();
  auto placed_bf16 = DeviceWeights::Create(**bf16, gpu);
  ASSERT_TRUE(placed_bf16.ok()) << placed_bf16.status();

  const ModelWeights& w = **fp8;
  for (size_t l = 0; l < w.layers().size(); ++l) {
    const LayerWeights& L = w.layers()[l];
    const LayerView& v = (*placed)->layers()[l];
    const std::string layer = "layer " + std::to_string(l) + " ";
    for (auto [host, view, name] : {std::tuple{&L.o_proj, &v.o_proj, "o_proj"},
                                    std::tuple{&L.q_a_proj, &v.q_a_proj, "q_a_proj"},
                                    std::tuple{&L.q_b_proj, &v.q_b_proj, "q_b_proj"},
                                    std::tuple{&L.kv_a_proj, &v.kv_a_proj, "kv_a_proj"}}) {
      EXPECT_EQ(view->type, kernels::DType::kF8E4M3) << layer << name;
      EXPECT_EQ(view->blocks.rows, host->blocks.rows);
      EXPECT_EQ(view->blocks.cols, host->blocks.cols);
      ExpectFp8OnDevice(gpu, *host, view->w, view->scale_inv, layer + name);
    }
    const MlpWeights& mlp = L.is_moe ? L.shared_expert : L.dense;
    const MlpView& mlp_view = L.is_moe ? v.shared_expert : v.dense;
    ExpectFp8OnDevice(gpu, mlp.gate, mlp_view.gate.w, mlp_view.gate.scale_inv, layer + "mlp gate");
    ExpectFp8OnDevice(gpu, mlp.down, mlp_view.down.w, mlp_view.down.scale_inv, layer + "mlp down");
    if (!L.is_moe) continue;
    const ExpertsView& ex = v.experts;
    ASSERT_EQ(ex.type, kernels::DType::kF8E4M3);
    ASSERT_NE(ex.down_scale_inv, nullptr);
    // The pointer tables live on the device too.
    const int E = ex.num_experts;
    const auto codes = Download<const void*>(gpu, ex.down, E);
    const auto scales = Download<const void*>(gpu, ex.down_scale_inv, E);
    for (int e = 0; e < E; ++e) {
      ExpectFp8OnDevice(gpu, L.experts[e].down, codes[e], scales[e],
                        layer + "expert " + std::to_string(e) + " down");
    }
  }
  const int64_t fp8_weights = Fp8Weights(w);
  ASSERT_GT(fp8_weights, 0);
  EXPECT_LT((*placed)->uploaded_bytes() + static_cast<size_t>(fp8_weights / 2),
            (*placed_bf16)->uploaded_bytes())
      << "FP8 weights: " << fp8_weights;
}

// The logits each engine step sampled from, by request and step.
struct StepLogits {
  std::map<std::pair<uint64_t, int>, std::vector<float>> rows;
  std::map<uint64_t, int> steps;
};

StepLogits RunEngine(Model& model, const std::vector<Prompt>& prompts) {
  StepLogits seen;
  auto engine = Engine::Create(&model, {.block_size = 4, .max_running = 8});
  EXPECT_TRUE(engine.ok()) << engine.status();
  if (!engine.ok()) return seen;
  (*engine)->set_logits_observer([&](uint64_t id, const float* logits, int64_t vocab) {
    seen.rows[{id, seen.steps[id]++}] = std::vector<float>(logits, logits + vocab);
  });
  for (size_t s = 0; s < prompts.size(); ++s) {
    SamplingParams sp;
    sp.temperature = 0.0f;
    sp.max_tokens = 12;
    sp.ignore_eos = true;
    EXPECT_TRUE((*engine)->Add({.id = s, .prompt = prompts[s].ids, .sampling = sp}).ok());
  }
  for (int steps = 0; (*engine)->HasWork() && steps < 1000; ++steps) {
    auto r = (*engine)->Step();
    EXPECT_TRUE(r.ok()) << r.status();
    if (!r.ok()) break;
  }
  return seen;
}

// A replayed graph runs the launches an eager step runs, on a batch padded to
// its bucket: the same logits up to the order of F32 sums (cuBLASLt may pick
// another algorithm for the padded row count; attention splits by the
// reserved context), so the same bound as against the reference.
TEST(CudaGraphTest, ReplayGivesTheLogitsOfEagerLaunches) {
  JOULE_SKIP_WITHOUT_CUDA_DEVICE();
  const std::vector<Prompt> prompts = LoadFixture("qwen3_moe-tiny.bf16act");
  auto graphed = LoadOnGpu("qwen3_moe-tiny", /*cuda_graphs=*/true);
  auto eager = LoadOnGpu("qwen3_moe-tiny", /*cuda_graphs=*/false);
  ASSERT_NE(graphed, nullptr);
  ASSERT_NE(eager, nullptr);
  const StepLogits a = RunEngine(*graphed, prompts);
  const StepLogits b = RunEngine(*eager, prompts);
  EXPECT_GT(graphed->graph_replays(), 0);
  EXPECT_EQ(eager->graph_replays(), 0);
  ASSERT_EQ(a.rows.size(), b.rows.size());
  float worst = 0;
  for (const auto& [key, row] : a.rows) {
    const std::vector<float>& other = b.rows.at(key);
    float max_abs = 0;
    for (float v : other) max_abs = std::max(max_abs, std::abs(v));
    for (size_t v = 0; v < row.size(); ++v) {
      const float err = std::abs(row[v] - other[v]);
      worst = std::max(worst, err);
      ASSERT_LE(err, kTolerance(other[v], max_abs))
          << "request " << key.first << " step " << key.second << " token " << v;
    }
  }
  std::printf("graph vs eager: max |diff| = %.3g over %zu sampled rows\n", worst, a.rows.size());
}

TEST(GpuBadInputTest, AnOrdinalPastTheLastDeviceNamesHowManyThereAre) {
  JOULE_SKIP_WITHOUT_CUDA_DEVICE();
  const int count = kernels::cuda::DeviceCount();
  auto backend = device::CreateBackend({.kind = device::DeviceKind::kCuda, .index = count});
  ASSERT_FALSE(backend.ok());
  EXPECT_EQ(backend.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(backend.status().message()),
              HasSubstr(absl::StrCat("this host has ", count, " CUDA device")));
}

TEST(GpuBadInputTest, MemoryThatIsNotThereSaysHowMuchWasAskedAndIsFree) {
  JOULE_SKIP_WITHOUT_CUDA_DEVICE();
  auto backend = device::CreateBackend(kGpu);
  ASSERT_TRUE(backend.ok()) << backend.status();
  auto memory = (*backend)->DeviceMemory();
  ASSERT_TRUE(memory.ok());
  auto huge = (*backend)->Allocate(device::MemoryKind::kDevice,
                                   static_cast<size_t>(memory->total_bytes) * 2);
  ASSERT_FALSE(huge.ok());
  EXPECT_EQ(huge.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(huge.status().message()), HasSubstr("GiB free of"));
  // The device is still usable afterwards.
  EXPECT_TRUE((*backend)->Allocate(device::MemoryKind::kDevice, 1 << 20).ok());
}

TEST(GpuBadInputTest, AKvCacheThatDoesNotFitIsAClearError) {
  JOULE_SKIP_WITHOUT_CUDA_DEVICE();
  auto model = LoadOnGpu("qwen3_moe-tiny", false);
  ASSERT_NE(model, nullptr);
  // A utilization below what is already in use leaves no room.
  auto engine = Engine::Create(model.get(), {.gpu_memory_utilization = 1e-6});
  ASSERT_FALSE(engine.ok());
  EXPECT_EQ(engine.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(engine.status().message()), HasSubstr("--gpu-memory-utilization"));
  // Sized from the GPU's memory, the cache holds far more than the CPU default.
  auto sized = Engine::Create(model.get(), {.gpu_memory_utilization = 0.5});
  ASSERT_TRUE(sized.ok()) << sized.status();
  EXPECT_GT((*sized)->kv_cache().allocator().num_blocks() * (*sized)->kv_cache().BytesPerBlock(),
            int64_t{1} << 30);
  EXPECT_EQ((*sized)->kv_cache().view().type, kernels::DType::kBF16);
}

TEST(GpuBadInputTest, ABatchThatDoesNotMatchTheCacheIsRefused) {
  JOULE_SKIP_WITHOUT_CUDA_DEVICE();
  auto model = LoadOnGpu("qwen3_moe-tiny", false);
  ASSERT_NE(model, nullptr);
  KvCacheView f32_view{.block_size = 16, .num_blocks = 1, .type = kernels::DType::kF32};
  f32_view.k.assign(model->config().num_layers, nullptr);
  f32_view.v.assign(model->config().num_layers, nullptr);
  ForwardBatch b{.tokens = {1}, .positions = {0}, .slots = {0}, .query_start = {0, 1},
                 .context_lens = {1}, .block_tables = {0}, .max_blocks_per_seq = 1,
                 .logit_rows = {0}};
  std::vector<float> logits(model->config().vocab_size);
  absl::Status s = model->Forward(b, f32_view, logits.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("bf16"));
}

}  // namespace
}  // namespace joule
