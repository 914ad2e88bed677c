#include "kernels/cpu/elementwise.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace joule::kernels::cpu {
namespace {

// Sum of squares in 16 independent F32 lanes (vectorizes without -ffast-math)
// finished in double.
double SumSquares(const float* x, int64_t n) {
  constexpr int kLanes = 16;
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += x[i + l] * x[i + l];
  }
  double sum = 0.0;
  for (; i < n; ++i) sum += static_cast<double>(x[i]) * x[i];
  for (int l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

// y = x rotated (y may be x).
void RotateHalf(const float* x, float* y, const float* cos, const float* sin, int half) {
  for (int i = 0; i < half; ++i) {
    const float x1 = x[i];
    const float x2 = x[i + half];
    y[i] = x1 * cos[i] - x2 * sin[i];
    y[i + half] = x2 * cos[i] + x1 * sin[i];
  }
}

// The pairs (x0, x1), (x2, x3), ... rotated by angles 0, 1, ... (RopeParams::interleaved).
void RotatePairs(const float* x, float* y, const float* cos, const float* sin, int half) {
  for (int i = 0; i < half; ++i) {
    const float x1 = x[2 * i];
    const float x2 = x[2 * i + 1];
    y[2 * i] = x1 * cos[i] - x2 * sin[i];
    y[2 * i + 1] = x2 * cos[i] + x1 * sin[i];
  }
}

}  // namespace

void LaunchRmsNorm(const RmsNormParams& p, CpuStream stream) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, p.cols));
  ParallelFor(stream, p.rows, grain, [&](int64_t begin, int64_t end) {
    const int64_t stride = p.stride > 0 ? p.stride : p.cols;
    for (int64_t r = begin; r < end; ++r) {
      const float* x = p.x + r * stride;
      float* out = p.out + r * stride;
      const float mean = static_cast<float>(SumSquares(x, p.cols) / static_cast<double>(p.cols));
      const float inv = 1.0f / std::sqrt(mean + p.eps);
      // Same rounding order as Hugging Face: (x * rsqrt) * weight.
      for (int64_t c = 0; c < p.cols; ++c) out[c] = (x[c] * inv) * p.weight[c];
    }
  });
}

void LaunchSiluMul(const SiluMulParams& p, CpuStream stream) {
  ParallelFor(stream, p.n, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float g = p.gate[i];
      p.out[i] = g / (1.0f + std::exp(-g)) * p.up[i];
    }
  });
}

void LaunchRope(const RopeParams& p, CpuStream stream) {
  const int half = p.head_dim / 2;
  const int64_t q_head = p.q_head_stride > 0 ? p.q_head_stride : p.head_dim;
  float* q_out = p.q_out != nullptr ? p.q_out : p.q;
  const int64_t out_head = p.q_out == nullptr ? q_head
                           : p.q_out_head_stride > 0 ? p.q_out_head_stride : p.head_dim;
  const int64_t k_row = p.k_row_stride > 0 ? p.k_row_stride : int64_t{p.num_kv_heads} * p.head_dim;
  auto rotate = p.interleaved ? &RotatePairs : &RotateHalf;
  ParallelFor(stream, p.tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t pos = p.positions[t];
      const float* cos = p.cos + pos * half;
      const float* sin = p.sin + pos * half;
      if (p.q != nullptr) {
        const float* q = p.q + t * p.num_q_heads * q_head;
        float* out = q_out + t * p.num_q_heads * out_head;
        for (int h = 0; h < p.num_q_heads; ++h) rotate(q + h * q_head, out + h * out_head, cos, sin, half);
      }
      if (p.k != nullptr) {
        float* k = p.k + t * k_row;
        for (int h = 0; h < p.num_kv_heads; ++h) {
          rotate(k + h * p.head_dim, k + h * p.head_dim, cos, sin, half);
        }
      }
    }
  });
}

void BuildRopeTable(float theta, int head_dim, int64_t max_position, float* cos, float* sin) {
  const int half = head_dim / 2;
  // F32 throughout, like `1.0 / (base ** (arange(0, d, 2).float() / d))` and
  // `pos.float() * inv_freq` in the Hugging Face rotary embedding.
  std::vector<float> inv_freq(half);
  for (int i = 0; i < half; ++i) {
    inv_freq[i] = 1.0f / std::pow(theta, static_cast<float>(2 * i) / static_cast<float>(head_dim));
  }
  BuildRopeTable(inv_freq.data(), half, max_position, 1.0f, cos, sin);
}

void BuildRopeTable(const float* inv_freq, int half, int64_t max_position, float scale, float* cos,
                    float* sin) {
  for (int64_t pos = 0; pos < max_position; ++pos) {
    for (int i = 0; i < half; ++i) {
      const float angle = static_cast<float>(pos) * inv_freq[i];
      cos[pos * half + i] = std::cos(angle) * scale;
      sin[pos * half + i] = std::sin(angle) * scale;
    }
  }
}

void LaunchEmbedding(const EmbeddingParams& p, CpuStream stream) {
  const int64_t H = p.hidden;
  ParallelFor(stream, p.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* dst = p.out + t * H;
      const int64_t row = p.tokens[t];
      if (p.table_type == DType::kBF16) {
        const auto* src = static_cast<const uint16_t*>(p.table) + row * H;
        for (int64_t i = 0; i < H; ++i) {
          const uint32_t bits = static_cast<uint32_t>(src[i]) << 16;  // exact widening
          std::memcpy(dst + i, &bits, sizeof(float));
        }
      } else {
        std::memcpy(dst, static_cast<const float*>(p.table) + row * H, H * sizeof(float));
      }
    }
  });
}

void LaunchAdd(const AddParams& p, CpuStream stream) {
  ParallelFor(stream, p.n, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) p.y[i] += p.x[i];
  });
}

void LaunchGatedAdd(const GatedAddParams& p, CpuStream stream) {
  ParallelFor(stream, p.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float g = 1.0f / (1.0f + std::exp(-p.gate_logit[r]));
      float* y = p.y + r * p.cols;
      const float* x = p.x + r * p.cols;
      for (int64_t c = 0; c < p.cols; ++c) y[c] += g * x[c];
    }
  });
}

}  // namespace joule::kernels::cpu
