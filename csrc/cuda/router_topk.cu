// CUDA router: one warp per token. Softmax over E+Z fp32 logits (any width), k rounds of warp argmax on
// probs + bias with the lower index winning ties, weights = unbiased probs * scale, zero_weight summed
// over the zero-expert slots in slot order.
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
