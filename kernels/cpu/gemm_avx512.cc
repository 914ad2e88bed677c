// GEMM blocks for AVX-512 CPUs (this file is compiled with AVX-512 flags).
#include "kernels/cpu/gemm_internal.h"
#include "kernels/cpu/gemm_tile.h"
#include "kernels/cpu/simd_avx512.h"

namespace joule::kernels::cpu {
namespace {
// 32 zmm registers: MR*NR accumulators + MR x vectors + a widened weight.
struct Avx512Tiles {
  static constexpr int kNr1 = 8, kNr2 = 8, kNr3 = 6, kNr4 = 6;
};
}  // namespace

void GemmBlockAvx512(const GemmBlock& b) { GemmBlockDispatch<Avx512, Avx512Tiles>(b); }

}  // namespace joule::kernels::cpu
