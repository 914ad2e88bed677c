// Normalization, activation, rotary-embedding, embedding-lookup and
// residual-add kernels (F32).
// The parameter structs (and their semantics) are in kernels/params/elementwise.h,
// shared with the CUDA kernels.
#pragma once

#include <cstdint>

#include "kernels/cpu/thread_pool.h"
#include "kernels/params/elementwise.h"

namespace joule::kernels::cpu {

using ::joule::kernels::AddParams;
using ::joule::kernels::DType;
using ::joule::kernels::EmbeddingParams;
using ::joule::kernels::GatedAddParams;
using ::joule::kernels::RmsNormParams;
using ::joule::kernels::RopeParams;
using ::joule::kernels::SiluMulParams;

void LaunchRmsNorm(const RmsNormParams& p, CpuStream stream);
void LaunchSiluMul(const SiluMulParams& p, CpuStream stream);
void LaunchRope(const RopeParams& p, CpuStream stream);
void LaunchEmbedding(const EmbeddingParams& p, CpuStream stream);
void LaunchAdd(const AddParams& p, CpuStream stream);
void LaunchGatedAdd(const GatedAddParams& p, CpuStream stream);

// Fills cos/sin [max_position, head_dim/2] the way Hugging Face computes them
// in F32: inv_freq[i] = 1 / theta^(2i/head_dim), angle = position * inv_freq[i].
void BuildRopeTable(float theta, int head_dim, int64_t max_position, float* cos, float* sin);
// The same from given inverse frequencies [half] (YaRN's), cos and sin then
// multiplied by `scale` (YaRN's attention factor), as transformers does.
void BuildRopeTable(const float* inv_freq, int half, int64_t max_position, float scale, float* cos,
                    float* sin);

}  // namespace joule::kernels::cpu
