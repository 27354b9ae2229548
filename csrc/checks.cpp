// Input validation shared by every backend: errors name the offending argument.
#include "ops.h"

#include <vector>

namespace longcat {

int64_t check_router_args(const at::Tensor& logits, const at::Tensor& correction_bias, int64_t top_k,
                          int64_t num_experts) {
  TORCH_CHECK(logits.dim() == 2, "router_topk: logits must be 2-D [T, E+Z], got shape ", logits.sizes());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "router_topk: logits must be floating point, got ",
              logits.scalar_type());
  const int64_t width = logits.size(1);
  TORCH_CHECK(correction_bias.dim() == 1 && correction_bias.size(0) == width,
              "router_topk: correction_bias must have shape [", width, "], got ", correction_bias.sizes());
  TORCH_CHECK(correction_bias.device() == logits.device(), "router_topk: correction_bias is on ",
              correction_bias.device(), " but logits are on ", logits.device());
  TORCH_CHECK(top_k >= 1 && top_k <= width, "router_topk: top_k must be in [1, ", width, "], got ", top_k);
  TORCH_CHECK(num_experts >= 0 && num_experts <= width, "router_topk: num_experts must be in [0, ", width,
              "], got ", num_experts);
  return width;
}

void check_align_args(const at::Tensor& topk_ids, int64_t num_experts) {
  TORCH_CHECK(topk_ids.dim() == 2, "moe_align: topk_ids must be 2-D [T, k], got shape ", topk_ids.sizes());
  TORCH_CHECK(topk_ids.scalar_type() == at::kInt || topk_ids.scalar_type() == at::kLong,
              "moe_align: topk_ids must be int32 or int64, got ", topk_ids.scalar_type());
  TORCH_CHECK(num_experts >= 1, "moe_align: num_experts must be >= 1, got ", num_experts);
}

void check_ffn_args(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
                    const at::Tensor& expert_offsets, const at::Tensor& sorted_slots, int64_t top_k) {
  TORCH_CHECK(hidden.dim() == 2, "expert_ffn: hidden must be 2-D [T, H], got shape ", hidden.sizes());
  TORCH_CHECK(w13.dim() == 3, "expert_ffn: w13 must be 3-D [E, 2I, H], got shape ", w13.sizes());
  TORCH_CHECK(w2.dim() == 3, "expert_ffn: w2 must be 3-D [E, H, I], got shape ", w2.sizes());
  const int64_t E = w13.size(0), H = hidden.size(1), I = w2.size(2);
  TORCH_CHECK(w13.size(1) == 2 * I && w13.size(2) == H, "expert_ffn: w13 must have shape [", E, ", ", 2 * I, ", ",
              H, "], got ", w13.sizes());
  TORCH_CHECK(w2.size(0) == E && w2.size(1) == H, "expert_ffn: w2 must have shape [", E, ", ", H, ", ", I,
              "], got ", w2.sizes());
  TORCH_CHECK(w13.scalar_type() == hidden.scalar_type() && w2.scalar_type() == hidden.scalar_type(),
              "expert_ffn: hidden, w13 and w2 must share one dtype, got ", hidden.scalar_type(), ", ",
              w13.scalar_type(), ", ", w2.scalar_type());
  TORCH_CHECK(expert_offsets.dim() == 1 && expert_offsets.size(0) == E + 1 && expert_offsets.scalar_type() == at::kInt,
              "expert_offsets must be int32 [", E + 1, "], got ", expert_offsets.scalar_type(), " ",
              expert_offsets.sizes());
  TORCH_CHECK(sorted_slots.dim() == 1 && sorted_slots.scalar_type() == at::kInt,
              "expert_ffn: sorted_slots must be int32 [T*k], got ", sorted_slots.scalar_type(), " ",
              sorted_slots.sizes());
  TORCH_CHECK(top_k >= 1, "expert_ffn: top_k must be >= 1, got ", top_k);
  TORCH_CHECK(sorted_slots.size(0) == hidden.size(0) * top_k, "expert_ffn: sorted_slots must have T*k = ",
              hidden.size(0) * top_k, " entries, got ", sorted_slots.size(0));
  for (const auto* t : {&w13, &w2, &expert_offsets, &sorted_slots}) {
    TORCH_CHECK(t->device() == hidden.device(), "expert_ffn: all tensors must be on ", hidden.device(),
                ", got one on ", t->device());
  }
}

void check_combine_args(const at::Tensor& expert_out, const at::Tensor& slot_rows, const at::Tensor& topk_weights,
                        const at::Tensor& hidden, const at::Tensor& zero_weight) {
  TORCH_CHECK(topk_weights.dim() == 2, "combine: topk_weights must be 2-D [T, k], got shape ", topk_weights.sizes());
  TORCH_CHECK(hidden.dim() == 2 && hidden.size(0) == topk_weights.size(0),
              "combine: hidden must be [T, H] with T = ", topk_weights.size(0), ", got ", hidden.sizes());
  const int64_t T = topk_weights.size(0), k = topk_weights.size(1), H = hidden.size(1);
  TORCH_CHECK(expert_out.dim() == 2 && expert_out.size(1) == H, "combine: expert_out must be [rows, ", H,
              "], got ", expert_out.sizes());
  TORCH_CHECK(slot_rows.numel() == T * k && slot_rows.scalar_type() == at::kInt,
              "combine: slot_rows must be int32 with T*k = ", T * k, " entries, got ", slot_rows.scalar_type(), " ",
              slot_rows.sizes());
  TORCH_CHECK(zero_weight.dim() == 1 && zero_weight.size(0) == T, "combine: zero_weight must be [", T, "], got ",
              zero_weight.sizes());
  TORCH_CHECK(at::isFloatingType(expert_out.scalar_type()) && at::isFloatingType(hidden.scalar_type()),
              "combine: expert_out and hidden must be floating point");
  for (const auto* t : {&expert_out, &slot_rows, &topk_weights, &zero_weight}) {
    TORCH_CHECK(t->device() == hidden.device(), "combine: all tensors must be on ", hidden.device(),
                ", got one on ", t->device());
  }
}

void check_dense_gemv_args(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2, "dense_gemv: x must be 2-D [M, K], got shape ", x.sizes());
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1), "dense_gemv: w must be [N, ", x.size(1), "], got shape ",
              w.sizes());
  TORCH_CHECK(x.size(0) <= kDenseGemvMaxRows, "dense_gemv: at most ", kDenseGemvMaxRows, " rows, got ", x.size(0),
              " (use F.linear)");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "dense_gemv: x and w must share one dtype, got ", x.scalar_type(),
              " and ", w.scalar_type());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "dense_gemv: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(w.device() == x.device(), "dense_gemv: w is on ", w.device(), " but x is on ", x.device());
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) <= 1, "dense_gemv: x needs a unit last stride, got strides ", x.strides());
  TORCH_CHECK(w.stride(1) == 1 || w.size(1) <= 1, "dense_gemv: w needs a unit last stride, got strides ", w.strides());
}

void check_fp8_weight(const char* op, const char* name, const at::Tensor& w8, const at::Tensor& scale) {
  TORCH_CHECK(w8.scalar_type() == at::kFloat8_e4m3fn, op, ": ", name, " must be float8_e4m3fn, got ",
              w8.scalar_type());
  TORCH_CHECK(w8.dim() == 2 || w8.dim() == 3, op, ": ", name, " must be 2-D or 3-D, got shape ", w8.sizes());
  std::vector<int64_t> want(w8.sizes().begin(), w8.sizes().end());
  const int64_t d = w8.dim();
  want[d - 2] = (want[d - 2] + kFp8Block - 1) / kFp8Block;
  want[d - 1] = (want[d - 1] + kFp8Block - 1) / kFp8Block;
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.sizes() == at::IntArrayRef(want), op, ": ", name,
              "'s scale must be float32 ", at::IntArrayRef(want), ", got ", scale.scalar_type(), " ", scale.sizes());
  TORCH_CHECK(scale.device() == w8.device(), op, ": ", name, "'s scale is on ", scale.device(), " but ", name,
              " is on ", w8.device());
  TORCH_CHECK(w8.stride(d - 1) == 1 || w8.size(d - 1) <= 1, op, ": ", name, " needs a unit last stride, got strides ",
              w8.strides());
}

void check_dense_gemv_fp8_args(const at::Tensor& x, const at::Tensor& w8, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2, "dense_gemv_fp8: x must be 2-D [M, K], got shape ", x.sizes());
  TORCH_CHECK(w8.dim() == 2 && w8.size(1) == x.size(1), "dense_gemv_fp8: w8 must be [N, ", x.size(1),
              "], got shape ", w8.sizes());
  check_fp8_weight("dense_gemv_fp8", "w8", w8, scale);
  TORCH_CHECK(x.size(0) <= kDenseGemvMaxRows, "dense_gemv_fp8: at most ", kDenseGemvMaxRows, " rows, got ",
              x.size(0));
  TORCH_CHECK(at::isFloatingType(x.scalar_type()) && x.element_size() >= 2,
              "dense_gemv_fp8: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(w8.device() == x.device(), "dense_gemv_fp8: w8 is on ", w8.device(), " but x is on ", x.device());
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) <= 1, "dense_gemv_fp8: x needs a unit last stride, got strides ",
              x.strides());
}

void check_ffn_fp8_args(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w13_scale,
                        const at::Tensor& w2, const at::Tensor& w2_scale, const at::Tensor& expert_offsets,
                        const at::Tensor& sorted_slots, int64_t top_k) {
  TORCH_CHECK(w13.dim() == 3, "expert_ffn_fp8: w13 must be 3-D [E, 2I, H], got shape ", w13.sizes());
  TORCH_CHECK(w2.dim() == 3, "expert_ffn_fp8: w2 must be 3-D [E, H, I], got shape ", w2.sizes());
  check_fp8_weight("expert_ffn_fp8", "w13", w13, w13_scale);
  check_fp8_weight("expert_ffn_fp8", "w2", w2, w2_scale);
  TORCH_CHECK(at::isFloatingType(hidden.scalar_type()) && hidden.element_size() >= 2,
              "expert_ffn_fp8: hidden must be float32, bfloat16 or float16, got ", hidden.scalar_type());
  TORCH_CHECK(hidden.dim() == 2, "expert_ffn_fp8: hidden must be 2-D [T, H], got shape ", hidden.sizes());
  const int64_t E = w13.size(0), H = hidden.size(1), I = w2.size(2);
  TORCH_CHECK(w13.size(1) == 2 * I && w13.size(2) == H, "expert_ffn_fp8: w13 must have shape [", E, ", ", 2 * I,
              ", ", H, "], got ", w13.sizes());
  TORCH_CHECK(w2.size(0) == E && w2.size(1) == H, "expert_ffn_fp8: w2 must have shape [", E, ", ", H, ", ", I,
              "], got ", w2.sizes());
  TORCH_CHECK(expert_offsets.dim() == 1 && expert_offsets.size(0) == E + 1 && expert_offsets.scalar_type() == at::kInt,
              "expert_ffn_fp8: expert_offsets must be int32 [", E + 1, "], got ", expert_offsets.scalar_type(), " ",
              expert_offsets.sizes());
  TORCH_CHECK(sorted_slots.dim() == 1 && sorted_slots.scalar_type() == at::kInt,
              "expert_ffn_fp8: sorted_slots must be int32 [T*k], got ", sorted_slots.scalar_type(), " ",
              sorted_slots.sizes());
  TORCH_CHECK(top_k >= 1, "expert_ffn_fp8: top_k must be >= 1, got ", top_k);
  TORCH_CHECK(sorted_slots.size(0) == hidden.size(0) * top_k, "expert_ffn_fp8: sorted_slots must have T*k = ",
              hidden.size(0) * top_k, " entries, got ", sorted_slots.size(0));
  for (const auto* t : {&w13, &w2, &expert_offsets, &sorted_slots}) {
    TORCH_CHECK(t->device() == hidden.device(), "expert_ffn_fp8: all tensors must be on ", hidden.device(),
                ", got one on ", t->device());
  }
}

at::Tensor fp8_block_dequant(const at::Tensor& w8, const at::Tensor& scale, at::ScalarType dtype) {
  const int64_t d = w8.dim(), n = w8.size(d - 2), k = w8.size(d - 1);
  const at::Tensor full = scale.repeat_interleave(kFp8Block, d - 2)
                              .repeat_interleave(kFp8Block, d - 1)
                              .narrow(d - 2, 0, n)
                              .narrow(d - 1, 0, k);
  return (w8.to(at::kFloat) * full).to(dtype);
}

}  // namespace longcat
