// GEMM blocks for AVX2 + FMA CPUs (this file is compiled with AVX2 flags).
#include "kernels/cpu/gemm_internal.h"
#include "kernels/cpu/gemm_tile.h"
#include "kernels/cpu/simd_avx2.h"

namespace joule::kernels::cpu {
namespace {
// 16 ymm registers: MR*NR accumulators + MR x vectors + a widened weight.
struct Avx2Tiles {
  static constexpr int kNr1 = 8, kNr2 = 4, kNr3 = 3, kNr4 = 2;
};
}  // namespace

void GemmBlockAvx2(const GemmBlock& b) { GemmBlockDispatch<Avx2, Avx2Tiles>(b); }

}  // namespace joule::kernels::cpu
