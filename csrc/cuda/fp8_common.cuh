// Block-FP8 weight helpers for the decode GEMV kernels (dense_gemv_fp8.cu, expert_ffn_fp8.cu): one 16-byte load
// carries 16 e4m3 weights, dequantized in registers (hardware cvt e4m3x2 -> f16x2, exact, then to fp32). The block
// scale (one fp32 per 128 x 128 block, a multiplier) is applied once per 16 products: acc += scale * sum_q x_q w8_q.
// 16 consecutive k never straddle a 128-wide block when they start at a multiple of 16.
#pragma once

#include <cuda_fp8.h>

#include "common.cuh"

namespace longcat {
namespace fp8 {

constexpr int kVec = 16;         // e4m3 weights per 16-byte load
constexpr int kBlock = 128;      // scale block (rows and columns)
constexpr int kBlockShift = 7;   // log2(kBlock)

// 16 e4m3 values (one uint4) -> fp32.
__device__ __forceinline__ void dequant16(const uint4& v, float (&f)[kVec]) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const auto pair = static_cast<__nv_fp8x2_storage_t>((words[j] >> (16 * h)) & 0xffffu);
      const __half2_raw raw = __nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3);
      const float2 f2 = __half22float2(__half2(raw));
      f[4 * j + 2 * h] = f2.x;
      f[4 * j + 2 * h + 1] = f2.y;
    }
  }
}

// 16 consecutive activations (two 16-byte loads of bf16 / fp16) -> fp32.
template <typename T>
__device__ __forceinline__ void load_x16(const T* p, float (&f)[kVec]) {
  static_assert(sizeof(T) == 2, "fp8 GEMV: 16-bit activations only");
  const Vec<T, 8> a = load_vec<T, 8>(p), b = load_vec<T, 8>(p + 8);
#pragma unroll
  for (int q = 0; q < 8; ++q) {
    f[q] = to_float(a.v[q]);
    f[8 + q] = to_float(b.v[q]);
  }
}

__device__ __forceinline__ uint4 load_w16_stream(const uint8_t* p) { return __ldcs(reinterpret_cast<const uint4*>(p)); }

// Sum of 16 products, started from zero so that it can be scaled once.
__device__ __forceinline__ float dot16(const float (&x)[kVec], const float (&w)[kVec]) {
  float p = x[0] * w[0];
#pragma unroll
  for (int q = 1; q < kVec; ++q) p = fmaf(x[q], w[q], p);
  return p;
}

}  // namespace fp8
}  // namespace longcat
