// Grouped (per-expert) GEMM on CUDA tensor cores: BF16 weights, F32 or BF16
// activations rounded to BF16, F32 accumulation. Block-scaled FP8 weights
// (kF8E4M3 codes and per-expert F32 scale grids, GroupedGemmParams::w_scale_inv
// and w_blocks) run on CUDA cores: each code widened exactly and multiplied by
// its block's scale, activations rounded to BF16 as above, F32 FMAs in k order.
//
// GroupedGemmParams (layout and semantics) is in kernels/params/gemm.h, shared
// with kernels/cpu/gemm.h; results match the CPU kernel on BF16-valued inputs
// up to summation order. Every pointer, including row_offsets, the array of
// weight pointers and the optional x_rows / y_rows / row_scale, is device
// memory and is never read on the host: the launch is sized from num_groups,
// n, k and max_rows alone, so a captured graph can be replayed with new
// offsets. Asynchronous on `stream`; no dynamic shared memory and no
// cudaFuncSetAttribute, so it can be captured as is.
//
// Requirements the kernel cannot check (device data): row_offsets is
// nondecreasing with row_offsets[num_groups] <= max_rows (rows past the bound
// are silently not computed), every group with rows has a non-null w[g] (and,
// for FP8, w_scale_inv[g]), x_rows and y_rows name existing rows, and y_rows
// does not repeat (no atomics).
//
// Any k is accepted; the fast path (16-byte copies) needs k % 8 == 0 and
// 16-byte aligned weights, and for x a 16-byte aligned base and row stride
// (ldx * element size); other shapes take element-wise loads.
#pragma once

#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "kernels/params/gemm.h"

namespace joule::kernels::cuda {

using ::joule::kernels::GroupedGemmParams;
using ::joule::kernels::RowType;
using ::joule::kernels::WeightType;

// InvalidArgument (naming the field) for a weight type other than BF16 or
// F8E4M3, FP8 without w_scale_inv or with non-positive block sizes, negative shapes, ldx < k, row_scale without y_rows, or a null pointer where
// rows may exist; OK without a launch when there is nothing to compute.
absl::Status LaunchGroupedGemm(const GroupedGemmParams& p, cudaStream_t stream);

}  // namespace joule::kernels::cuda
