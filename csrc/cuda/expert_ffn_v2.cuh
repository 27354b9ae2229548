// expert_ffn decode GEMV, variant v2 (LONGCAT_FFN_DECODE_KERNEL=v2): same math and launch contract as v1
// (grouped_gemv_kernel in expert_ffn.cu), but more bytes in flight per SM:
//  - WK warps split K inside a block (in-block split-K), their partial sums meet in shared memory and one
//    thread per output applies the epilogue (SiLU(gate) * up for the SwiGLU launch): no workspace, no extra
//    launch. This gives the TP-8 shape (I=256 columns per expert) 8x more warps per expert;
//  - every lane issues U x NW independent 16-byte weight loads before the FMAs that consume them;
//  - a block walks `col_groups` column tiles of one expert, so its prologue (num_active -> active ->
//    offsets -> sorted_slots: a chain of dependent loads) is paid once per several tiles, not per tile.
// Used only when included from expert_ffn.cu (shares its helpers).
#pragma once

#include <algorithm>

#include "common.cuh"

namespace longcat {
namespace v2 {

constexpr int kRows = 2;  // token rows per pass over an expert's weights (decode: ~1-2 rows per hit expert at B <= 64)

__device__ __forceinline__ float silu(float v) { return v / (1.f + __expf(-v)); }

// Block = WK x WN warps; column tile = WN * NR outputs; warp (wn, wk) owns columns tile*WN*NR + wn*NR + [0, NR)
// and K positions (wk*32 + lane)*VEC + j*WK*32*VEC.
template <typename T, int VEC, int NR, int WK, int WN, int U, bool SWIGLU>
__global__ void __launch_bounds__(WK * WN * kWarp, 2)
    grouped_gemv_v2_kernel(const T* __restrict__ a, const T* __restrict__ w, T* __restrict__ out,
                           const int32_t* __restrict__ offsets, const int32_t* __restrict__ sorted_slots,
                           const int32_t* __restrict__ active, const int32_t* __restrict__ num_active, int K, int N,
                           int top_k, int64_t w_expert_stride, int col_groups) {
  constexpr int NW = SWIGLU ? 2 * NR : NR;  // weight rows per warp
  constexpr int STEP = WK * kWarp * VEC;
  __shared__ float red[WK > 1 ? WK : 1][WN][kRows][NW];
  if (static_cast<int>(blockIdx.x) >= num_active[0]) return;  // block-uniform
  const int expert = active[blockIdx.x];
  const int start = offsets[expert], end = offsets[expert + 1];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int wk = warp % WK, wn = warp / WK;
  const int k_first = (wk * kWarp + lane) * VEC;
  for (int cg = 0; cg < col_groups; ++cg) {
  const int tile = blockIdx.y * col_groups + cg;
  if (tile * WN * NR >= N) break;  // block-uniform
  const int n0 = (tile * WN + wn) * NR;
  const T* wrow[NW];
#pragma unroll
  for (int c = 0; c < NR; ++c) {
    const int n = min(n0 + c, N - 1);  // clamp: duplicated columns are computed but not stored
    wrow[c] = w + expert * w_expert_stride + static_cast<int64_t>(n) * K;
    if constexpr (SWIGLU) wrow[NR + c] = wrow[c] + static_cast<int64_t>(N) * K;
  }

  for (int r0 = start; r0 < end; r0 += kRows) {
    const int m = min(kRows, end - r0);
    const T* arow[kRows];
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int r = r0 + min(i, m - 1);
      const int src = SWIGLU ? sorted_slots[r] / top_k : r;
      arow[i] = a + static_cast<int64_t>(src) * K;
    }
    float acc[kRows][NW];
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int c = 0; c < NW; ++c) acc[i][c] = 0.f;

    for (int kb = k_first; kb < K; kb += U * STEP) {
      Vec<T, VEC> wv[U][NW];
#pragma unroll
      for (int u = 0; u < U; ++u) {  // all weight loads of this round first: U * NW requests in flight
        const int k = kb + u * STEP;
        if (k < K) {
#pragma unroll
          for (int c = 0; c < NW; ++c) wv[u][c] = load_vec_stream<T, VEC>(wrow[c] + k);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int k = kb + u * STEP;
        if (k < K) {
#pragma unroll
          for (int i = 0; i < kRows; ++i) {
            if (i < m) {
              const Vec<T, VEC> av = load_vec<T, VEC>(arow[i] + k);
#pragma unroll
              for (int q = 0; q < VEC; ++q) {
                const float x = to_float(av.v[q]);
#pragma unroll
                for (int c = 0; c < NW; ++c) acc[i][c] = fmaf(x, to_float(wv[u][c].v[q]), acc[i][c]);
              }
            }
          }
        }
      }
    }

    if constexpr (WK == 1) {
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        if (i < m) {
#pragma unroll
          for (int c = 0; c < NR; ++c) {
            float v = warp_sum(acc[i][c]);
            if constexpr (SWIGLU) v = silu(v) * warp_sum(acc[i][NR + c]);
            if (lane == c && n0 + c < N) out[static_cast<int64_t>(r0 + i) * N + n0 + c] = from_float<T>(v);
          }
        }
      }
    } else {
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        if (i < m) {
#pragma unroll
          for (int c = 0; c < NW; ++c) {
            const float v = warp_sum(acc[i][c]);
            if (lane == 0) red[wk][wn][i][c] = v;
          }
        }
      }
      __syncthreads();
      // Epilogue: one thread per (warp column group, row, column) sums the WK partials.
      for (int t = threadIdx.x; t < WN * kRows * NR; t += blockDim.x) {
        const int g = t / (kRows * NR), i = (t / NR) % kRows, c = t % NR;
        const int n = (tile * WN + g) * NR + c;
        if (i < m && n < N) {
          float v = 0.f, up = 0.f;
#pragma unroll
          for (int j = 0; j < WK; ++j) {
            v += red[j][g][i][c];
            if constexpr (SWIGLU) up += red[j][g][i][NR + c];
          }
          if constexpr (SWIGLU) v = silu(v) * up;
          out[static_cast<int64_t>(r0 + i) * N + n] = from_float<T>(v);
        }
      }
      __syncthreads();  // red is reused by the next row chunk
    }
  }
  }  // column groups
}

template <typename T, int VEC, int NR, int WK, int WN, int U, bool SWIGLU>
void launch(const T* a, const T* w, T* out, const at::Tensor& offsets, const at::Tensor& sorted_slots,
            const at::Tensor& active, const at::Tensor& num_active, int max_active, int K, int N, int top_k,
            int64_t w_expert_stride, cudaStream_t stream) {
  const int tiles = (N + WN * NR - 1) / (WN * NR);
  // Enough blocks for ~8 per SM over the (upper bound of) active experts, then longer-lived blocks.
  int sms = 132;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const int64_t want = int64_t{tiles} * max_active / (int64_t{sms} * 8);
  const int col_groups = static_cast<int>(std::clamp<int64_t>(want, 1, 8));
  const dim3 grid(max_active, (tiles + col_groups - 1) / col_groups);
  grouped_gemv_v2_kernel<T, VEC, NR, WK, WN, U, SWIGLU><<<grid, WK * WN * kWarp, 0, stream>>>(
      a, w, out, offsets.data_ptr<int32_t>(), sorted_slots.data_ptr<int32_t>(), active.data_ptr<int32_t>(),
      num_active.data_ptr<int32_t>(), K, N, top_k, w_expert_stride, col_groups);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Shapes: SwiGLU K = H (6144) -> 8 warps split K (3 x 16 B per lane per row at H=6144, all issued at once),
// 2 columns per tile.
// Down K = I: I >= 1024 -> 2 warps on K x 4 on N, 4 columns each; small I (TP shards) -> whole warps per
// column group, 8 columns each, so every lane still has 8+ loads in flight.
template <typename T, int VEC>
void run_ffn(const T* x, const T* w13, const T* w2, T* h, T* y, const at::Tensor& offsets,
             const at::Tensor& sorted_slots, const at::Tensor& active, const at::Tensor& num_active, int max_active,
             int H, int I, int top_k, cudaStream_t stream) {
  const int64_t s13 = int64_t{2} * I * H, s2 = int64_t{H} * I;
  if (H >= 2048) {
    launch<T, VEC, 2, 8, 1, 3, true>(x, w13, h, offsets, sorted_slots, active, num_active, max_active, H, I, top_k,
                                     s13, stream);
  } else {
    launch<T, VEC, 2, 2, 4, 2, true>(x, w13, h, offsets, sorted_slots, active, num_active, max_active, H, I, top_k,
                                     s13, stream);
  }
  if (I >= 1024) {
    launch<T, VEC, 4, 2, 4, 2, false>(h, w2, y, offsets, sorted_slots, active, num_active, max_active, I, H, top_k,
                                      s2, stream);
  } else {
    launch<T, VEC, 8, 1, 8, 1, false>(h, w2, y, offsets, sorted_slots, active, num_active, max_active, I, H, top_k,
                                      s2, stream);
  }
}

}  // namespace v2
}  // namespace longcat
