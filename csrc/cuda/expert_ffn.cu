// CUDA expert_ffn for few rows per expert (decode): weight-streaming grouped GEMV.
// Launch 1 (SwiGLU): h[r, n] = silu(x_r . w13[e, n]) * (x_r . w13[e, I + n]), x_r = hidden[sorted_slots[r] / k].
// Launch 2 (down):   y[r, n] = h_r . w2[e, n].
// Grid = (max active experts, N tiles); a block past num_active (read on device) exits at once, so each
// ACTIVE expert's weights are streamed from HBM exactly once per chunk of kRows rows. Each warp owns NR
// output columns (SwiGLU: gate and up rows of each), lanes split K in 16-byte vectors, fp32 accumulation,
// warp-shuffle reduction. Many rows per expert take the grouped-GEMM path in Python (ops/extension.py).
#include <cstdlib>
#include <cstring>

#include "../ops.h"
#include "common.cuh"
#include "expert_ffn_v2.cuh"
#include "expert_ffn_v3.cuh"

namespace longcat {
namespace {

constexpr int kWarpsPerBlock = 4;
// Token rows of one expert processed per pass over its weights: 8 at most, fewer when the step has fewer tokens
// (an expert never gets more rows than tokens): at batch 1 an 8-row accumulator only costs registers, hence
// occupancy and bytes in flight, for rows that never exist.
constexpr int kMaxRows = 8;

__device__ __forceinline__ float silu(float v) { return v / (1.f + __expf(-v)); }

template <typename T, int VEC, int NR, bool SWIGLU, int kRows>
__global__ void __launch_bounds__(kWarpsPerBlock * kWarp)
    grouped_gemv_kernel(const T* __restrict__ a, const T* __restrict__ w, T* __restrict__ out,
                        const int32_t* __restrict__ offsets, const int32_t* __restrict__ sorted_slots,
                        const int32_t* __restrict__ active, const int32_t* __restrict__ num_active, int K, int N,
                        int top_k, int64_t w_expert_stride) {
  if (static_cast<int>(blockIdx.x) >= num_active[0]) return;
  const int expert = active[blockIdx.x];
  const int start = offsets[expert], end = offsets[expert + 1];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int n0 = (blockIdx.y * kWarpsPerBlock + warp) * NR;
  if (n0 >= N) return;
  constexpr int NW = SWIGLU ? 2 * NR : NR;  // weight rows per warp
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
      const int src = SWIGLU ? sorted_slots[r] / top_k : r;  // SwiGLU reads token rows in place (no permute)
      arow[i] = a + static_cast<int64_t>(src) * K;
    }
    float acc[kRows][NW];
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int c = 0; c < NW; ++c) acc[i][c] = 0.f;

#pragma unroll(kRows <= 2 ? 4 : 2)
    for (int k = lane * VEC; k < K; k += kWarp * VEC) {
      Vec<T, VEC> wv[NW];
#pragma unroll
      for (int c = 0; c < NW; ++c) wv[c] = load_vec_stream<T, VEC>(wrow[c] + k);
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        if (i < m) {
          const Vec<T, VEC> av = load_vec<T, VEC>(arow[i] + k);
#pragma unroll
          for (int q = 0; q < VEC; ++q) {
            const float x = to_float(av.v[q]);
#pragma unroll
            for (int c = 0; c < NW; ++c) acc[i][c] = fmaf(x, to_float(wv[c].v[q]), acc[i][c]);
          }
        }
      }
    }

#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      if (i < m) {
#pragma unroll
        for (int c = 0; c < NR; ++c) {
          const float g = warp_sum(acc[i][c]);
          float v = g;
          if constexpr (SWIGLU) v = silu(g) * warp_sum(acc[i][NR + c]);
          if (lane == c && n0 + c < N) out[static_cast<int64_t>(r0 + i) * N + n0 + c] = from_float<T>(v);
        }
      }
    }
  }
}

template <typename T, int VEC, int NR, bool SWIGLU>
void launch_gemv(const T* a, const T* w, T* out, const at::Tensor& offsets, const at::Tensor& sorted_slots,
                 const at::Tensor& active, const at::Tensor& num_active, int max_active, int K, int N, int top_k,
                 int64_t w_expert_stride, int64_t num_tokens, cudaStream_t stream) {
  const int cols_per_block = kWarpsPerBlock * NR;
  const dim3 grid(max_active, (N + cols_per_block - 1) / cols_per_block);
  const dim3 block(kWarpsPerBlock * kWarp);
  const int32_t *off = offsets.data_ptr<int32_t>(), *slots = sorted_slots.data_ptr<int32_t>();
  const int32_t *act = active.data_ptr<int32_t>(), *nact = num_active.data_ptr<int32_t>();
  // Host-side choice from the token count only (fixed per captured CUDA graph), never from device values.
  if (num_tokens <= 1) {
    grouped_gemv_kernel<T, VEC, NR, SWIGLU, 1><<<grid, block, 0, stream>>>(a, w, out, off, slots, act, nact, K, N,
                                                                            top_k, w_expert_stride);
  } else if (num_tokens <= 2) {
    grouped_gemv_kernel<T, VEC, NR, SWIGLU, 2><<<grid, block, 0, stream>>>(a, w, out, off, slots, act, nact, K, N,
                                                                            top_k, w_expert_stride);
  } else if (num_tokens <= 4) {
    grouped_gemv_kernel<T, VEC, NR, SWIGLU, 4><<<grid, block, 0, stream>>>(a, w, out, off, slots, act, nact, K, N,
                                                                            top_k, w_expert_stride);
  } else {
    grouped_gemv_kernel<T, VEC, NR, SWIGLU, kMaxRows><<<grid, block, 0, stream>>>(a, w, out, off, slots, act, nact, K,
                                                                                   N, top_k, w_expert_stride);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
bool aligned16(const T* p, int64_t row) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && (row * static_cast<int64_t>(sizeof(T))) % 16 == 0;
}

template <typename T, int VEC>
void run_ffn(const T* x, const T* w13, const T* w2, T* h, T* y, const at::Tensor& offsets,
             const at::Tensor& sorted_slots, const at::Tensor& active, const at::Tensor& num_active, int max_active,
             int H, int I, int top_k, int64_t num_tokens, cudaStream_t stream) {
  // SwiGLU: NR=2 -> 4 weight rows (gate+up for 2 columns) in flight per lane; down: NR=4 rows.
  launch_gemv<T, VEC, 2, true>(x, w13, h, offsets, sorted_slots, active, num_active, max_active, H, I, top_k,
                               int64_t{2} * I * H, num_tokens, stream);
  launch_gemv<T, VEC, 4, false>(h, w2, y, offsets, sorted_slots, active, num_active, max_active, I, H, top_k,
                                int64_t{H} * I, num_tokens, stream);
}

// LONGCAT_FFN_DECODE_KERNEL: "auto" (default), "v1", "v2" (expert_ffn_v2.cuh) or "v3" (expert_ffn_v3.cuh). Read at
// every call (cheap), so a process may switch; a CUDA graph keeps the variant it was captured with. auto = v2 for
// narrow experts (I <= 512: tensor-parallel shards), v1 otherwise: on the H200 v2 took 0.77x / 0.95x of v1's time at
// I=256 (B=1 / 64) but 1.16x / 1.24x at I=2048 (benchmarks/RESULTS.md). v3 (tensor-core grouped GEMV) is opt-in
// only; shapes it does not take (fp32, rows not a whole number of 16-byte vectors) run v1.
// auto also takes v3 for wide experts once a step has >= kV3MinTokens tokens (several rows per expert): there a
// helper's H200 run had v3 at 94% / 90% of copy bandwidth at B=64 / 256 against v1's 90% / 57%, while v1 stays
// ahead at B=1..8 (84% / 97% vs 71% / 91%).
constexpr int kV2MaxIntermediate = 512;
constexpr int64_t kV3MinTokens = 32;
enum class DecodeKernel { kV1, kV2, kV3 };
DecodeKernel decode_kernel(int I, int64_t num_tokens) {
  const char* v = std::getenv("LONGCAT_FFN_DECODE_KERNEL");
  if (v == nullptr || v[0] == '\0' || std::strcmp(v, "auto") == 0) {
    if (I <= kV2MaxIntermediate) return DecodeKernel::kV2;
    return num_tokens >= kV3MinTokens ? DecodeKernel::kV3 : DecodeKernel::kV1;
  }
  if (std::strcmp(v, "v1") == 0) return DecodeKernel::kV1;
  if (std::strcmp(v, "v2") == 0) return DecodeKernel::kV2;
  TORCH_CHECK(std::strcmp(v, "v3") == 0, "LONGCAT_FFN_DECODE_KERNEL must be auto, v1, v2 or v3, got '", v, "'");
  return DecodeKernel::kV3;
}

template <typename T>
void dispatch_ffn(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2, at::Tensor& h, at::Tensor& y,
                  const at::Tensor& offsets, const at::Tensor& sorted_slots, const at::Tensor& active,
                  const at::Tensor& num_active, int max_active, bool compact_active, int H, int I, int top_k,
                  cudaStream_t stream) {
  const T* x = static_cast<const T*>(hidden.data_ptr());
  const T* a = static_cast<const T*>(w13.data_ptr());
  const T* b = static_cast<const T*>(w2.data_ptr());
  T* hp = static_cast<T*>(h.data_ptr());
  T* yp = static_cast<T*>(y.data_ptr());
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = aligned16(x, H) && aligned16(a, H) && aligned16(b, I) && aligned16(hp, I);
  const DecodeKernel variant = decode_kernel(I, hidden.size(0));
  if (variant == DecodeKernel::kV3 && v3::kHasMma<T> && vec) {
    v3::run_ffn<T>(x, a, b, hp, yp, offsets, sorted_slots, active, num_active, max_active, H, I, top_k,
                   compact_active, stream);
    return;
  }
  if (variant == DecodeKernel::kV2) {
    if (vec) {
      v2::run_ffn<T, kVec>(x, a, b, hp, yp, offsets, sorted_slots, active, num_active, max_active, H, I, top_k, stream);
    } else {
      v2::run_ffn<T, 1>(x, a, b, hp, yp, offsets, sorted_slots, active, num_active, max_active, H, I, top_k, stream);
    }
    return;
  }
  if (vec) {
    run_ffn<T, kVec>(x, a, b, hp, yp, offsets, sorted_slots, active, num_active, max_active, H, I, top_k,
                     hidden.size(0), stream);
  } else {  // sizes not a multiple of 16 bytes: scalar loads, same kernel
    run_ffn<T, 1>(x, a, b, hp, yp, offsets, sorted_slots, active, num_active, max_active, H, I, top_k,
                  hidden.size(0), stream);
  }
}

at::Tensor expert_ffn_cuda(const at::Tensor& hidden_in, const at::Tensor& w13_in, const at::Tensor& w2_in,
                           const at::Tensor& expert_offsets, const at::Tensor& sorted_slots_in, int64_t top_k,
                           const std::optional<at::Tensor>& active_in, const std::optional<at::Tensor>& num_active_in) {
  check_ffn_args(hidden_in, w13_in, w2_in, expert_offsets, sorted_slots_in, top_k);
  const c10::cuda::CUDAGuard guard(hidden_in.device());
  const at::Tensor hidden = hidden_in.contiguous(), w13 = w13_in.contiguous(), w2 = w2_in.contiguous();
  const at::Tensor offsets = expert_offsets.contiguous(), sorted_slots = sorted_slots_in.contiguous();
  const int64_t num_slots = sorted_slots.size(0), H = hidden.size(1), I = w2.size(2), E = w13.size(0);
  auto y = at::zeros({num_slots, H}, hidden.options());  // rows past the last real row stay zero
  if (num_slots == 0 || E == 0) return y;
  // Without the align outputs, walk all experts: empty ones exit at once.
  at::Tensor active, num_active;
  int64_t max_active = E;
  const bool compact_active = active_in.has_value() && num_active_in.has_value();
  if (active_in.has_value() && num_active_in.has_value()) {
    active = active_in->contiguous();
    num_active = num_active_in->contiguous();
    TORCH_CHECK(active.scalar_type() == at::kInt && active.numel() == E, "expert_ffn: active_experts must be int32 [",
                E, "]");
    TORCH_CHECK(num_active.scalar_type() == at::kInt && num_active.numel() == 1,
                "expert_ffn: num_active must be int32 [1]");
    max_active = std::min<int64_t>(E, num_slots);  // a compact list has at most T*k entries
  } else {
    active = at::arange(E, offsets.options());
    num_active = at::full({1}, E, offsets.options());
  }
  auto h = at::empty({num_slots, I}, hidden.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int Hi = static_cast<int>(H), Ii = static_cast<int>(I), k = static_cast<int>(top_k);
  switch (hidden.scalar_type()) {
    case at::kFloat:
      dispatch_ffn<float>(hidden, w13, w2, h, y, offsets, sorted_slots, active, num_active, static_cast<int>(max_active), compact_active, Hi, Ii, k, stream);
      break;
    case at::kBFloat16:
      dispatch_ffn<__nv_bfloat16>(hidden, w13, w2, h, y, offsets, sorted_slots, active, num_active, static_cast<int>(max_active), compact_active, Hi, Ii,
                                  k, stream);
      break;
    case at::kHalf:
      dispatch_ffn<__half>(hidden, w13, w2, h, y, offsets, sorted_slots, active, num_active, static_cast<int>(max_active), compact_active, Hi, Ii, k,
                           stream);
      break;
    default:
      TORCH_CHECK(false, "expert_ffn: CUDA supports float32, bfloat16 and float16 hidden/weights, got ",
                  hidden.scalar_type());
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(longcat, CUDA, m) { m.impl("expert_ffn", &expert_ffn_cuda); }

}  // namespace longcat
