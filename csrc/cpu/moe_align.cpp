// CPU moe_align: a stable counting sort of the real-expert slots by expert id.
#include "../ops.h"

namespace longcat {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_align_cpu(const at::Tensor& topk_ids_in,
                                                                                     int64_t num_experts) {
  check_align_args(topk_ids_in, num_experts);
  const at::Tensor ids = topk_ids_in.to(at::kInt).contiguous();
  const int64_t num_slots = ids.numel();
  auto opts = ids.options().dtype(at::kInt);
  auto offsets = at::zeros({num_experts + 1}, opts);
  auto sorted_slots = at::full({num_slots}, -1, opts);
  auto slot_rows = at::full({num_slots}, -1, opts);
  auto active = at::full({num_experts}, -1, opts);
  auto num_active = at::zeros({1}, opts);
  const int32_t* idp = ids.data_ptr<int32_t>();
  int32_t* off = offsets.data_ptr<int32_t>();
  int32_t* sorted = sorted_slots.data_ptr<int32_t>();
  int32_t* rows = slot_rows.data_ptr<int32_t>();
  int32_t* act = active.data_ptr<int32_t>();

  // O(T*k) and memory-bound: a single thread is faster than any parallel split at these sizes.
  for (int64_t s = 0; s < num_slots; ++s) {
    const int32_t e = idp[s];
    TORCH_CHECK(e >= 0, "moe_align: topk_ids must be >= 0, got ", e, " at slot ", s);
    if (e < num_experts) ++off[e + 1];
  }
  int32_t n_active = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    if (off[e + 1] > 0) act[n_active++] = static_cast<int32_t>(e);
    off[e + 1] += off[e];
  }
  num_active.data_ptr<int32_t>()[0] = n_active;
  std::vector<int32_t> cursor(off, off + num_experts);
  for (int64_t s = 0; s < num_slots; ++s) {  // ascending s keeps each expert's rows in slot order
    const int32_t e = idp[s];
    if (e >= num_experts) continue;
    const int32_t row = cursor[e]++;
    sorted[row] = static_cast<int32_t>(s);
    rows[s] = row;
  }
  return {offsets, sorted_slots, slot_rows, active, num_active};
}

}  // namespace

TORCH_LIBRARY_IMPL(longcat, CPU, m) { m.impl("moe_align", &moe_align_cpu); }

}  // namespace longcat
