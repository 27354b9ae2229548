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

}  // namespace longcat
