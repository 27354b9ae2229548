// expert_ffn_fp8 for narrow experts (a TP shard's I <= 512) at >= kMmaMinTokens tokens a step (wide experts measured
// faster in expert_ffn_fp8.cu's 2-row FMA passes): expert_ffn_v3.cuh's tensor-core grouped
// GEMV (same launch contract, same warp tiles, same register double buffering) with block-FP8 weights.
//  - One K "chunk" = 64 wide: lane (g, t) loads ONE 16-byte vector of 16 e4m3 weights of row g and of row g + 8 at
//    k = 64 c + 16 t (v3's step pair: a whole 128-byte line per row per chunk) and the matching 16 bf16 of its
//    token row (two 16-byte loads).
//  - e4m3 -> bf16 in registers, exactly (hardware e4m3x2 -> f16x2, then f16 -> f32 -> bf16: e4m3's 3 mantissa bits
//    and its exponents are exact in bf16), then 4 x mma.sync m16n8k16 bf16 with fp32 accumulation (v3's K
//    permutation: the same on both operands).
//  - The MMAs of a 128-wide K block go into an fp32 partial that is multiplied by the block's weight scale (row g's
//    and row g + 8's) and added to the fp32 accumulator: products exact, more exact than dequantizing to bf16.
// K slices (WK warps split K) are whole 128-blocks so that a partial never spans two scales.
// bf16 activations only; K (H, I) a multiple of 16 (the op's check), 16-byte aligned rows. Included from
// expert_ffn_fp8.cu only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "expert_ffn_v3.cuh"
#include "fp8_common.cuh"
#include "fp8_mma_chunk.cuh"

namespace longcat {
namespace fp8mma {

using T = __nv_bfloat16;
constexpr int kTokens = 8;  // token rows per pass (the MMA's N)

// Block = WK x WN warps (warp = wk + WK * wn); warp wn owns NG consecutive column tiles of CG outputs (SwiGLU: 8
// columns = gate rows n and up rows N + n; down: 16) and the K chunks of slice wk. As v3's kernel otherwise.
template <int WK, int WN, int NG, int U, bool SWIGLU>
__global__ void __launch_bounds__(WK * WN * kWarp, (16 + WK * WN - 1) / (WK * WN))
    grouped_gemv_fp8_mma_kernel(const T* __restrict__ a, const uint8_t* __restrict__ w,
                                const float* __restrict__ scale, T* __restrict__ out,
                                const int32_t* __restrict__ offsets, const int32_t* __restrict__ sorted_slots,
                                const int32_t* __restrict__ active, const int32_t* __restrict__ num_active, int K,
                                int N, int top_k, int64_t w_expert_stride, int64_t s_expert_stride, int s_row_stride,
                                bool early_prefetch) {
  constexpr int CG = SWIGLU ? 8 : 16;
  __shared__ float red[WN * NG][WK][4][kWarp];

  int expert;
  if (early_prefetch) {  // compact active list: both reads in flight together; active[] is -1 past num_active
    const int na = num_active[0];
    expert = active[blockIdx.x];
    if (static_cast<int>(blockIdx.x) >= na) return;  // block-uniform
  } else {  // walking all experts: check for rows before touching weights
    if (static_cast<int>(blockIdx.x) >= num_active[0]) return;
    expert = active[blockIdx.x];
    if (offsets[expert] == offsets[expert + 1]) return;
  }

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int wk = warp % WK, wn = warp / WK;
  const int g = lane >> 2, t = lane & 3;
  const int C = (K + 63) / 64;                          // 64-wide chunks
  const int Cw = 2 * ((C + 2 * WK - 1) / (2 * WK));     // chunks per K slice: whole 128-blocks
  const int c_begin = wk * Cw;
  const int c_count = max(0, min(C, c_begin + Cw) - c_begin);
  const int tile_col0 = blockIdx.y * (WN * NG * CG);
  const int col0 = tile_col0 + wn * NG * CG;
  const int ng = col0 >= N ? 0 : min(NG, (N - col0 + CG - 1) / CG);
  const int nsteps = ng * c_count;
  const uint8_t* wexp = w + static_cast<int64_t>(expert) * w_expert_stride;
  const float* sexp = scale + static_cast<int64_t>(expert) * s_expert_stride;

  auto load_w = [&](Frag(&f)[U], int j0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u;
      if (j < nsteps) {
        const int cgi = NG == 1 ? 0 : j / c_count;
        const int c = c_begin + j - cgi * c_count;
        const int k = 64 * c + 16 * t;
        const int col = col0 + cgi * CG + g;
        int64_t r_lo, r_hi;
        if constexpr (SWIGLU) {
          r_lo = min(col, N - 1);  // clamp: duplicated columns are computed but not stored
          r_hi = r_lo + N;         // up row of the same column
        } else {
          r_lo = min(col, N - 1);
          r_hi = min(col + 8, N - 1);
        }
        if (k < K) {
          f[u].lo = v3::ld_stream(wexp + r_lo * K + k);
          f[u].hi = v3::ld_stream(wexp + r_hi * K + k);
        } else {
          f[u].lo = make_uint4(0, 0, 0, 0);
          f[u].hi = make_uint4(0, 0, 0, 0);
        }
        const int kb = c >> 1;  // the chunk's 128-block
        f[u].slo = __ldg(sexp + (r_lo >> fp8::kBlockShift) * s_row_stride + kb);
        f[u].shi = __ldg(sexp + (r_hi >> fp8::kBlockShift) * s_row_stride + kb);
      }
    }
  };
  const T* xrow = nullptr;  // this lane's token row (lanes g >= m: none, zeros)
  auto load_x = [&](Frag(&f)[U], int j0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u;
      if (j < nsteps) {
        const int cgi = NG == 1 ? 0 : j / c_count;
        const int k = 64 * (c_begin + j - cgi * c_count) + 16 * t;
        const bool on = xrow != nullptr && k < K;
        f[u].x0 = on ? v3::ld_keep(xrow + k) : make_uint4(0, 0, 0, 0);
        f[u].x1 = on ? v3::ld_keep(xrow + k + 8) : make_uint4(0, 0, 0, 0);
      }
    }
  };
  float acc[4], part[4];
  auto compute = [&](const Frag(&f)[U], int j0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u;
      if (j < nsteps) {
        mma_chunk(part, f[u]);
        const int cgi = NG == 1 ? 0 : j / c_count;
        const int c = c_begin + j - cgi * c_count;
        if ((c & 1) || c == C - 1) {  // the 128-block ends: scale its partial into the accumulator
          acc[0] = fmaf(part[0], f[u].slo, acc[0]);
          acc[1] = fmaf(part[1], f[u].slo, acc[1]);
          acc[2] = fmaf(part[2], f[u].shi, acc[2]);
          acc[3] = fmaf(part[3], f[u].shi, acc[3]);
#pragma unroll
          for (int r = 0; r < 4; ++r) part[r] = 0.f;
        }
        if (j - cgi * c_count == c_count - 1) {  // last chunk of a column tile: park the sums
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            red[wn * NG + cgi][wk][r][lane] = acc[r];
            acc[r] = 0.f;
          }
        }
      }
    }
  };

  Frag fa[U], fb[U];
  if (early_prefetch) load_w(fa, 0);  // before the offsets -> sorted_slots -> x chain

  const int start = offsets[expert], end = offsets[expert + 1];
  for (int r0 = start; r0 < end; r0 += kTokens) {
    const int m = min(kTokens, end - r0);
    if (g < m) {
      const int r = r0 + g;
      const int src = SWIGLU ? sorted_slots[r] / top_k : r;  // SwiGLU reads token rows in place (no permute)
      xrow = a + static_cast<int64_t>(src) * K;
    } else {
      xrow = nullptr;
    }
    if (r0 != start || !early_prefetch) load_w(fa, 0);
    load_x(fa, 0);
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[r] = part[r] = 0.f;
    for (int cgi = c_count > 0 ? ng : 0; cgi < NG; ++cgi)
#pragma unroll
      for (int r = 0; r < 4; ++r) red[wn * NG + cgi][wk][r][lane] = 0.f;

    for (int j = 0; j < nsteps; j += 2 * U) {
      load_w(fb, j + U);
      load_x(fb, j + U);
      compute(fa, j);
      load_w(fa, j + 2 * U);
      load_x(fa, j + 2 * U);
      compute(fb, j + U);
    }
    __syncthreads();

    // Epilogue (v3's): lane (g, t) of the accumulator holds rows g / g+8 of the tile for tokens 2t and 2t+1.
    for (int it = threadIdx.x; it < WN * NG * kWarp; it += WK * WN * kWarp) {
      const int tile = it / kWarp, ln = it % kWarp;
      const int gg = ln >> 2, tt = ln & 3;
      float c[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        c[r] = 0.f;
#pragma unroll
        for (int q = 0; q < WK; ++q) c[r] += red[tile][q][r][ln];
      }
      const int n = tile_col0 + tile * CG + gg;
      const int i0 = 2 * tt, i1 = 2 * tt + 1;
      if constexpr (SWIGLU) {
        if (n < N) {
          if (i0 < m) out[static_cast<int64_t>(r0 + i0) * N + n] = from_float<T>(v3::silu(c[0]) * c[2]);
          if (i1 < m) out[static_cast<int64_t>(r0 + i1) * N + n] = from_float<T>(v3::silu(c[1]) * c[3]);
        }
      } else {
        if (n < N) {
          if (i0 < m) out[static_cast<int64_t>(r0 + i0) * N + n] = from_float<T>(c[0]);
          if (i1 < m) out[static_cast<int64_t>(r0 + i1) * N + n] = from_float<T>(c[1]);
        }
        if (n + 8 < N) {
          if (i0 < m) out[static_cast<int64_t>(r0 + i0) * N + n + 8] = from_float<T>(c[2]);
          if (i1 < m) out[static_cast<int64_t>(r0 + i1) * N + n + 8] = from_float<T>(c[3]);
        }
      }
    }
    __syncthreads();  // red is reused by the next pass
  }
}

struct Launch {
  const int32_t *offsets, *sorted_slots, *active, *num_active;
  int max_active, top_k;
  bool early_prefetch;
};

template <int WK, int WN, int NG, int U, bool SWIGLU>
void launch(const T* a, const at::Tensor& w, const at::Tensor& scale, T* out, const Launch& r, int K, int N,
            cudaStream_t stream) {
  constexpr int cols = WN * NG * (SWIGLU ? 8 : 16);
  const dim3 grid(r.max_active, (N + cols - 1) / cols);
  grouped_gemv_fp8_mma_kernel<WK, WN, NG, U, SWIGLU><<<grid, WK * WN * kWarp, 0, stream>>>(
      a, static_cast<const uint8_t*>(w.data_ptr()), scale.data_ptr<float>(), out, r.offsets, r.sorted_slots,
      r.active, r.num_active, K, N, r.top_k, w.stride(0), scale.stride(0), static_cast<int>(scale.stride(1)),
      r.early_prefetch);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// v3's shape choices (warp tiles: SwiGLU whole-K warps when there are >= 2048 tiles, else K split over 2 or 8
// warps; down chains NG column tiles per warp when there are many).
inline void run_ffn(const T* x, const at::Tensor& w13, const at::Tensor& s13, const at::Tensor& w2,
                    const at::Tensor& s2, T* h, T* y, const Launch& r, int H, int I, cudaStream_t stream) {
  constexpr int U = 2;
  const int64_t tiles13 = int64_t{r.max_active} * ((I + 7) / 8);
  if (tiles13 >= 2048) {
    launch<1, 4, 1, U, true>(x, w13, s13, h, r, H, I, stream);
  } else if (tiles13 >= 768) {
    launch<2, 4, 1, U, true>(x, w13, s13, h, r, H, I, stream);
  } else {
    launch<8, 1, 1, U, true>(x, w13, s13, h, r, H, I, stream);
  }
  const int64_t tiles2 = int64_t{r.max_active} * ((H + 15) / 16);
  if (tiles2 >= 4 * 1536) {
    launch<1, 4, 4, U, false>(h, w2, s2, y, r, I, H, stream);
  } else if (tiles2 >= 2 * 1536) {
    launch<1, 4, 2, U, false>(h, w2, s2, y, r, I, H, stream);
  } else {
    launch<1, 4, 1, U, false>(h, w2, s2, y, r, I, H, stream);
  }
}

}  // namespace fp8mma
}  // namespace longcat
