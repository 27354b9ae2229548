// CPU combine: fp32 weighted sum of each token's expert rows in slot order, then the identity term.
// Built with -ffp-contract=off so each product is rounded before the add, exactly like the reference.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "../ops.h"

namespace longcat {
namespace {

at::Tensor combine_cpu(const at::Tensor& expert_out_in, const at::Tensor& slot_rows_in,
                       const at::Tensor& topk_weights_in, const at::Tensor& hidden_in,
                       const at::Tensor& zero_weight_in, bool add_identity) {
  check_combine_args(expert_out_in, slot_rows_in, topk_weights_in, hidden_in, zero_weight_in);
  const int64_t T = topk_weights_in.size(0), k = topk_weights_in.size(1), H = hidden_in.size(1);
  const int64_t num_rows = expert_out_in.size(0);
  const at::Tensor y = expert_out_in.contiguous(), x = hidden_in.contiguous();
  const at::Tensor rows = slot_rows_in.contiguous();
  const at::Tensor w = topk_weights_in.to(at::kFloat).contiguous(), zw = zero_weight_in.to(at::kFloat).contiguous();
  auto out = at::empty({T, H}, x.options().dtype(at::kFloat));
  const int32_t* rp = rows.data_ptr<int32_t>();
  const float* wp = w.data_ptr<float>();
  const float* zp = zw.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t s = 0; s < T * k; ++s) {
    TORCH_CHECK(rp[s] < num_rows, "combine: slot_rows[", s, "] = ", rp[s], " is past expert_out's ", num_rows, " rows");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "combine_cpu_y", [&] {
    using y_t = scalar_t;
    const y_t* yp = y.data_ptr<y_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "combine_cpu_x", [&] {
      const scalar_t* xp = x.data_ptr<scalar_t>();
      at::parallel_for(0, T, 8, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          float* o = op + t * H;
          for (int64_t h = 0; h < H; ++h) o[h] = 0.f;
          for (int64_t j = 0; j < k; ++j) {
            const int32_t r = rp[t * k + j];
            if (r < 0) continue;  // zero-expert slot: handled by the identity term
            const float wj = wp[t * k + j];
            const y_t* yr = yp + r * H;
            for (int64_t h = 0; h < H; ++h) o[h] += static_cast<float>(yr[h]) * wj;
          }
          if (add_identity) {
            const float z = zp[t];
            const scalar_t* xr = xp + t * H;
            for (int64_t h = 0; h < H; ++h) o[h] += z * static_cast<float>(xr[h]);
          }
        }
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(longcat, CPU, m) { m.impl("combine", &combine_cpu); }

}  // namespace longcat
