// RMSNorm, SiLU-mul, RoPE, embedding lookup, residual and bias adds. Simple,
// memory-bound kernels: one block per row or token, grid-stride loops elsewhere.
#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/elementwise.h"
#include "kernels/cuda/launch_util.cuh"

namespace joule::kernels::cuda {
namespace {

constexpr int kRmsNormThreads = 256;
constexpr int kRowThreads = 256;

// One block per row; blocks stride over the rows past GridStrideBlocks' cap.
unsigned RowBlocks(int64_t rows) { return GridStrideBlocks(rows, 1); }

// Rows `stride` apart (MLA normalizes the latent part of its cache rows).
__global__ void RmsNormKernel(RmsNormParams p, int64_t stride) {
  const float* x = p.x + blockIdx.x * stride;
  float* out = p.out + blockIdx.x * stride;
  // Sum of squares in double and 1/sqrt rather than rsqrtf, as the CPU kernel
  // does, so both agree to the last bit or two.
  double sum = 0.0;
  for (int64_t c = threadIdx.x; c < p.cols; c += blockDim.x) {
    sum += static_cast<double>(x[c]) * static_cast<double>(x[c]);
  }
  sum = BlockSum<kRmsNormThreads>(sum);
  const float mean = static_cast<float>(sum / static_cast<double>(p.cols));
  const float scale = 1.f / sqrtf(mean + p.eps);
  // Same rounding order as Hugging Face and the CPU kernel: (x * rsqrt) * weight.
  for (int64_t c = threadIdx.x; c < p.cols; c += blockDim.x) out[c] = (x[c] * scale) * p.weight[c];
}

__global__ void SiluMulKernel(SiluMulParams p) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < p.n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = p.gate[i];
    p.out[i] = g / (1.f + expf(-g)) * p.up[i];
  }
}

// RopeParams' strides with their defaults filled in on the host.
struct RopeStrides {
  float* q_out = nullptr;  // p.q_out, or p.q itself (in place)
  int64_t q_head = 0;      // from one head of q to the next
  int64_t q_out_head = 0;  // ... of q_out
  int64_t k_row = 0;       // from one token of k to the next
};

// One token's heads, `in_head` apart in x, rotated into y (heads `out_head`
// apart; y may be x). Each thread owns whole pairs, so in place is safe.
// interleaved: the pairs (x0, x1), (x2, x3), ...; otherwise (x_j, x_{j+half}).
__device__ void RotateHeads(const float* x, int64_t in_head, float* y, int64_t out_head,
                            int heads, int head_dim, bool interleaved, const float* cos,
                            const float* sin) {
  const int half = head_dim / 2;
  for (int i = threadIdx.x; i < heads * half; i += blockDim.x) {
    const int h = i / half;
    const int j = i % half;
    const int first = interleaved ? 2 * j : j;
    const int second = interleaved ? 2 * j + 1 : j + half;
    const float* in = x + h * in_head;
    float* out = y + h * out_head;
    const float x1 = in[first];
    const float x2 = in[second];
    out[first] = x1 * cos[j] - x2 * sin[j];
    out[second] = x2 * cos[j] + x1 * sin[j];
  }
}

__global__ void RopeKernel(RopeParams p, RopeStrides strides) {
  const int64_t t = blockIdx.x;
  const int half = p.head_dim / 2;
  const int64_t pos = p.positions[t];
  const float* cos = p.cos + pos * half;
  const float* sin = p.sin + pos * half;
  if (p.q != nullptr) {
    RotateHeads(p.q + t * p.num_q_heads * strides.q_head, strides.q_head,
                strides.q_out + t * p.num_q_heads * strides.q_out_head, strides.q_out_head,
                p.num_q_heads, p.head_dim, p.interleaved, cos, sin);
  }
  if (p.k != nullptr) {
    float* k = p.k + t * strides.k_row;
    RotateHeads(k, p.head_dim, k, p.head_dim, p.num_kv_heads, p.head_dim, p.interleaved, cos, sin);
  }
}

// Fills in RopeParams' stride defaults (0: packed heads, q rotated in place),
// or names the field that is negative or would overlap heads.
absl::Status ResolveRopeStrides(const RopeParams& p, RopeStrides* strides) {
  const auto check = [](const char* field, int64_t value, int64_t packed, int64_t* out) {
    if (value != 0 && value < packed) {
      return absl::InvalidArgumentError(absl::StrCat("Rope: ", field, " must be 0 or at least ",
                                                     packed, ", got ", value));
    }
    *out = value != 0 ? value : packed;
    return absl::OkStatus();
  };
  const int64_t kv_row = static_cast<int64_t>(p.num_kv_heads) * p.head_dim;
  const absl::Status q_head = check("q_head_stride", p.q_head_stride, p.head_dim, &strides->q_head);
  if (!q_head.ok()) return q_head;
  const absl::Status k_row = check("k_row_stride", p.k_row_stride, kv_row, &strides->k_row);
  if (!k_row.ok()) return k_row;
  if (p.q_out == nullptr) {  // in place: q_out_head_stride is not read
    strides->q_out = p.q;
    strides->q_out_head = strides->q_head;
    return absl::OkStatus();
  }
  strides->q_out = p.q_out;
  return check("q_out_head_stride", p.q_out_head_stride, p.head_dim, &strides->q_out_head);
}

__global__ void EmbeddingKernel(EmbeddingParams p) {
  for (int64_t t = blockIdx.x; t < p.count; t += gridDim.x) {
    const int64_t row = p.tokens[t];
    float* dst = p.out + t * p.hidden;
    if (p.table_type == DType::kBF16) {
      const uint16_t* src = static_cast<const uint16_t*>(p.table) + row * p.hidden;
      for (int64_t c = threadIdx.x; c < p.hidden; c += blockDim.x) {
        dst[c] = Bf16BitsToFloat(src[c]);  // exact widening
      }
    } else {
      const float* src = static_cast<const float*>(p.table) + row * p.hidden;
      for (int64_t c = threadIdx.x; c < p.hidden; c += blockDim.x) dst[c] = src[c];
    }
  }
}

__global__ void AddKernel(AddParams p) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < p.n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    p.y[i] += p.x[i];
  }
}

__global__ void GatedAddKernel(GatedAddParams p) {
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    // The CPU kernel's formula and rounding order: 1 / (1 + exp(-g)), then g * x.
    const float gate = 1.f / (1.f + expf(-p.gate_logit[r]));
    float* y = p.y + r * p.cols;
    const float* x = p.x + r * p.cols;
    // Multiply and add rounded apart, as the CPU does: nvcc would contract
    // `y += gate * x` into one FMA, which rounds once.
    for (int64_t c = threadIdx.x; c < p.cols; c += blockDim.x) {
      y[c] = __fadd_rn(y[c], __fmul_rn(gate, x[c]));
    }
  }
}

__global__ void BiasAddKernel(BiasAddParams p, int64_t ldy) {
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    float* y = p.y + r * ldy;
    for (int64_t c = threadIdx.x; c < p.cols; c += blockDim.x) y[c] += p.bias[c];
  }
}

}  // namespace

absl::Status LaunchRmsNorm(const RmsNormParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.cols < 0) return absl::InvalidArgumentError("RmsNorm: negative shape");
  if (p.rows == 0 || p.cols == 0) return absl::OkStatus();
  if (!p.x || !p.weight || !p.out) return absl::InvalidArgumentError("RmsNorm: null pointer");
  if (p.stride != 0 && p.stride < p.cols) {  // shorter rows would overlap
    return absl::InvalidArgumentError(absl::StrCat("RmsNorm: stride must be 0 or at least cols (",
                                                   p.cols, "), got ", p.stride));
  }
  if (p.rows > kMaxGridX) return absl::InvalidArgumentError("RmsNorm: too many rows");
  const int64_t stride = p.stride != 0 ? p.stride : p.cols;
  RmsNormKernel<<<static_cast<unsigned>(p.rows), kRmsNormThreads, 0, stream>>>(p, stride);
  JOULE_CUDA_RETURN_IF_LAUNCH_FAILED("RmsNormKernel");
  return absl::OkStatus();
}

absl::Status LaunchSiluMul(const SiluMulParams& p, cudaStream_t stream) {
  if (p.n < 0) return absl::InvalidArgumentError("SiluMul: negative n");
  if (p.n == 0) return absl::OkStatus();
  if (!p.gate || !p.up || !p.out) return absl::InvalidArgumentError("SiluMul: null pointer");
  SiluMulKernel<<<GridStrideBlocks(p.n, 256), 256, 0, stream>>>(p);
  JOULE_CUDA_RETURN_IF_LAUNCH_FAILED("SiluMulKernel");
  return absl::OkStatus();
}

absl::Status LaunchRope(const RopeParams& p, cudaStream_t stream) {
  if (p.tokens < 0) return absl::InvalidArgumentError("Rope: negative tokens");
  if (p.tokens == 0) return absl::OkStatus();
  if (p.head_dim <= 0 || p.head_dim % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("Rope: head_dim must be positive and even, got ", p.head_dim));
  }
  if (!p.positions || !p.cos || !p.sin) {
    return absl::InvalidArgumentError("Rope: null pointer");
  }
  RopeStrides strides;
  if (absl::Status s = ResolveRopeStrides(p, &strides); !s.ok()) return s;
  if (p.tokens > kMaxGridX) return absl::InvalidArgumentError("Rope: too many tokens");
  RopeKernel<<<static_cast<unsigned>(p.tokens), 128, 0, stream>>>(p, strides);
  JOULE_CUDA_RETURN_IF_LAUNCH_FAILED("RopeKernel");
  return absl::OkStatus();
}

absl::Status LaunchEmbedding(const EmbeddingParams& p, cudaStream_t stream) {
  if (p.count < 0 || p.hidden < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Embedding: count and hidden must be >= 0, got count=", p.count, " hidden=", p.hidden));
  }
  if (p.count == 0 || p.hidden == 0) return absl::OkStatus();
  if (!p.tokens) return absl::InvalidArgumentError("Embedding: tokens is null");
  if (!p.table) return absl::InvalidArgumentError("Embedding: table is null");
  if (!p.out) return absl::InvalidArgumentError("Embedding: out is null");
  EmbeddingKernel<<<RowBlocks(p.count), kRowThreads, 0, stream>>>(p);
  JOULE_CUDA_RETURN_IF_LAUNCH_FAILED("EmbeddingKernel");
  return absl::OkStatus();
}

absl::Status LaunchAdd(const AddParams& p, cudaStream_t stream) {
  if (p.n < 0) return absl::InvalidArgumentError(absl::StrCat("Add: n must be >= 0, got ", p.n));
  if (p.n == 0) return absl::OkStatus();
  if (!p.y) return absl::InvalidArgumentError("Add: y is null");
  if (!p.x) return absl::InvalidArgumentError("Add: x is null");
  AddKernel<<<GridStrideBlocks(p.n, 256), 256, 0, stream>>>(p);
  JOULE_CUDA_RETURN_IF_LAUNCH_FAILED("AddKernel");
  return absl::OkStatus();
}

absl::Status LaunchGatedAdd(const GatedAddParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.cols < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "GatedAdd: rows and cols must be >= 0, got rows=", p.rows, " cols=", p.cols));
  }
  if (p.rows == 0 || p.cols == 0) return absl::OkStatus();
  if (!p.y) return absl::InvalidArgumentError("GatedAdd: y is null");
  if (!p.x) return absl::InvalidArgumentError("GatedAdd: x is null");
  if (!p.gate_logit) return absl::InvalidArgumentError("GatedAdd: gate_logit is null");
  GatedAddKernel<<<RowBlocks(p.rows), kRowThreads, 0, stream>>>(p);
  JOULE_CUDA_RETURN_IF_LAUNCH_FAILED("GatedAddKernel");
  return absl::OkStatus();
}

absl::Status LaunchBiasAdd(const BiasAddParams& p, cudaStream_t stream) {
  const int64_t ldy = p.ldy == 0 ? p.cols : p.ldy;
  if (p.rows < 0 || p.cols < 0 || ldy < p.cols) {
    return absl::InvalidArgumentError(
        absl::StrCat("BiasAdd: need rows >= 0 and ldy >= cols >= 0, got rows=", p.rows,
                     " cols=", p.cols, " ldy=", ldy));
  }
  if (p.rows == 0 || p.cols == 0) return absl::OkStatus();
  if (!p.y) return absl::InvalidArgumentError("BiasAdd: y is null");
  if (!p.bias) return absl::InvalidArgumentError("BiasAdd: bias is null");
  BiasAddKernel<<<RowBlocks(p.rows), kRowThreads, 0, stream>>>(p, ldy);
  JOULE_CUDA_RETURN_IF_LAUNCH_FAILED("BiasAddKernel");
  return absl::OkStatus();
}

}  // namespace joule::kernels::cuda
