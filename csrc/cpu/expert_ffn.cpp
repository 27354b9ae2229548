// CPU expert_ffn: per active expert, gather its token rows, SwiGLU with at::mm (same ATen ops and
// dtypes as the reference, so results match it), write the rows in permuted order.
#include <ATen/Parallel.h>

#include <vector>

#include "../ops.h"

namespace longcat {
namespace {

at::Tensor expert_ffn_cpu(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
                          const at::Tensor& expert_offsets, const at::Tensor& sorted_slots, int64_t top_k,
                          const std::optional<at::Tensor>& /*active_experts*/,
                          const std::optional<at::Tensor>& /*num_active*/) {
  check_ffn_args(hidden, w13, w2, expert_offsets, sorted_slots, top_k);
  const int64_t num_slots = sorted_slots.size(0), H = hidden.size(1), I = w2.size(2), E = w13.size(0);
  auto out = at::zeros({num_slots, H}, hidden.options());
  const at::Tensor offsets = expert_offsets.contiguous();
  const int32_t* off = offsets.data_ptr<int32_t>();
  std::vector<int64_t> active;
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(off[e] >= 0 && off[e] <= off[e + 1] && off[e + 1] <= num_slots,
                "expert_ffn: expert_offsets must be non-decreasing within [0, T*k], broken at expert ", e);
    if (off[e + 1] > off[e]) active.push_back(e);
  }
  const at::Tensor tokens = at::floor_divide(sorted_slots.to(at::kLong), top_k);
  // Few rows per expert (decode): one expert per task. Many rows: experts in turn, each mm threaded inside.
  const int64_t rows = off[E];
  const int64_t grain = rows >= 64 * static_cast<int64_t>(active.size()) ? static_cast<int64_t>(active.size()) : 1;
  at::parallel_for(0, static_cast<int64_t>(active.size()), std::max<int64_t>(grain, 1), [&](int64_t b, int64_t e_) {
    for (int64_t a = b; a < e_; ++a) {
      const int64_t e = active[a], start = off[e], end = off[e + 1];
      const at::Tensor x = hidden.index_select(0, tokens.slice(0, start, end));
      const at::Tensor gate_up = at::mm(x, w13[e].t());
      const at::Tensor act = at::silu(gate_up.slice(1, 0, I)) * gate_up.slice(1, I, 2 * I);
      out.slice(0, start, end).copy_(at::mm(act, w2[e].t()));
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(longcat, CPU, m) { m.impl("expert_ffn", &expert_ffn_cpu); }

}  // namespace longcat
