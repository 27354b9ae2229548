// CUDA dense_gemv for decode batches: out[m, n] = x_m . w_n for M <= 8 rows, streaming w from HBM once.
// The dense twin of expert_ffn.cu's grouped_gemv_kernel: the grid covers N tiles only; each warp owns NR output
// columns, lanes split K in 16-byte vectors (streaming loads for w, which is read exactly once; the few x rows are
// read by every warp and stay in L1/L2), fp32 accumulation, warp-shuffle reduction. A row's accumulation order
// depends only on K and the lane, never on M or NR, so row i of an M-row call equals the 1-row call bit for bit.
// The grid and template choices use shapes and the SM count only: no host sync, CUDA-graph capturable.
#include <limits>

#include "../ops.h"
#include "common.cuh"

namespace longcat {
namespace {

constexpr int kWarpsPerBlock = 4;
// Below this many blocks per SM with 4 columns per warp, use 2 (twice the blocks): at N = 2112 (fused q_a+kv_a)
// NR=4 would give one 4-warp block per SM, too few loads in flight to approach the HBM rate.
constexpr int kMinBlocksPerSm = 2;

// One pass over U consecutive K steps of a lane (a step is the warp's 32 vectors): all U * NR weight loads are
// issued before the first FMA, so a warp keeps U * NR * 512 bytes in flight even with few warps per SM. kGuard is
// only for the last, partial pass (steps past K add nothing); full passes address w with immediate offsets.
// All kRows rows are computed (rows past M repeat row M-1 and are not stored): a branch per row would split the
// loads from each other. Each accumulator adds its terms in ascending k, whatever U, NR and kRows are.
template <typename T, int VEC, int NR, int kRows, int U, bool kGuard>
__device__ __forceinline__ void accumulate_pass(float (&acc)[kRows][NR], const T* const (&wrow)[NR],
                                                const T* const (&xrow)[kRows], int k0, int steps) {
  constexpr int kStep = kWarp * VEC;
  Vec<T, VEC> wv[U][NR];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int s = kGuard ? min(u, steps - 1) : u;  // last pass: steps past K reload the last one (and add nothing)
#pragma unroll
    for (int c = 0; c < NR; ++c) wv[u][c] = load_vec_stream<T, VEC>((wrow[c] + k0) + s * kStep);
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    if (!kGuard || u < steps) {
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const Vec<T, VEC> xv = load_vec<T, VEC>((xrow[i] + k0) + u * kStep);
#pragma unroll
        for (int q = 0; q < VEC; ++q) {
          const float xq = to_float(xv.v[q]);
#pragma unroll
          for (int c = 0; c < NR; ++c) acc[i][c] = fmaf(xq, to_float(wv[u][c].v[q]), acc[i][c]);
        }
      }
    }
  }
}

template <typename T, int VEC, int NR, int kRows>
__global__ void __launch_bounds__(kWarpsPerBlock * kWarp)
    dense_gemv_kernel(const T* __restrict__ x, int64_t x_row_stride, const T* __restrict__ w, int64_t w_row_stride,
                      T* __restrict__ out, int M, int N, int K) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int n0 = (blockIdx.x * kWarpsPerBlock + warp) * NR;
  if (n0 >= N) return;
  const T* wrow[NR];
#pragma unroll
  for (int c = 0; c < NR; ++c) {
    const int n = min(n0 + c, N - 1);  // clamp: duplicated columns are computed but not stored
    wrow[c] = w + static_cast<int64_t>(n) * w_row_stride;
  }
  const T* xrow[kRows];
#pragma unroll
  for (int i = 0; i < kRows; ++i) xrow[i] = x + static_cast<int64_t>(min(i, M - 1)) * x_row_stride;
  float acc[kRows][NR];
#pragma unroll
  for (int i = 0; i < kRows; ++i)
#pragma unroll
    for (int c = 0; c < NR; ++c) acc[i][c] = 0.f;

  constexpr int kStep = kWarp * VEC;
  constexpr int U = (kRows <= 2 ? 16 : 8) / NR;  // U * NR weight vectors per lane per pass: fewer with more rows
  int k0 = lane * VEC;
  for (; k0 + (U - 1) * kStep < K; k0 += U * kStep) accumulate_pass<T, VEC, NR, kRows, U, false>(acc, wrow, xrow, k0, U);
  if (k0 < K) accumulate_pass<T, VEC, NR, kRows, U, true>(acc, wrow, xrow, k0, (K - k0 + kStep - 1) / kStep);

#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    if (i < M) {
#pragma unroll
      for (int c = 0; c < NR; ++c) {
        const float v = warp_sum(acc[i][c]);
        if (lane == c && n0 + c < N) out[static_cast<int64_t>(i) * N + n0 + c] = from_float<T>(v);
      }
    }
  }
}

template <typename T, int VEC, int NR>
void launch_rows(const T* x, int64_t x_row_stride, const T* w, int64_t w_row_stride, T* out, int M, int N, int K,
                 cudaStream_t stream) {
  const int cols_per_block = kWarpsPerBlock * NR;
  const dim3 grid((N + cols_per_block - 1) / cols_per_block), block(kWarpsPerBlock * kWarp);
  // Smallest row count >= M: at batch 1 an 8-row accumulator would only cost registers (hence loads in flight).
  if (M <= 1) {
    dense_gemv_kernel<T, VEC, NR, 1><<<grid, block, 0, stream>>>(x, x_row_stride, w, w_row_stride, out, M, N, K);
  } else if (M <= 2) {
    dense_gemv_kernel<T, VEC, NR, 2><<<grid, block, 0, stream>>>(x, x_row_stride, w, w_row_stride, out, M, N, K);
  } else if (M <= 4) {
    dense_gemv_kernel<T, VEC, NR, 4><<<grid, block, 0, stream>>>(x, x_row_stride, w, w_row_stride, out, M, N, K);
  } else {
    dense_gemv_kernel<T, VEC, NR, 8><<<grid, block, 0, stream>>>(x, x_row_stride, w, w_row_stride, out, M, N, K);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void dispatch_gemv(const at::Tensor& x, const at::Tensor& w, at::Tensor& out, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int M = static_cast<int>(x.size(0)), N = static_cast<int>(w.size(0)), K = static_cast<int>(x.size(1));
  int sms = 0;  // a cheap attribute query (no sync, fine during graph capture)
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  const int64_t blocks_at_nr4 = (N + kWarpsPerBlock * 4 - 1) / (kWarpsPerBlock * 4);
  const T* xp = static_cast<const T*>(x.data_ptr());
  const T* wp = static_cast<const T*>(w.data_ptr());
  T* op = static_cast<T*>(out.data_ptr());
  if (blocks_at_nr4 >= int64_t{kMinBlocksPerSm} * sms) {
    launch_rows<T, kVec, 4>(xp, x.stride(0), wp, w.stride(0), op, M, N, K, stream);
  } else {
    launch_rows<T, kVec, 2>(xp, x.stride(0), wp, w.stride(0), op, M, N, K, stream);
  }
}

// Whole 16-byte vectors only: each row starts 16-byte aligned (base pointer and, with more than one row, row stride).
void check_vector_rows(const at::Tensor& t, const char* name) {
  const int64_t elem = t.element_size();
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "dense_gemv: ", name,
              " must start at a 16-byte aligned address; use F.linear");
  TORCH_CHECK(t.size(0) <= 1 || (t.stride(0) * elem) % 16 == 0, "dense_gemv: ", name,
              "'s row stride must be a multiple of 16 bytes, got ", t.stride(0), " elements; use F.linear");
}

at::Tensor dense_gemv_cuda(const at::Tensor& x, const at::Tensor& w) {
  check_dense_gemv_args(x, w);
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "dense_gemv: CUDA supports float32, bfloat16 and float16, got ", dtype);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1);
  auto out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  TORCH_CHECK((K * x.element_size()) % 16 == 0, "dense_gemv: K must be a multiple of ", 16 / x.element_size(),
              " for ", x.scalar_type(), " (16-byte vectors), got ", K, "; use F.linear");
  check_vector_rows(x, "x");
  check_vector_rows(w, "w");
  TORCH_CHECK(N <= std::numeric_limits<int>::max() && K <= std::numeric_limits<int>::max(),
              "dense_gemv: N and K must fit in int32, got ", N, " and ", K);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  switch (dtype) {
    case at::kFloat:
      dispatch_gemv<float>(x, w, out, stream);
      break;
    case at::kBFloat16:
      dispatch_gemv<__nv_bfloat16>(x, w, out, stream);
      break;
    case at::kHalf:
      dispatch_gemv<__half>(x, w, out, stream);
      break;
    default:
      break;  // rejected above
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(longcat, CUDA, m) { m.impl("dense_gemv", &dense_gemv_cuda); }

}  // namespace longcat
