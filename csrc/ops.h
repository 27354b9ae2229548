// Shared declarations of the longcat ops (schemas live in bindings.cpp; the spec is
// longcat_service/ops/reference.py). Argument checks are shared by the CPU and CUDA kernels.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <tuple>

namespace longcat {

// Validates router_topk inputs; returns E+Z.
int64_t check_router_args(const at::Tensor& logits, const at::Tensor& correction_bias, int64_t top_k,
                          int64_t num_experts);
void check_align_args(const at::Tensor& topk_ids, int64_t num_experts);
void check_ffn_args(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
                    const at::Tensor& expert_offsets, const at::Tensor& sorted_slots, int64_t top_k);
void check_combine_args(const at::Tensor& expert_out, const at::Tensor& slot_rows, const at::Tensor& topk_weights,
                        const at::Tensor& hidden, const at::Tensor& zero_weight);
// dense_gemv: x [M, K] with M <= kDenseGemvMaxRows, w [N, K], one dtype and device, unit last strides. The CUDA
// kernel further needs rows of whole 16-byte vectors, 16-byte aligned (dense_gemv.cu checks those).
constexpr int64_t kDenseGemvMaxRows = 8;
void check_dense_gemv_args(const at::Tensor& x, const at::Tensor& w);

// Block FP8 (spec: longcat_service/ops/fp8_reference.py): w8 float8_e4m3fn [..., N, K] with an fp32 scale
// [..., ceil(N/128), ceil(K/128)] (a multiplier per 128 x 128 block), unit last strides.
constexpr int64_t kFp8Block = 128;
void check_fp8_weight(const char* op, const char* name, const at::Tensor& w8, const at::Tensor& scale);
// dense_gemv_fp8: x [M <= kDenseGemvMaxRows, K] floating point, w8 [N, K] e4m3 + scale, one device.
void check_dense_gemv_fp8_args(const at::Tensor& x, const at::Tensor& w8, const at::Tensor& scale);
// expert_ffn_fp8: expert_ffn's contract with w13 [E, 2I, H] / w2 [E, H, I] in e4m3 and their block scales.
void check_ffn_fp8_args(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w13_scale,
                        const at::Tensor& w2, const at::Tensor& w2_scale, const at::Tensor& expert_offsets,
                        const at::Tensor& sorted_slots, int64_t top_k);
// The dequantized weight (fp32 math, then `dtype`): the CPU ops' path.
at::Tensor fp8_block_dequant(const at::Tensor& w8, const at::Tensor& scale, at::ScalarType dtype);

}  // namespace longcat
