// CPU router: softmax over E+Z logits, top-k on (probs + correction bias), weights = probs * scale.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../ops.h"

namespace longcat {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> router_topk_cpu(const at::Tensor& logits_in,
                                                               const at::Tensor& bias_in, int64_t top_k,
                                                               double routed_scaling_factor, int64_t num_experts) {
  const int64_t width = check_router_args(logits_in, bias_in, top_k, num_experts);
  const at::Tensor logits = logits_in.to(at::kFloat).contiguous();
  const at::Tensor bias = bias_in.to(at::kFloat).contiguous();
  const int64_t T = logits.size(0);
  auto ids = at::empty({T, top_k}, logits.options().dtype(at::kInt));
  auto weights = at::empty({T, top_k}, logits.options());
  auto zero_weight = at::empty({T}, logits.options());
  const float* lp = logits.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  int32_t* ip = ids.data_ptr<int32_t>();
  float* wp = weights.data_ptr<float>();
  float* zp = zero_weight.data_ptr<float>();
  const float scale = static_cast<float>(routed_scaling_factor);

  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> probs(width), scores(width);
    std::vector<char> taken(width);
    for (int64_t t = begin; t < end; ++t) {
      const float* row = lp + t * width;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < width; ++i) mx = std::max(mx, row[i]);
      float sum = 0.f;
      for (int64_t i = 0; i < width; ++i) {
        probs[i] = std::exp(row[i] - mx);
        sum += probs[i];
      }
      for (int64_t i = 0; i < width; ++i) {
        probs[i] /= sum;
        scores[i] = probs[i] + bp[i];
      }
      std::fill(taken.begin(), taken.end(), 0);
      float zsum = 0.f;
      // k rounds of argmax; strict '>' keeps the lower index on ties (= a stable descending sort).
      for (int64_t j = 0; j < top_k; ++j) {
        int64_t best = -1;
        for (int64_t i = 0; i < width; ++i) {
          if (!taken[i] && (best < 0 || scores[i] > scores[best])) best = i;
        }
        taken[best] = 1;
        const float w = probs[best] * scale;
        ip[t * top_k + j] = static_cast<int32_t>(best);
        wp[t * top_k + j] = w;
        if (best >= num_experts) zsum += w;
      }
      zp[t] = zsum;
    }
  });
  return {ids, weights, zero_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(longcat, CPU, m) { m.impl("router_topk", &router_topk_cpu); }

}  // namespace longcat
