// CUDA dense_gemv_fp8 for decode batches: out[m, n] = sum_k x[m, k] * w8[n, k] * scale[n / 128, k / 128] for M <= 8
// rows, streaming the e4m3 weight from HBM once (half the bytes of dense_gemv's bf16 weight). The design of
// dense_gemv.cu: the grid covers N tiles; each warp owns NR output columns; lanes split K in 16-byte vectors (here
// 16 weights each, dequantized in registers, fp8_common.cuh); streaming loads for w; fp32 accumulation; warp-shuffle
// reduction. Each 16-weight partial sum is scaled once by its block's scale (read through L1: the scale tensor is
// small and shared by the 128 rows of a block). A row's accumulation order depends only on K and the lane, never on
// M or NR, so row i of an M-row call equals the 1-row call bit for bit. No host sync, CUDA-graph capturable.
// Split-K variant (where auto_split says so; LONGCAT_FP8_GEMV_SPLITK forces it): the S warps of a column group each
// take a contiguous K slice of the same NR columns and their partial sums are added through shared memory in slice
// order: for projections whose N alone gives too few warps to keep the HBM busy (q_a + kv_a: N = 2176).
// Deterministic, and the order depends on K and S only (S from N, K and the SM count, never M), so the row
// property holds within it.
// Tensor-core variant (dense_gemv_fp8_mma_kernel below; use_mma says where): its cost does not grow with M. Each
// variant's sums differ from the others' in order (all within the tests' fp32 bound), so under the default rule
// row i of a 1- or 2-row call (FMA) and of a 3..8-row call (tensor cores) may differ in the last bit.
#include <cstdlib>
#include <cstring>
#include <limits>

#include "../ops.h"
#include "fp8_common.cuh"
#include "fp8_mma_chunk.cuh"

namespace longcat {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kMinBlocksPerSm = 2;  // as dense_gemv.cu: fewer blocks than this per SM at NR=4 -> NR=2

// U consecutive K steps of a lane (a step = the warp's 32 vectors = 512 k): all U * NR weight loads are issued
// before the first FMA. kGuard: the last, partial pass (steps past K reload the last one and add nothing).
template <typename T, int NR, int kRows, int U, bool kGuard>
__device__ __forceinline__ void accumulate_pass(float (&acc)[kRows][NR], const uint8_t* const (&wrow)[NR],
                                                const float* const (&srow)[NR], const T* const (&xrow)[kRows], int k0,
                                                int steps) {
  constexpr int kStep = kWarp * fp8::kVec;
  uint4 wv[U][NR];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int s = kGuard ? min(u, steps - 1) : u;
#pragma unroll
    for (int c = 0; c < NR; ++c) wv[u][c] = fp8::load_w16_stream((wrow[c] + k0) + s * kStep);
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    if (!kGuard || u < steps) {
      const int k = k0 + u * kStep;
      // All NR columns dequantized once, then each row's 16 activations converted once (rows outer).
      float wf[NR][fp8::kVec], sc[NR];
#pragma unroll
      for (int c = 0; c < NR; ++c) {
        sc[c] = __ldg(srow[c] + (k >> fp8::kBlockShift));
        fp8::dequant16(wv[u][c], wf[c]);
      }
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        float xf[fp8::kVec];
        fp8::load_x16<T>(xrow[i] + k, xf);
#pragma unroll
        for (int c = 0; c < NR; ++c) acc[i][c] = fmaf(fp8::dot16(xf, wf[c]), sc[c], acc[i][c]);
      }
    }
  }
}

template <typename T, int NR, int kRows>
__global__ void __launch_bounds__(kWarpsPerBlock * kWarp)
    dense_gemv_fp8_kernel(const T* __restrict__ x, int64_t x_row_stride, const uint8_t* __restrict__ w,
                          int64_t w_row_stride, const float* __restrict__ scale, int64_t s_row_stride,
                          T* __restrict__ out, int M, int N, int K) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int n0 = (blockIdx.x * kWarpsPerBlock + warp) * NR;
  if (n0 >= N) return;
  const uint8_t* wrow[NR];
  const float* srow[NR];
#pragma unroll
  for (int c = 0; c < NR; ++c) {
    const int n = min(n0 + c, N - 1);  // clamp: duplicated columns are computed but not stored
    wrow[c] = w + static_cast<int64_t>(n) * w_row_stride;
    srow[c] = scale + static_cast<int64_t>(n >> fp8::kBlockShift) * s_row_stride;
  }
  const T* xrow[kRows];
#pragma unroll
  for (int i = 0; i < kRows; ++i) xrow[i] = x + static_cast<int64_t>(min(i, M - 1)) * x_row_stride;
  float acc[kRows][NR];
#pragma unroll
  for (int i = 0; i < kRows; ++i)
#pragma unroll
    for (int c = 0; c < NR; ++c) acc[i][c] = 0.f;

  constexpr int kStep = kWarp * fp8::kVec;
  constexpr int U = (kRows <= 2 ? 16 : 8) / NR;
  int k0 = lane * fp8::kVec;
  for (; k0 + (U - 1) * kStep < K; k0 += U * kStep)
    accumulate_pass<T, NR, kRows, U, false>(acc, wrow, srow, xrow, k0, U);
  if (k0 < K) accumulate_pass<T, NR, kRows, U, true>(acc, wrow, srow, xrow, k0, (K - k0 + kStep - 1) / kStep);

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

// Split-K: a block = one group of kSplitNR columns x S warps, warp p summing K slice p (`slice_steps` whole steps;
// the last slice may be shorter or empty). No early return: every warp reaches the barrier.
constexpr int kSplitNR = 4;

template <typename T, int NR, int kRows, int S>
__global__ void __launch_bounds__(S * kWarp)
    dense_gemv_fp8_splitk_kernel(const T* __restrict__ x, int64_t x_row_stride, const uint8_t* __restrict__ w,
                                 int64_t w_row_stride, const float* __restrict__ scale, int64_t s_row_stride,
                                 T* __restrict__ out, int M, int N, int K, int slice_steps) {
  __shared__ float partial[S][kRows][NR];
  const int part = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int n0 = blockIdx.x * NR;
  const uint8_t* wrow[NR];
  const float* srow[NR];
#pragma unroll
  for (int c = 0; c < NR; ++c) {
    const int n = min(n0 + c, N - 1);  // clamp: duplicated columns are computed but not stored
    wrow[c] = w + static_cast<int64_t>(n) * w_row_stride;
    srow[c] = scale + static_cast<int64_t>(n >> fp8::kBlockShift) * s_row_stride;
  }
  const T* xrow[kRows];
#pragma unroll
  for (int i = 0; i < kRows; ++i) xrow[i] = x + static_cast<int64_t>(min(i, M - 1)) * x_row_stride;
  float acc[kRows][NR];
#pragma unroll
  for (int i = 0; i < kRows; ++i)
#pragma unroll
    for (int c = 0; c < NR; ++c) acc[i][c] = 0.f;

  constexpr int kStep = kWarp * fp8::kVec;
  constexpr int U = (kRows <= 2 ? 16 : 8) / NR;
  const int64_t slice = static_cast<int64_t>(slice_steps) * kStep;
  const int k_end = static_cast<int>(min(static_cast<int64_t>(K), (part + 1) * slice));
  int k0 = static_cast<int>(min(static_cast<int64_t>(K), part * slice)) + lane * fp8::kVec;
  for (; k0 + (U - 1) * kStep < k_end; k0 += U * kStep)
    accumulate_pass<T, NR, kRows, U, false>(acc, wrow, srow, xrow, k0, U);
  if (k0 < k_end)
    accumulate_pass<T, NR, kRows, U, true>(acc, wrow, srow, xrow, k0, (k_end - k0 + kStep - 1) / kStep);

#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    if (i < M) {
#pragma unroll
      for (int c = 0; c < NR; ++c) {
        const float v = warp_sum(acc[i][c]);
        if (lane == 0) partial[part][i][c] = v;
      }
    }
  }
  __syncthreads();
  // One thread per (row, column) adds the S slices in slice order.
  static_assert(kRows * NR <= S * kWarp, "one thread per output");
  const int i = threadIdx.x / NR, c = threadIdx.x % NR, n = n0 + c;
  if (i < kRows) {
    if (i < M && n < N) {
      float v = partial[0][i][c];
#pragma unroll
      for (int p = 1; p < S; ++p) v += partial[p][i][c];
      out[static_cast<int64_t>(i) * N + n] = from_float<T>(v);
    }
  }
}

template <typename T, int kRows, int S>
void launch_splitk_rows(const T* xp, int64_t xs, const uint8_t* wp, int64_t ws, const float* sp, int64_t ss, T* op,
                        int M, int N, int K, cudaStream_t stream) {
  const int steps = (K + kWarp * fp8::kVec - 1) / (kWarp * fp8::kVec);
  const int slice_steps = (steps + S - 1) / S;
  const dim3 grid((N + kSplitNR - 1) / kSplitNR), block(S * kWarp);
  dense_gemv_fp8_splitk_kernel<T, kSplitNR, kRows, S>
      <<<grid, block, 0, stream>>>(xp, xs, wp, ws, sp, ss, op, M, N, K, slice_steps);
}

template <typename T, int S>
void launch_splitk(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, at::Tensor& out,
                   cudaStream_t stream) {
  const int M = static_cast<int>(x.size(0)), N = static_cast<int>(w.size(0)), K = static_cast<int>(x.size(1));
  const T* xp = static_cast<const T*>(x.data_ptr());
  const auto* wp = static_cast<const uint8_t*>(w.data_ptr());
  const float* sp = scale.data_ptr<float>();
  T* op = static_cast<T*>(out.data_ptr());
  const int64_t xs = x.stride(0), ws = w.stride(0), ss = scale.stride(0);
  if (M <= 1) {
    launch_splitk_rows<T, 1, S>(xp, xs, wp, ws, sp, ss, op, M, N, K, stream);
  } else if (M <= 2) {
    launch_splitk_rows<T, 2, S>(xp, xs, wp, ws, sp, ss, op, M, N, K, stream);
  } else if (M <= 4) {
    launch_splitk_rows<T, 4, S>(xp, xs, wp, ws, sp, ss, op, M, N, K, stream);
  } else {
    launch_splitk_rows<T, 8, S>(xp, xs, wp, ws, sp, ss, op, M, N, K, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Tensor-core variant (use_mma says where; LONGCAT_FP8_GEMV_MMA forces it): fp8_mma_chunk.cuh's 64-wide chunk (lane
// (g, t): 16 e4m3 of weight rows n0 + g and n0 + g + 8 at k = 64 c + 16 t, 16 bf16 of x row g; exact e4m3 -> bf16;
// 4 x mma.sync m16n8k16 with fp32 accumulation), so a warp owns 16 columns x all M <= 8 rows at once: the FMA
// kernels' M x 16 FMAs per 16 weights (the M = 4 slowdown: issue-bound) become 4 MMAs per 1 KB whatever M is. Each
// 128-block's MMA partial is scaled into an fp32 accumulator. Block = S warps over one 16-column tile, warp p summing
// K slice p (whole 128-blocks), slices added through shared memory in slice order. An output D[n][m] of an MMA
// depends on x row m only, so row i of an M-row call equals the 1-row call bit for bit (S never depends on M).
constexpr int kMmaTile = 16;  // columns per warp (the MMA's M)
constexpr int kMmaU = 4;      // chunks (1 KB of weights per warp each) loaded before the first MMA

template <int S>
__global__ void __launch_bounds__(S * kWarp)
    dense_gemv_fp8_mma_kernel(const __nv_bfloat16* __restrict__ x, int64_t x_row_stride,
                              const uint8_t* __restrict__ w, int64_t w_row_stride, const float* __restrict__ scale,
                              int64_t s_row_stride, __nv_bfloat16* __restrict__ out, int M, int N, int K,
                              int slice_blocks) {
  __shared__ float red[S][4][kWarp];
  const int part = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * kMmaTile;
  const int64_t r_lo = min(n0 + g, N - 1), r_hi = min(n0 + g + 8, N - 1);  // clamp: computed, not stored
  const uint8_t* w_lo = w + r_lo * w_row_stride;
  const uint8_t* w_hi = w + r_hi * w_row_stride;
  const float* s_lo = scale + (r_lo >> fp8::kBlockShift) * s_row_stride;
  const float* s_hi = scale + (r_hi >> fp8::kBlockShift) * s_row_stride;
  const __nv_bfloat16* xrow = g < M ? x + static_cast<int64_t>(g) * x_row_stride : nullptr;  // rows >= M: zeros
  const int C = (K + 63) / 64;  // 64-wide chunks
  const int c_begin = min(C, part * 2 * slice_blocks), c_end = min(C, (part + 1) * 2 * slice_blocks);

  float acc[4] = {0.f, 0.f, 0.f, 0.f}, partial[4] = {0.f, 0.f, 0.f, 0.f};
  for (int c0 = c_begin; c0 < c_end; c0 += kMmaU) {
    fp8mma::Frag f[kMmaU];
#pragma unroll
    for (int u = 0; u < kMmaU; ++u) {
      const int k = 64 * (c0 + u) + 16 * t;
      const bool on = c0 + u < c_end && k < K;  // K % 16 == 0: a lane's 16 k are all in or all out
      const uint4 zero = make_uint4(0, 0, 0, 0);
      f[u].lo = on ? fp8::load_w16_stream(w_lo + k) : zero;
      f[u].hi = on ? fp8::load_w16_stream(w_hi + k) : zero;
      f[u].x0 = on && xrow != nullptr ? v3::ld_keep(xrow + k) : zero;
      f[u].x1 = on && xrow != nullptr ? v3::ld_keep(xrow + k + 8) : zero;
      const int kb = min(c0 + u, C - 1) >> 1;  // the chunk's 128-block
      f[u].slo = __ldg(s_lo + kb);
      f[u].shi = __ldg(s_hi + kb);
    }
#pragma unroll
    for (int u = 0; u < kMmaU; ++u) {
      const int c = c0 + u;
      if (c < c_end) {
        fp8mma::mma_chunk(partial, f[u]);
        if ((c & 1) || c == C - 1) {  // the 128-block ends: scale its partial into the accumulator
          acc[0] = fmaf(partial[0], f[u].slo, acc[0]);
          acc[1] = fmaf(partial[1], f[u].slo, acc[1]);
          acc[2] = fmaf(partial[2], f[u].shi, acc[2]);
          acc[3] = fmaf(partial[3], f[u].shi, acc[3]);
#pragma unroll
          for (int r = 0; r < 4; ++r) partial[r] = 0.f;
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) red[part][r][lane] = acc[r];
  __syncthreads();
  // D fragment: acc[r] of lane (g, t) = column n0 + g + 8 (r >> 1), row 2 t + (r & 1).
  for (int idx = threadIdx.x; idx < 4 * kWarp; idx += S * kWarp) {
    const int r = idx / kWarp, l = idx % kWarp;
    const int n = n0 + (l >> 2) + 8 * (r >> 1), m = 2 * (l & 3) + (r & 1);
    if (m < M && n < N) {
      float v = red[0][r][l];
#pragma unroll
      for (int p = 1; p < S; ++p) v += red[p][r][l];
      out[static_cast<int64_t>(m) * N + n] = __float2bfloat16(v);
    }
  }
}

// The most K slices (of 1, 2, 4, 8; each >= one 128-block) that keep all warps in one wave at kMmaWarpsPerSm
// resident warps per SM (~120 registers a thread: 16). Timed as a whole (use_mma) (S: q_a + kv_a 8, q_b 2, o_proj 4, gate_up
// 1, down 4). A function of N, K and the SM count, never of M.
constexpr int64_t kMmaWarpsPerSm = 16;
int mma_split(int64_t N, int64_t K, int sms) {
  const int64_t tiles = (N + kMmaTile - 1) / kMmaTile, blocks = (K + fp8::kBlock - 1) / fp8::kBlock;
  int s = 1;
  while (s < 8 && tiles * 2 * s <= kMmaWarpsPerSm * sms && 2 * s <= blocks) s *= 2;
  return s;
}

template <int S>
void launch_mma_split(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, at::Tensor& out,
                      cudaStream_t stream) {
  const int M = static_cast<int>(x.size(0)), N = static_cast<int>(w.size(0)), K = static_cast<int>(x.size(1));
  const int blocks = (K + fp8::kBlock - 1) / fp8::kBlock;
  const dim3 grid((N + kMmaTile - 1) / kMmaTile), block(S * kWarp);
  dense_gemv_fp8_mma_kernel<S><<<grid, block, 0, stream>>>(
      static_cast<const __nv_bfloat16*>(x.data_ptr()), x.stride(0), static_cast<const uint8_t*>(w.data_ptr()),
      w.stride(0), scale.data_ptr<float>(), scale.stride(0), static_cast<__nv_bfloat16*>(out.data_ptr()), M, N, K,
      (blocks + S - 1) / S);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_mma(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, at::Tensor& out, int sms,
                cudaStream_t stream) {
  switch (mma_split(w.size(0), x.size(1), sms)) {
    case 1: return launch_mma_split<1>(x, w, scale, out, stream);
    case 2: return launch_mma_split<2>(x, w, scale, out, stream);
    case 4: return launch_mma_split<4>(x, w, scale, out, stream);
    default: return launch_mma_split<8>(x, w, scale, out, stream);
  }
}

// LONGCAT_FP8_GEMV_MMA, read at every call (a CUDA graph keeps what it captured): unset / auto = use_mma's rule,
// 0 = the FMA kernels everywhere, 1 = the tensor-core kernel everywhere (tests, benchmarks). Returns -1 for auto.
int mma_setting() {
  const char* v = std::getenv("LONGCAT_FP8_GEMV_MMA");
  if (v == nullptr || v[0] == '\0' || std::strcmp(v, "auto") == 0) return -1;
  if (std::strcmp(v, "0") == 0) return 0;
  TORCH_CHECK(std::strcmp(v, "1") == 0, "LONGCAT_FP8_GEMV_MMA must be auto, 0 or 1, got '", v, "'");
  return 1;
}

// The tensor-core kernel from 3 rows, and at every row count for short K (q_b: K = 1536, 3 of the FMA kernel's
// 512-wide steps per warp): H200, 2026-12-04 (bench_fp8_kernels.py --sections dense; us, FMA kernel with the split
// rule / tensor cores), q_a+kv_a M=1 6.1/9.1, M=4 10.1/8.8; q_b M=1 10.4/8.9; o_proj M=1 15.9/18.0, M=2 16.7/18.0,
// M=4 22.6/18.1; gate_up M=1 40.2/47.9, M=4 63.8/48.1; down M=1 23.3/26.7, M=4 34.3/26.3. The tensor-core kernel's
// time does not grow with M (it computes 8 rows whatever M is); the FMA kernels' does.
constexpr int64_t kMmaMinRows = 3, kMmaMaxShortK = 2048;
bool use_mma(int64_t M, int64_t K) {
  const int setting = mma_setting();
  if (setting >= 0) return setting == 1;
  return M >= kMmaMinRows || K <= kMmaMaxShortK;
}

template <typename T, int NR>
void launch_rows(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, at::Tensor& out,
                 cudaStream_t stream) {
  const int M = static_cast<int>(x.size(0)), N = static_cast<int>(w.size(0)), K = static_cast<int>(x.size(1));
  const T* xp = static_cast<const T*>(x.data_ptr());
  const auto* wp = static_cast<const uint8_t*>(w.data_ptr());
  const float* sp = scale.data_ptr<float>();
  T* op = static_cast<T*>(out.data_ptr());
  const int cols_per_block = kWarpsPerBlock * NR;
  const dim3 grid((N + cols_per_block - 1) / cols_per_block), block(kWarpsPerBlock * kWarp);
  const int64_t xs = x.stride(0), ws = w.stride(0), ss = scale.stride(0);
  if (M <= 1) {
    dense_gemv_fp8_kernel<T, NR, 1><<<grid, block, 0, stream>>>(xp, xs, wp, ws, sp, ss, op, M, N, K);
  } else if (M <= 2) {
    dense_gemv_fp8_kernel<T, NR, 2><<<grid, block, 0, stream>>>(xp, xs, wp, ws, sp, ss, op, M, N, K);
  } else if (M <= 4) {
    dense_gemv_fp8_kernel<T, NR, 4><<<grid, block, 0, stream>>>(xp, xs, wp, ws, sp, ss, op, M, N, K);
  } else {
    dense_gemv_fp8_kernel<T, NR, 8><<<grid, block, 0, stream>>>(xp, xs, wp, ws, sp, ss, op, M, N, K);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// LONGCAT_FP8_GEMV_SPLITK, read at every call (a CUDA graph keeps what it captured), for the FMA kernels: unset / 1 =
// split K where auto_split says so (the default); 0 = one warp per column group everywhere; 2, 3, 4, 6, 8 = split
// K that many ways on every shape (tests, benchmarks). Returns S (1 = no split) or -1 for auto.
int splitk_setting() {
  const char* v = std::getenv("LONGCAT_FP8_GEMV_SPLITK");
  if (v == nullptr || v[0] == '\0' || std::strcmp(v, "1") == 0) return -1;
  if (std::strcmp(v, "0") == 0) return 1;
  for (const char* forced : {"2", "3", "4", "6", "8"}) {
    if (std::strcmp(v, forced) == 0) return forced[0] - '0';
  }
  TORCH_CHECK(false, "LONGCAT_FP8_GEMV_SPLITK must be 0, 1, 2, 3, 4, 6 or 8, got '", v, "'");
}

// Split only where the plain kernel at NR = 4 would leave fewer than kSplitBelowWarpsPerSm warps per SM (q_a + kv_a:
// 544 column groups on 132 SMs; q_b, o_proj, gate_up and down have >= 1536): the most slices (of 2, 3, 4, 6, 8) that
// keep every warp in one wave at kSplitMaxWarpsPerSm warps per SM (the kRows = 1 kernel's ~98 registers allow ~19)
// and >= kSplitMinSteps steps (512 k each) per slice (q_a + kv_a: S = 3, 4 steps per warp; H200 2026-12-04, M = 1:
// 6.1 us against 6.9 unsplit, forced S = 2 7.8, 4 9.9, 8 11.2); LONGCAT_FP8_GEMV_SPLITK=2..8 forces each. A
// function of N, K and the SM count, never of M.
constexpr int64_t kSplitBelowWarpsPerSm = 8, kSplitMaxWarpsPerSm = 16, kSplitMinSteps = 2;
int auto_split(int64_t N, int64_t K, int sms) {
  const int64_t groups = (N + kSplitNR - 1) / kSplitNR;
  const int64_t steps = (K + kWarp * fp8::kVec - 1) / (kWarp * fp8::kVec);
  if (groups >= kSplitBelowWarpsPerSm * sms) return 1;
  int best = 1;
  for (const int s : {2, 3, 4, 6, 8}) {
    if (groups * s <= kSplitMaxWarpsPerSm * sms && steps >= kSplitMinSteps * s) best = s;
  }
  return best;
}

template <typename T>
void dispatch(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, at::Tensor& out,
              cudaStream_t stream) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  const int64_t N = w.size(0);
  if (use_mma(x.size(0), x.size(1))) return launch_mma(x, w, scale, out, sms, stream);
  int split = splitk_setting();
  if (split < 0) split = auto_split(N, x.size(1), sms);
  switch (split) {
    case 2: return launch_splitk<T, 2>(x, w, scale, out, stream);
    case 3: return launch_splitk<T, 3>(x, w, scale, out, stream);
    case 4: return launch_splitk<T, 4>(x, w, scale, out, stream);
    case 6: return launch_splitk<T, 6>(x, w, scale, out, stream);
    case 8: return launch_splitk<T, 8>(x, w, scale, out, stream);
    default: break;
  }
  const int64_t blocks_at_nr4 = (N + kWarpsPerBlock * 4 - 1) / (kWarpsPerBlock * 4);
  if (blocks_at_nr4 >= int64_t{kMinBlocksPerSm} * sms) {
    launch_rows<T, 4>(x, w, scale, out, stream);
  } else {
    launch_rows<T, 2>(x, w, scale, out, stream);
  }
}

void check_rows_16b(const at::Tensor& t, const char* name) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "dense_gemv_fp8: ", name,
              " must start at a 16-byte aligned address");
  TORCH_CHECK(t.size(0) <= 1 || (t.stride(0) * t.element_size()) % 16 == 0, "dense_gemv_fp8: ", name,
              "'s row stride must be a multiple of 16 bytes, got ", t.stride(0), " elements");
}

at::Tensor dense_gemv_fp8_cuda(const at::Tensor& x, const at::Tensor& w8, const at::Tensor& scale_in) {
  check_dense_gemv_fp8_args(x, w8, scale_in);
  // bf16 only (the model's dtype; every other activation dtype would double the build's kernels): others take the
  // reference path (the Python wrapper's dense_gemv_fp8_supported).
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "dense_gemv_fp8: CUDA supports bfloat16 activations, got ",
              x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), N = w8.size(0), K = x.size(1);
  auto out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  if (K == 0) return out.zero_();
  TORCH_CHECK(K % fp8::kVec == 0, "dense_gemv_fp8: K must be a multiple of 16 (16-byte weight vectors), got ", K);
  TORCH_CHECK(N <= std::numeric_limits<int>::max() && K <= std::numeric_limits<int>::max(),
              "dense_gemv_fp8: N and K must fit in int32");
  check_rows_16b(x, "x");
  check_rows_16b(w8, "w8");
  const at::Tensor scale = scale_in.stride(1) == 1 ? scale_in : scale_in.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch<__nv_bfloat16>(x, w8, scale, out, stream);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(longcat, CUDA, m) { m.impl("dense_gemv_fp8", &dense_gemv_fp8_cuda); }

}  // namespace longcat
