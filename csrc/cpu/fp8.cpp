// CPU block-FP8 ops: dequantize (ops/fp8_reference.py's block_dequant, fp32 math, then the activation dtype), then
// the bf16 path's own math (dense_gemv: fp32 matmul; expert_ffn: the registered expert_ffn kernel), so results match
// the reference. The CPU path exists for CI and for opcheck; it is not meant to be fast.
#include <ATen/core/dispatch/Dispatcher.h>

#include "../ops.h"

namespace longcat {
namespace {

at::Tensor dense_gemv_fp8_cpu(const at::Tensor& x, const at::Tensor& w8, const at::Tensor& scale) {
  check_dense_gemv_fp8_args(x, w8, scale);
  const at::Tensor w = fp8_block_dequant(w8, scale, x.scalar_type());
  return at::mm(x.to(at::kFloat), w.to(at::kFloat).t()).to(x.scalar_type());
}

at::Tensor expert_ffn_fp8_cpu(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w13_scale,
                              const at::Tensor& w2, const at::Tensor& w2_scale, const at::Tensor& expert_offsets,
                              const at::Tensor& sorted_slots, int64_t top_k,
                              const std::optional<at::Tensor>& active_experts,
                              const std::optional<at::Tensor>& num_active) {
  check_ffn_fp8_args(hidden, w13, w13_scale, w2, w2_scale, expert_offsets, sorted_slots, top_k);
  static const auto expert_ffn =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("longcat::expert_ffn", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, int64_t, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&)>();
  return expert_ffn.call(hidden, fp8_block_dequant(w13, w13_scale, hidden.scalar_type()),
                         fp8_block_dequant(w2, w2_scale, hidden.scalar_type()), expert_offsets, sorted_slots, top_k,
                         active_experts, num_active);
}

}  // namespace

TORCH_LIBRARY_IMPL(longcat, CPU, m) {
  m.impl("dense_gemv_fp8", &dense_gemv_fp8_cpu);
  m.impl("expert_ffn_fp8", &expert_ffn_fp8_cpu);
}

}  // namespace longcat
