// CUDA router: one warp per token. Softmax over E+Z fp32 logits (any width), k rounds of warp argmax on
// probs + bias with the lower index winning ties, weights = unbiased probs * scale, zero_weight summed
// over the zero-expert slots in slot order.
//
// At T <= kBlockPathMaxTokens, one 256-thread BLOCK per token instead (H200: 5.9 vs 12.0 us per call at T=1, 768
// logits): the logits live in registers (<= 24 per thread), the softmax reductions and each of the k argmax
// rounds are block-wide (warp shuffles + one shared-memory exchange), and after a pick only the thread that owned the
// winner rescans its few elements. A single warp per token spent ~15-19 us at T=1 walking 768 scores 12 times.
#include <cfloat>
#include <climits>

#include "../ops.h"
#include "common.cuh"

namespace longcat {
namespace {

constexpr int kMaxWidth = 6144;

__global__ void router_topk_kernel(const float* __restrict__ logits, const float* __restrict__ bias, int num_tokens,
                                   int width, int top_k, float scale, int num_experts, int32_t* __restrict__ ids,
                                   float* __restrict__ weights, float* __restrict__ zero_weight) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int token = blockIdx.x * (blockDim.x / kWarp) + warp;
  if (token >= num_tokens) return;
  float* probs = smem + warp * 2 * width;
  float* scores = probs + width;
  const float* row = logits + static_cast<int64_t>(token) * width;

  float mx = -FLT_MAX;
  // Unrolled so that many independent loads are in flight (one token per warp is latency-bound).
#pragma unroll 8
  for (int i = lane; i < width; i += kWarp) {
    const float v = row[i];
    probs[i] = v;
    scores[i] = bias[i];
    mx = fmaxf(mx, v);
  }
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  float sum = 0.f;
  for (int i = lane; i < width; i += kWarp) {
    const float e = expf(probs[i] - mx);
    probs[i] = e;
    sum += e;
  }
  sum = warp_sum(sum);
  for (int i = lane; i < width; i += kWarp) {
    const float p = probs[i] / sum;
    probs[i] = p;
    scores[i] += p;  // bias + p: the same single rounding as the reference's probs + bias
  }
  __syncwarp();

  float zsum = 0.f;
  for (int j = 0; j < top_k; ++j) {
    // Each lane scans its strided elements in ascending order; a NaN marks an already taken expert.
    float best = -INFINITY;
    int best_i = INT_MAX;
    for (int i = lane; i < width; i += kWarp) {
      const float s = scores[i];
      if (s > best || (s == best && i < best_i)) {
        best = s;
        best_i = i;
      }
    }
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int oi = __shfl_xor_sync(0xffffffffu, best_i, o);
      if (ob > best || (ob == best && oi < best_i)) {
        best = ob;
        best_i = oi;
      }
    }
    if (best_i == INT_MAX) best_i = 0;  // only reachable with NaN logits
    if (lane == best_i % kWarp) scores[best_i] = NAN;
    if (lane == 0) {
      const float w = probs[best_i] * scale;
      ids[static_cast<int64_t>(token) * top_k + j] = best_i;
      weights[static_cast<int64_t>(token) * top_k + j] = w;
      if (best_i >= num_experts) zsum += w;
    }
    __syncwarp();
  }
  if (lane == 0) zero_weight[token] = zsum;
}

constexpr int kBlockThreads = 256;
constexpr int kBlockWarps = kBlockThreads / kWarp;
constexpr int kBlockPathMaxTokens = 64;

__device__ __forceinline__ bool better(float s, int i, float best, int best_i) {
  return s > best || (s == best && i < best_i);
}

// Block-wide (value, index) argmax, lower index on ties; every thread gets the result.
__device__ __forceinline__ void block_argmax(float& best, int& best_i, float* sv, int* si) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const float ob = __shfl_xor_sync(0xffffffffu, best, o);
    const int oi = __shfl_xor_sync(0xffffffffu, best_i, o);
    if (better(ob, oi, best, best_i)) {
      best = ob;
      best_i = oi;
    }
  }
  if (lane == 0) {
    sv[warp] = best;
    si[warp] = best_i;
  }
  __syncthreads();
  best = sv[0];
  best_i = si[0];
#pragma unroll
  for (int w = 1; w < kBlockWarps; ++w) {
    if (better(sv[w], si[w], best, best_i)) {
      best = sv[w];
      best_i = si[w];
    }
  }
  __syncthreads();  // sv/si are reused by the next call
}

__device__ __forceinline__ float block_reduce(float v, bool is_max, float* sv) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    v = is_max ? fmaxf(v, ov) : v + ov;
  }
  if (lane == 0) sv[warp] = v;
  __syncthreads();
  v = sv[0];
#pragma unroll
  for (int w = 1; w < kBlockWarps; ++w) v = is_max ? fmaxf(v, sv[w]) : v + sv[w];
  __syncthreads();
  return v;
}

// PER = logits per thread (width <= PER * kBlockThreads); element j of thread t is index t + j * kBlockThreads.
template <int PER>
__global__ void __launch_bounds__(kBlockThreads)
    router_topk_block_kernel(const float* __restrict__ logits, const float* __restrict__ bias, int width, int top_k,
                             float scale, int num_experts, int32_t* __restrict__ ids, float* __restrict__ weights,
                             float* __restrict__ zero_weight) {
  __shared__ float sv[kBlockWarps];
  __shared__ int si[kBlockWarps];
  const int token = blockIdx.x, t = threadIdx.x;
  const float* row = logits + static_cast<int64_t>(token) * width;
  float p[PER], sc[PER];
  float mx = -FLT_MAX;
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    const int i = t + j * kBlockThreads;
    p[j] = i < width ? row[i] : -FLT_MAX;
    sc[j] = i < width ? bias[i] : 0.f;
    mx = fmaxf(mx, p[j]);
  }
  mx = block_reduce(mx, true, sv);
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    const int i = t + j * kBlockThreads;
    p[j] = i < width ? expf(p[j] - mx) : 0.f;
    sum += p[j];
  }
  sum = block_reduce(sum, false, sv);
  float best = -INFINITY;
  int best_i = INT_MAX;
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    const int i = t + j * kBlockThreads;
    p[j] = p[j] / sum;
    sc[j] += p[j];  // bias + p: the same single rounding as the reference's probs + bias
    if (i < width && better(sc[j], i, best, best_i)) {
      best = sc[j];
      best_i = i;
    }
  }

  for (int k = 0; k < top_k; ++k) {
    float b = best;
    int bi = best_i;
    block_argmax(b, bi, sv, si);
    if (bi == INT_MAX) bi = 0;  // only reachable with NaN logits
    if (t == bi % kBlockThreads) {  // the owner: mark taken (NaN never wins) and rescan its elements
      best = -INFINITY;
      best_i = INT_MAX;
      float w = 0.f;
#pragma unroll
      for (int j = 0; j < PER; ++j) {  // static indices only: p and sc stay in registers
        const int i = t + j * kBlockThreads;
        if (i == bi) {
          w = p[j] * scale;
          sc[j] = NAN;
        }
        if (i < width && better(sc[j], i, best, best_i)) {
          best = sc[j];
          best_i = i;
        }
      }
      ids[static_cast<int64_t>(token) * top_k + k] = bi;
      weights[static_cast<int64_t>(token) * top_k + k] = w;
    }
  }
  // zero_weight in slot order, as v1 sums it (__syncthreads makes the owners' global writes visible).
  __syncthreads();
  if (t == 0) {
    float z = 0.f;
    for (int k = 0; k < top_k; ++k) {
      const int64_t slot = static_cast<int64_t>(token) * top_k + k;
      if (ids[slot] >= num_experts) z += weights[slot];
    }
    zero_weight[token] = z;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> router_topk_cuda(const at::Tensor& logits_in, const at::Tensor& bias_in,
                                                                int64_t top_k, double routed_scaling_factor,
                                                                int64_t num_experts) {
  const int64_t width = check_router_args(logits_in, bias_in, top_k, num_experts);
  TORCH_CHECK(width <= kMaxWidth, "router_topk: at most ", kMaxWidth, " logits per token on CUDA, got ", width);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.to(at::kFloat).contiguous();
  const at::Tensor bias = bias_in.to(at::kFloat).contiguous();
  const int64_t T = logits.size(0);
  auto ids = at::empty({T, top_k}, logits.options().dtype(at::kInt));
  auto weights = at::empty({T, top_k}, logits.options());
  auto zero_weight = at::empty({T}, logits.options());
  if (T == 0) return {ids, weights, zero_weight};
  if (T <= kBlockPathMaxTokens) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const float sc = static_cast<float>(routed_scaling_factor);
    const int W = static_cast<int>(width), K = static_cast<int>(top_k), E = static_cast<int>(num_experts);
    const dim3 grid(static_cast<unsigned>(T));
    const float* lp = logits.data_ptr<float>();
    const float* bp = bias.data_ptr<float>();
    int32_t* ip = ids.data_ptr<int32_t>();
    float* wp = weights.data_ptr<float>();
    float* zp = zero_weight.data_ptr<float>();
    if (width <= 4 * kBlockThreads) {
      router_topk_block_kernel<4><<<grid, kBlockThreads, 0, stream>>>(lp, bp, W, K, sc, E, ip, wp, zp);
    } else if (width <= 8 * kBlockThreads) {
      router_topk_block_kernel<8><<<grid, kBlockThreads, 0, stream>>>(lp, bp, W, K, sc, E, ip, wp, zp);
    } else {
      router_topk_block_kernel<24><<<grid, kBlockThreads, 0, stream>>>(lp, bp, W, K, sc, E, ip, wp, zp);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {ids, weights, zero_weight};
  }
  const int warps = width <= 1536 ? 4 : 1;  // keep shared memory under the default 48 KB
  const size_t smem = static_cast<size_t>(warps) * 2 * width * sizeof(float);
  const dim3 grid(static_cast<unsigned>((T + warps - 1) / warps));
  router_topk_kernel<<<grid, warps * kWarp, smem, c10::cuda::getCurrentCUDAStream()>>>(
      logits.data_ptr<float>(), bias.data_ptr<float>(), static_cast<int>(T), static_cast<int>(width),
      static_cast<int>(top_k), static_cast<float>(routed_scaling_factor), static_cast<int>(num_experts),
      ids.data_ptr<int32_t>(), weights.data_ptr<float>(), zero_weight.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {ids, weights, zero_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(longcat, CUDA, m) { m.impl("router_topk", &router_topk_cuda); }

}  // namespace longcat
