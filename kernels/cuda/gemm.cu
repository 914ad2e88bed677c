// Tiled F32 GEMM with F32, BF16 or block-scaled FP8 weights:
// y = x W^T (+ bias) (+ y).
//
// Correctness first: a classic shared-memory tiling (64x64 output tile per
// block, 4x4 per thread, k in steps of 16) with BF16 widened to F32 as it is
// staged, F32 accumulation; x is read as F32, or rounded to BF16 (nearest
// even) as it is staged when the caller asks (XRounding::kBf16: the GPU's
// numerics, where every GEMM input is BF16). A strided batch (MLA's per-head
// products) is the grid's z dimension. FP8 (E4M3) codes
// are widened exactly and multiplied by their block's F32 scale as they are
// staged, so the tile holds the dequantized weights the CPU kernel multiplies
// with (one F32 rounding of code times scale) and the result is theirs up to
// summation order. The backend sends cuBLASLt what it takes (BF16 weights)
// and everything else here: F32 weights (MLA's absorbed matrices of FP8
// checkpoints) and FP8 ones.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/gemm_checks.h"
#include "kernels/cuda/launch_util.cuh"

namespace joule::kernels::cuda {
namespace {

constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 16;
constexpr int kThreads = 256;  // 16 x 16, each thread owns 4 x 4 outputs

// Weight (gn, gk) of W [n, k] as F32. scale_ld: columns of the FP8 scale grid.
template <typename W>
__device__ __forceinline__ float LoadWeight(const GemmParams& p, const W* w, int64_t gn,
                                            int64_t gk, int64_t scale_ld);
template <>
__device__ __forceinline__ float LoadWeight<float>(const GemmParams& p, const float* w,
                                                   int64_t gn, int64_t gk, int64_t) {
  return w[gn * p.k + gk];
}
template <>
__device__ __forceinline__ float LoadWeight<uint16_t>(const GemmParams& p, const uint16_t* w,
                                                      int64_t gn, int64_t gk, int64_t) {
  return Bf16BitsToFloat(w[gn * p.k + gk]);
}
template <>
__device__ __forceinline__ float LoadWeight<uint8_t>(const GemmParams& p, const uint8_t* w,
                                                     int64_t gn, int64_t gk, int64_t scale_ld) {
  const float scale = p.w_scale_inv[Fp8ScaleIndex(p.w_blocks.first_row + gn, gk, p.w_blocks.rows,
                                                  p.w_blocks.cols, scale_ld)];
  return E4M3ToFloat(w[gn * p.k + gk]) * scale;
}

template <typename W, bool kRoundX>
__global__ void __launch_bounds__(kThreads) GemmKernel(GemmParams p, int64_t ldx, int64_t ldy,
                                                     int64_t scale_ld) {
  __shared__ float xs[kTileK][kTileM + 1];  // x tile, k-major; +1 avoids bank conflicts
  __shared__ float ws[kTileK][kTileN + 1];  // W tile, k-major
  // Batch member blockIdx.z (GemmParams' strided batch; 0 when unbatched).
  const int64_t member = blockIdx.z;
  const float* x = p.x + member * p.x_batch_stride;
  const W* w = static_cast<const W*>(p.w) + member * p.w_batch_stride;
  float* const y_base = p.y + member * p.y_batch_stride;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const int tx = threadIdx.x % 16;
  const int ty = threadIdx.x / 16;

  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < p.k; k0 += kTileK) {
    // Stage 64 x 16 of x and of W: 1024 values each, 4 per thread, reading
    // 16 consecutive k per row.
    for (int i = threadIdx.x; i < kTileM * kTileK; i += kThreads) {
      const int row = i / kTileK;
      const int kk = i % kTileK;
      const int64_t gk = k0 + kk;
      const int64_t gm = m0 + row;
      const int64_t gn = n0 + row;
      float xv = (gm < p.m && gk < p.k) ? x[gm * ldx + gk] : 0.f;
      if constexpr (kRoundX) xv = __bfloat162float(__float2bfloat16_rn(xv));
      xs[kk][row] = xv;
      ws[kk][row] = (gn < p.n && gk < p.k) ? LoadWeight(p, w, gn, gk, scale_ld) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = xs[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = ws[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t gm = m0 + ty + 16 * i;
    if (gm >= p.m) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t gn = n0 + tx + 16 * j;
      if (gn >= p.n) continue;
      float r = acc[i][j];
      if (p.bias != nullptr) r += p.bias[gn];
      float* y = y_base + gm * ldy + gn;
      *y = p.accumulate ? *y + r : r;
    }
  }
}

template <bool kRoundX>
void Launch(const GemmParams& p, dim3 grid, int64_t ldx, int64_t ldy, int64_t scale_ld,
            cudaStream_t stream) {
  switch (p.w_type) {
    case WeightType::kBF16:
      GemmKernel<uint16_t, kRoundX><<<grid, kThreads, 0, stream>>>(p, ldx, ldy, scale_ld);
      break;
    case WeightType::kF8E4M3:
      GemmKernel<uint8_t, kRoundX><<<grid, kThreads, 0, stream>>>(p, ldx, ldy, scale_ld);
      break;
    case WeightType::kF32:
      GemmKernel<float, kRoundX><<<grid, kThreads, 0, stream>>>(p, ldx, ldy, scale_ld);
      break;
  }
}

}  // namespace

absl::Status LaunchGemm(const GemmParams& p, cudaStream_t stream, XRounding x_rounding) {
  if (p.m < 0 || p.n < 0 || p.k < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("Gemm: negative shape m=", p.m, " n=", p.n, " k=", p.k));
  }
  const int64_t ldx = p.ldx == 0 ? p.k : p.ldx;
  const int64_t ldy = p.ldy == 0 ? p.n : p.ldy;
  if (ldx < p.k || ldy < p.n) {
    return absl::InvalidArgumentError(absl::StrCat("Gemm: ldx=", ldx, " < k=", p.k, " or ldy=",
                                                   ldy, " < n=", p.n));
  }
  if (p.w_type == WeightType::kF8E4M3) {
    if (absl::Status s = ValidateFp8Blocks("Gemm", p.w_blocks, p.n, p.k); !s.ok()) return s;
  }
  if (absl::Status s = ValidateGemmBatch("Gemm", p); !s.ok()) return s;
  if (p.m == 0 || p.n == 0) return absl::OkStatus();
  if (!p.y || (p.k > 0 && (!p.x || !p.w))) return absl::InvalidArgumentError("Gemm: null pointer");
  if (p.w_type == WeightType::kF8E4M3 && p.k > 0 && p.w_scale_inv == nullptr) {
    return absl::InvalidArgumentError("Gemm: f8_e4m3 weights need w_scale_inv (it is null)");
  }
  const int64_t tiles_m = (p.m + kTileM - 1) / kTileM;
  const int64_t tiles_n = (p.n + kTileN - 1) / kTileN;
  if (tiles_m > 65535 || tiles_n > kMaxGridX) {
    return absl::InvalidArgumentError(absl::StrCat("Gemm: m=", p.m, " too large for one launch"));
  }
  const dim3 grid(static_cast<unsigned>(tiles_n), static_cast<unsigned>(tiles_m),
                  static_cast<unsigned>(p.batch));
  const int64_t scale_ld =
      p.w_type == WeightType::kF8E4M3 ? (p.k + p.w_blocks.cols - 1) / p.w_blocks.cols : 0;
  if (x_rounding == XRounding::kBf16) {
    Launch<true>(p, grid, ldx, ldy, scale_ld, stream);
  } else {
    Launch<false>(p, grid, ldx, ldy, scale_ld, stream);
  }
  JOULE_CUDA_RETURN_IF_LAUNCH_FAILED("GemmKernel");
  return absl::OkStatus();
}

}  // namespace joule::kernels::cuda
