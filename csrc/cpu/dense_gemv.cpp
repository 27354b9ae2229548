// CPU dense_gemv: the reference's own ATen ops (fp32 matmul, then a cast to x's dtype), so it matches it.
#include "../ops.h"

namespace longcat {
namespace {

at::Tensor dense_gemv_cpu(const at::Tensor& x, const at::Tensor& w) {
  check_dense_gemv_args(x, w);
  return at::mm(x.to(at::kFloat), w.to(at::kFloat).t()).to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(longcat, CPU, m) { m.impl("dense_gemv", &dense_gemv_cpu); }

}  // namespace longcat
