// What a batched GEMM may hold (kernels/cuda/gemm_checks.h), checked on every
// CI host: the CPU backend, the fake device and the CUDA launch use these checks.
#include "kernels/cuda/gemm_checks.h"

#include <string>
#include <utility>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace joule::kernels::cuda {
namespace {

using ::testing::HasSubstr;

GemmParams PerHead() {
  GemmParams p;
  p.m = 4;
  p.k = 128;
  p.n = 512;
  p.w_type = WeightType::kBF16;
  p.batch = 128;
  p.x_batch_stride = 192;
  p.w_batch_stride = 512 * 128;
  p.y_batch_stride = 576;
  p.ldy = 128 * 576;  // a token's heads side by side, as MLA lays them out
  return p;
}

TEST(CudaGemmChecks, PerHeadBatchesAndPlainGemmsAreValid) {
  EXPECT_TRUE(ValidateGemmBatch("Gemm", PerHead()).ok());
  EXPECT_TRUE(ValidateGemmBatch("Gemm", GemmParams{}).ok());
  GemmParams fp8;
  fp8.w_type = WeightType::kF8E4M3;  // unbatched FP8 is the usual case
  EXPECT_TRUE(ValidateGemmBatch("Gemm", fp8).ok());
  GemmParams broadcast = PerHead();
  broadcast.x_batch_stride = 0;  // every member reads the same x
  EXPECT_TRUE(ValidateGemmBatch("Gemm", broadcast).ok());
}

TEST(CudaGemmChecks, BadBatchesNameTheField) {
  GemmParams p = PerHead();
  p.batch = 0;
  EXPECT_THAT(ValidateGemmBatch("Gemm", p).message(), HasSubstr("Gemm: batch must be in [1, 65535], got 0"));
  p.batch = kMaxGemmBatch + 1;
  EXPECT_THAT(ValidateGemmBatch("Gemm", p).message(), HasSubstr("got 65536"));
  p = PerHead();
  p.w_batch_stride = -1;
  EXPECT_THAT(ValidateGemmBatch("Gemm", p).message(), HasSubstr("w_batch_stride=-1"));
  p = PerHead();
  p.w_type = WeightType::kF8E4M3;
  const absl::Status fp8 = ValidateGemmBatch("Gemm", p);
  EXPECT_TRUE(absl::IsInvalidArgument(fp8));
  EXPECT_THAT(fp8.message(), HasSubstr("f8_e4m3 weights take batch 1"));
}

// Members run in parallel: two writing one element would race.
TEST(CudaGemmChecks, MembersWhoseOutputsOverlapAreRefused) {
  GemmParams stacked = PerHead();
  stacked.ldy = 0;  // n: each member's [m, n] block after the last
  stacked.y_batch_stride = stacked.m * stacked.n;
  EXPECT_TRUE(ValidateGemmBatch("Gemm", stacked).ok());
  GemmParams one_row = PerHead();
  one_row.m = 1;
  one_row.ldy = 0;  // one token: ldy never reached
  EXPECT_TRUE(ValidateGemmBatch("Gemm", one_row).ok());
  for (auto [ys, ldy] : {std::pair<int64_t, int64_t>{0, 128 * 576}, {511, 128 * 576},
                         {576, 127 * 576 + 511}, {576, 0}}) {
    GemmParams p = PerHead();
    p.y_batch_stride = ys;
    p.ldy = ldy;
    const absl::Status s = ValidateGemmBatch("Gemm", p);
    EXPECT_TRUE(absl::IsInvalidArgument(s)) << "y_batch_stride " << ys << " ldy " << ldy << ": " << s;
    EXPECT_THAT(s.message(), HasSubstr("the batch members' outputs overlap (y_batch_stride=" +
                                       std::to_string(ys)));
  }
}

}  // namespace
}  // namespace joule::kernels::cuda
