// CUDA combine: blocks over (token, chunk of H), one output element per thread (a block per whole token
// left too few loads in flight at decode: 40 us at T=1); out[t,h] = sum_j w[t,j] * y[row(t,j), h] in slot order, then
// zero_weight[t] * x[t,h], in fp32 with every product rounded before its add (__fmul_rn/__fadd_rn forbid
// FMA contraction), i.e. exactly the reference's order and rounding.
#include "../ops.h"
#include "common.cuh"

namespace longcat {
namespace {

constexpr int kThreads = 256;

template <typename Y, typename X>
__global__ void combine_kernel(const Y* __restrict__ y, const int32_t* __restrict__ slot_rows,
                               const float* __restrict__ w, const X* __restrict__ x, const float* __restrict__ zw,
                               int top_k, int H, bool add_identity, float* __restrict__ out) {
  const int64_t t = blockIdx.x;
  const int32_t* rows = slot_rows + t * top_k;
  const float* wt = w + t * top_k;
  const int h = blockIdx.y * blockDim.x + threadIdx.x;
  if (h < H) {
    float acc = 0.f;
    for (int j = 0; j < top_k; ++j) {
      const int r = rows[j];
      if (r >= 0) acc = __fadd_rn(acc, __fmul_rn(to_float(y[static_cast<int64_t>(r) * H + h]), wt[j]));
    }
    if (add_identity) acc = __fadd_rn(acc, __fmul_rn(zw[t], to_float(x[t * H + h])));
    out[t * H + h] = acc;
  }
}

at::Tensor combine_cuda(const at::Tensor& expert_out_in, const at::Tensor& slot_rows_in,
                        const at::Tensor& topk_weights_in, const at::Tensor& hidden_in,
                        const at::Tensor& zero_weight_in, bool add_identity) {
  check_combine_args(expert_out_in, slot_rows_in, topk_weights_in, hidden_in, zero_weight_in);
  const c10::cuda::CUDAGuard guard(hidden_in.device());
  const int64_t T = topk_weights_in.size(0), k = topk_weights_in.size(1), H = hidden_in.size(1);
  const at::Tensor y = expert_out_in.contiguous(), x = hidden_in.contiguous(), rows = slot_rows_in.contiguous();
  const at::Tensor w = topk_weights_in.to(at::kFloat).contiguous(), zw = zero_weight_in.to(at::kFloat).contiguous();
  auto out = at::empty({T, H}, x.options().dtype(at::kFloat));
  if (T == 0 || H == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "combine_cuda_y", [&] {
    using YT = typename CudaType<scalar_t>::type;
    const YT* yp = reinterpret_cast<const YT*>(y.data_ptr<scalar_t>());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "combine_cuda_x", [&] {
      using XT = typename CudaType<scalar_t>::type;
      const dim3 grid(static_cast<unsigned>(T), static_cast<unsigned>((H + kThreads - 1) / kThreads));
      combine_kernel<YT, XT><<<grid, kThreads, 0, stream>>>(
          yp, rows.data_ptr<int32_t>(), w.data_ptr<float>(), reinterpret_cast<const XT*>(x.data_ptr<scalar_t>()),
          zw.data_ptr<float>(), static_cast<int>(k), static_cast<int>(H), add_identity, out.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(longcat, CUDA, m) { m.impl("combine", &combine_cuda); }

}  // namespace longcat
