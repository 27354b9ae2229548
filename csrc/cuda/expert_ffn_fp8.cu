// CUDA expert_ffn_fp8 for few rows per expert (decode): expert_ffn.cu's weight-streaming grouped GEMV with block-FP8
// expert weights (w13 [E, 2I, H] and w2 [E, H, I] in e4m3, fp32 scale per 128 x 128 block), half the HBM bytes.
// Launch 1 (SwiGLU): h[r, n] = silu(x_r . W13[e, n]) * (x_r . W13[e, I + n]), x_r = hidden[sorted_slots[r] / k].
// Launch 2 (down):   y[r, n] = h_r . W2[e, n].       (W = dequantized weight; h stays in hidden's dtype)
// Grid = (max active experts, N tiles); a block past num_active (read on device) exits at once, so each active
// expert's weights are streamed once per chunk of kRows rows. Each warp owns NR output columns (SwiGLU: the gate
// and up rows of each); lanes split K in 16-byte vectors of 16 e4m3 weights, dequantized in registers
// (fp8_common.cuh); each 16-product partial sum is scaled once by its block's scale; fp32 accumulation.
// WK > 1 (narrow experts, e.g. a TP shard's I = 256; expert_ffn_v2.cuh's idea): the block's WK warps split K of
// the same columns and meet in shared memory, so a narrow expert still gets enough warps in flight.
// Rows per pass: at most 2 (an expert with more rows takes several passes over its weights). H200 session 6
// (benchmarks/RESULTS.md): wide experts (I = 2048) at B = 4 / 8 / 16 / 64 reach 0.86 / 0.87 / 0.85 / 0.70 of the
// byte floor with 2-row passes, against 0.70 / 0.60 with 4 / 8-row passes (160-215 registers: half the warps in
// flight) and 0.54 / 0.56 for the tensor-core kernel at B = 16 / 64. Narrow experts (a TP shard's I <= 512) keep
// the tensor-core kernel from kMmaMinTokens tokens (expert_ffn_fp8_mma.cuh: B = 16 / 64 at 266 / 696 us against
// 302 / 958 us here).
#include "../ops.h"
#include "expert_ffn_fp8_mma.cuh"
#include "fp8_common.cuh"

namespace longcat {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kMaxRows = 2;
// I at or below this: SwiGLU launch splits K over the block's 4 warps (expert_ffn.cu's v2 bound).
constexpr int kSplitKMaxIntermediate = 512;
// Tokens a step from which narrow experts (I <= kSplitKMaxIntermediate) take the tensor-core kernel.
constexpr int64_t kMmaMinTokens = 16;

__device__ __forceinline__ float silu(float v) { return v / (1.f + __expf(-v)); }

template <typename T, int NR, int WK, bool SWIGLU, int kRows>
__global__ void __launch_bounds__(kWarpsPerBlock * kWarp)
    grouped_gemv_fp8_kernel(const T* __restrict__ a, const uint8_t* __restrict__ w, const float* __restrict__ scale,
                            T* __restrict__ out, const int32_t* __restrict__ offsets,
                            const int32_t* __restrict__ sorted_slots, const int32_t* __restrict__ active,
                            const int32_t* __restrict__ num_active, int K, int N, int top_k, int64_t w_expert_stride,
                            int64_t s_expert_stride, int s_row_stride) {
  constexpr int WN = kWarpsPerBlock / WK;
  constexpr int NW = SWIGLU ? 2 * NR : NR;  // weight rows per warp
  constexpr int kStep = WK * kWarp * fp8::kVec;
  __shared__ float red[WK][WN][kRows][NW];
  if (static_cast<int>(blockIdx.x) >= num_active[0]) return;  // block-uniform
  const int expert = active[blockIdx.x];
  const int start = offsets[expert], end = offsets[expert + 1];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int wk = warp % WK, wn = warp / WK;
  const int n0 = (blockIdx.y * WN + wn) * NR;
  if (WK == 1 && n0 >= N) return;  // with WK > 1 every warp must reach the barriers (its columns are clamped)
  const uint8_t* wrow[NW];
  const float* srow[NW];
#pragma unroll
  for (int c = 0; c < NR; ++c) {
    const int n = min(n0 + c, N - 1);  // clamp: duplicated columns are computed but not stored
    const int rows[2] = {n, n + N};    // gate row, up row
#pragma unroll
    for (int h = 0; h < (SWIGLU ? 2 : 1); ++h) {
      wrow[h * NR + c] = w + expert * w_expert_stride + static_cast<int64_t>(rows[h]) * K;
      srow[h * NR + c] = scale + expert * s_expert_stride + static_cast<int64_t>(rows[h] >> fp8::kBlockShift) *
                                                               s_row_stride;
    }
  }

  for (int r0 = start; r0 < end; r0 += kRows) {
    const int m = min(kRows, end - r0);
    const T* arow[kRows];
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int r = r0 + min(i, m - 1);
      const int src = SWIGLU ? sorted_slots[r] / top_k : r;  // SwiGLU reads token rows in place (no permute)
      arow[i] = a + static_cast<int64_t>(src) * K;
    }
    float acc[kRows][NW];
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int c = 0; c < NW; ++c) acc[i][c] = 0.f;

#pragma unroll 4
    for (int k = (wk * kWarp + lane) * fp8::kVec; k < K; k += kStep) {
      uint4 wv[NW];
#pragma unroll
      for (int c = 0; c < NW; ++c) wv[c] = fp8::load_w16_stream(wrow[c] + k);
      float sc[NW];
#pragma unroll
      for (int c = 0; c < NW; ++c) sc[c] = __ldg(srow[c] + (k >> fp8::kBlockShift));
      if constexpr (kRows == 1) {  // dequantize on the fly: fewer live registers, more loads in flight
        float xf[fp8::kVec];
        fp8::load_x16<T>(arow[0] + k, xf);
#pragma unroll
        for (int c = 0; c < NW; ++c) {
          float wf[fp8::kVec];
          fp8::dequant16(wv[c], wf);
          acc[0][c] = fmaf(fp8::dot16(xf, wf), sc[c], acc[0][c]);
        }
      } else {  // dequantize each weight vector once for all rows (the same operations per row as above)
        float wf[NW][fp8::kVec];
#pragma unroll
        for (int c = 0; c < NW; ++c) fp8::dequant16(wv[c], wf[c]);
#pragma unroll
        for (int i = 0; i < kRows; ++i) {
          if (i < m) {
            float xf[fp8::kVec];
            fp8::load_x16<T>(arow[i] + k, xf);
#pragma unroll
            for (int c = 0; c < NW; ++c) acc[i][c] = fmaf(fp8::dot16(xf, wf[c]), sc[c], acc[i][c]);
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
      for (int t = threadIdx.x; t < WN * kRows * NR; t += blockDim.x) {  // one thread per (warp tile, row, column)
        const int g = t / (kRows * NR), i = (t / NR) % kRows, c = t % NR;
        const int n = (blockIdx.y * WN + g) * NR + c;
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
}

struct Routing {
  const int32_t *offsets, *sorted_slots, *active, *num_active;
  int max_active, top_k;
  int64_t num_tokens;
};

template <typename T, int NR, int WK, bool SWIGLU>
void launch(const T* a, const at::Tensor& w, const at::Tensor& scale, T* out, const Routing& r, int K, int N,
            cudaStream_t stream) {
  constexpr int WN = kWarpsPerBlock / WK;
  const dim3 grid(r.max_active, (N + WN * NR - 1) / (WN * NR)), block(kWarpsPerBlock * kWarp);
  const auto* wp = static_cast<const uint8_t*>(w.data_ptr());
  const float* sp = scale.data_ptr<float>();
  const int64_t ws = w.stride(0), ss = scale.stride(0);
  const int srs = static_cast<int>(scale.stride(1));
#define LONGCAT_FP8_LAUNCH(ROWS)                                                                             \
  grouped_gemv_fp8_kernel<T, NR, WK, SWIGLU, ROWS><<<grid, block, 0, stream>>>(                             \
      a, wp, sp, out, r.offsets, r.sorted_slots, r.active, r.num_active, K, N, r.top_k, ws, ss, srs)
  // Host-side choice from the token count only (fixed per captured CUDA graph), never from device values.
  if (r.num_tokens <= 1) {
    LONGCAT_FP8_LAUNCH(1);
  } else {
    LONGCAT_FP8_LAUNCH(kMaxRows);
  }
#undef LONGCAT_FP8_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// SwiGLU: NR = 2 (4 weight rows in flight per lane), K split over the block's warps for narrow experts.
// Down: NR = 4; for narrow experts K = I is one or two steps, so whole warps, 8 columns each.
template <typename T>
void run_ffn(const T* x, const at::Tensor& w13, const at::Tensor& s13, const at::Tensor& w2, const at::Tensor& s2,
             T* h, T* y, const Routing& r, int H, int I, cudaStream_t stream) {
  if (I <= kSplitKMaxIntermediate) {
    launch<T, 2, 4, true>(x, w13, s13, h, r, H, I, stream);
    launch<T, 8, 1, false>(h, w2, s2, y, r, I, H, stream);
  } else {
    launch<T, 2, 1, true>(x, w13, s13, h, r, H, I, stream);
    launch<T, 4, 1, false>(h, w2, s2, y, r, I, H, stream);
  }
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

at::Tensor expert_ffn_fp8_cuda(const at::Tensor& hidden_in, const at::Tensor& w13_in, const at::Tensor& w13_scale_in,
                               const at::Tensor& w2_in, const at::Tensor& w2_scale_in, const at::Tensor& expert_offsets,
                               const at::Tensor& sorted_slots_in, int64_t top_k,
                               const std::optional<at::Tensor>& active_in,
                               const std::optional<at::Tensor>& num_active_in) {
  check_ffn_fp8_args(hidden_in, w13_in, w13_scale_in, w2_in, w2_scale_in, expert_offsets, sorted_slots_in, top_k);
  TORCH_CHECK(hidden_in.scalar_type() == at::kBFloat16, "expert_ffn_fp8: CUDA supports bfloat16 hidden, got ",
              hidden_in.scalar_type(), " (other dtypes: the wrapper's reference path)");
  const c10::cuda::CUDAGuard guard(hidden_in.device());
  const at::Tensor hidden = hidden_in.contiguous(), w13 = w13_in.contiguous(), w2 = w2_in.contiguous();
  const at::Tensor s13 = w13_scale_in.contiguous(), s2 = w2_scale_in.contiguous();
  const at::Tensor offsets = expert_offsets.contiguous(), sorted_slots = sorted_slots_in.contiguous();
  const int64_t num_slots = sorted_slots.size(0), H = hidden.size(1), I = w2.size(2), E = w13.size(0);
  auto y = at::zeros({num_slots, H}, hidden.options());  // rows past the last real row stay zero
  if (num_slots == 0 || E == 0) return y;
  TORCH_CHECK(H % fp8::kVec == 0 && I % fp8::kVec == 0,
              "expert_ffn_fp8: CUDA needs H and I multiples of 16 (16-byte weight vectors), got H=", H, " I=", I);
  TORCH_CHECK(aligned16(hidden) && aligned16(w13) && aligned16(w2),
              "expert_ffn_fp8: hidden, w13 and w2 must start at 16-byte aligned addresses");
  at::Tensor active, num_active;
  int64_t max_active = E;
  if (active_in.has_value() && num_active_in.has_value()) {
    active = active_in->contiguous();
    num_active = num_active_in->contiguous();
    TORCH_CHECK(active.scalar_type() == at::kInt && active.numel() == E,
                "expert_ffn_fp8: active_experts must be int32 [", E, "]");
    TORCH_CHECK(num_active.scalar_type() == at::kInt && num_active.numel() == 1,
                "expert_ffn_fp8: num_active must be int32 [1]");
    max_active = std::min<int64_t>(E, num_slots);  // a compact list has at most T*k entries
  } else {  // walk all experts: empty ones exit at once (their row range is empty)
    active = at::arange(E, offsets.options());
    num_active = at::full({1}, E, offsets.options());
  }
  auto h = at::empty({num_slots, I}, hidden.options());
  const Routing routing{offsets.data_ptr<int32_t>(), sorted_slots.data_ptr<int32_t>(), active.data_ptr<int32_t>(),
                        num_active.data_ptr<int32_t>(), static_cast<int>(max_active), static_cast<int>(top_k),
                        hidden.size(0)};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int Hi = static_cast<int>(H), Ii = static_cast<int>(I);
  using T = __nv_bfloat16;
  // Host-side choice from the shapes and the token count (fixed per CUDA graph).
  if (I <= kSplitKMaxIntermediate && hidden.size(0) >= kMmaMinTokens) {
    const fp8mma::Launch mma{routing.offsets, routing.sorted_slots, routing.active, routing.num_active,
                             routing.max_active, routing.top_k, active_in.has_value() && num_active_in.has_value()};
    fp8mma::run_ffn(static_cast<const T*>(hidden.data_ptr()), w13, s13, w2, s2, static_cast<T*>(h.data_ptr()),
                    static_cast<T*>(y.data_ptr()), mma, Hi, Ii, stream);
    return y;
  }
  run_ffn<T>(static_cast<const T*>(hidden.data_ptr()), w13, s13, w2, s2, static_cast<T*>(h.data_ptr()),
             static_cast<T*>(y.data_ptr()), routing, Hi, Ii, stream);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(longcat, CUDA, m) { m.impl("expert_ffn_fp8", &expert_ffn_fp8_cuda); }

}  // namespace longcat
