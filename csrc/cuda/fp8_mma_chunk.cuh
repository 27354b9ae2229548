// The tensor-core block-FP8 chunk shared by expert_ffn_fp8_mma.cuh (grouped expert GEMV) and dense_gemv_fp8.cu (its
// LONGCAT_FP8_GEMV_MMA variant): lane (g = lane / 4, t = lane % 4) holds 16 e4m3 of weight row g (lo) and row g + 8
// (hi) at k = 64 c + 16 t and the 16 bf16 of its activation row g at the same k; e4m3 -> bf16 exactly in registers,
// then 4 x mma.sync m16n8k16 (expert_ffn_v3.cuh's K permutation, the same on both operands) add the chunk's 64
// products per (weight row, activation row) into an fp32 fragment. A header of its own so that dense_gemv_fp8.cu
// does not instantiate the expert kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "expert_ffn_v3.cuh"
#include "fp8_common.cuh"

namespace longcat {
namespace fp8mma {

using T = __nv_bfloat16;

// 16 e4m3 (one uint4, k ascending from the low byte) -> 8 words of bf16x2 (word q: k = 2q, 2q + 1).
__device__ __forceinline__ void e4m3x16_to_bf16(const uint4& v, uint32_t (&out)[8]) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const auto pair = static_cast<__nv_fp8x2_storage_t>((words[j] >> (16 * h)) & 0xffffu);
      const __half2_raw raw = __nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3);
      const __nv_bfloat162 b = __float22bfloat162_rn(__half22float2(__half2(raw)));
      out[2 * j + h] = *reinterpret_cast<const uint32_t*>(&b);
    }
  }
}

// One 64-wide chunk of one lane: 16 e4m3 of weight row g (lo) and row g + 8 (hi), 16 bf16 of its token row, and
// the two rows' scales of the chunk's 128-block.
struct Frag {
  uint4 lo, hi, x0, x1;
  float slo, shi;
};

// The chunk's 64 products per (row, token) pair: v3's two steps (k = 16 t + [0, 8) and 16 t + 8 + [0, 8)).
__device__ __forceinline__ void mma_chunk(float (&c)[4], const Frag& f) {
  uint32_t wl[8], wh[8];
  e4m3x16_to_bf16(f.lo, wl);
  e4m3x16_to_bf16(f.hi, wh);
  v3::mma_16816<T>(c, wl[0], wh[0], wl[1], wh[1], f.x0.x, f.x0.y);
  v3::mma_16816<T>(c, wl[2], wh[2], wl[3], wh[3], f.x0.z, f.x0.w);
  v3::mma_16816<T>(c, wl[4], wh[4], wl[5], wh[5], f.x1.x, f.x1.y);
  v3::mma_16816<T>(c, wl[6], wh[6], wl[7], wh[7], f.x1.z, f.x1.w);
}

}  // namespace fp8mma
}  // namespace longcat
