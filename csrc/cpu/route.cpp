// CPU kernels of fomoe::route and fomoe::route_backward (math in fp32, fp64 for fp64 logits).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "checks.h"

namespace fomoe {
namespace {

template <typename acc_t>
acc_t sigmoid(acc_t v) {
  return acc_t(1) / (acc_t(1) + std::exp(-v));
}

std::tuple<at::Tensor, at::Tensor> route_cpu(const at::Tensor& logits_in, int64_t top_k, c10::string_view score_name,
                                             bool renormalize) {
  check_route(logits_in, top_k);
  const Score score = parse_score(score_name);
  const auto logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1), k = top_k;
  const auto acc = accum_dtype(logits.scalar_type());
  auto weights = at::empty({T, k}, logits.options().dtype(acc));
  auto ids = at::empty({T, k}, logits.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "fomoe_route_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = logits.data_ptr<scalar_t>();
    acc_t* w = weights.data_ptr<acc_t>();
    int32_t* id = ids.data_ptr<int32_t>();
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> row(E);
      std::vector<int32_t> order(E);
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t e = 0; e < E; ++e) row[e] = static_cast<acc_t>(in[t * E + e]);
        std::iota(order.begin(), order.end(), 0);
        // Higher logit first (NaN ranks highest, as in torch.topk, and keeps the order a strict
        // weak ordering); ties go to the lower expert id. Both scores are monotone in the logit.
        auto key = [&](int32_t e) { return std::isnan(row[e]) ? std::numeric_limits<acc_t>::infinity() : row[e]; };
        std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
          const acc_t ka = key(a), kb = key(b);
          return ka > kb || (ka == kb && a < b);
        });
        acc_t* wt = w + t * k;
        if (score == Score::Softmax) {
          const acc_t mx = row[order[0]];
          acc_t denom = 0;
          if (renormalize) {
            for (int64_t s = 0; s < k; ++s) denom += std::exp(row[order[s]] - mx);
          } else {
            for (int64_t e = 0; e < E; ++e) denom += std::exp(row[e] - mx);
          }
          for (int64_t s = 0; s < k; ++s) wt[s] = std::exp(row[order[s]] - mx) / denom;
        } else {
          acc_t total = 0;
          for (int64_t s = 0; s < k; ++s) {
            wt[s] = sigmoid(row[order[s]]);
            total += wt[s];
          }
          if (renormalize)
            for (int64_t s = 0; s < k; ++s) wt[s] /= total;
        }
        for (int64_t s = 0; s < k; ++s) id[t * k + s] = order[s];
      }
    });
  });
  return {weights, ids};
}

at::Tensor route_backward_cpu(const at::Tensor& grad_weights_in, const at::Tensor& logits_in,
                              const at::Tensor& weights_in, const at::Tensor& ids_in, c10::string_view score_name,
                              bool renormalize) {
  check_route_backward(grad_weights_in, logits_in, weights_in, ids_in);
  const Score score = parse_score(score_name);
  const auto logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1), k = ids_in.size(1);
  const auto acc = accum_dtype(logits.scalar_type());
  const auto gw_t = grad_weights_in.to(acc).contiguous();
  const auto w_t = weights_in.to(acc).contiguous();
  const auto ids = ids_in.contiguous();
  auto grad = at::zeros({T, E}, logits.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "fomoe_route_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = logits.data_ptr<scalar_t>();
    const acc_t* gw = gw_t.data_ptr<acc_t>();
    const acc_t* w = w_t.data_ptr<acc_t>();
    const int32_t* id = ids.data_ptr<int32_t>();
    acc_t* g = grad.data_ptr<acc_t>();
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const acc_t* gwt = gw + t * k;
        const acc_t* wt = w + t * k;
        const int32_t* idt = id + t * k;
        acc_t* gt = g + t * E;
        for (int64_t s = 0; s < k; ++s)
          FOMOE_CHECK(idt[s] >= 0 && idt[s] < E, "fomoe.route_backward: expert id ", idt[s], " out of range [0, ", E, ")");
        acc_t dot = 0;  // sum_s grad_w[s] * w[s]
        for (int64_t s = 0; s < k; ++s) dot += gwt[s] * wt[s];
        if (score == Score::Softmax && renormalize) {
          // w = softmax over the selected logits.
          for (int64_t s = 0; s < k; ++s) gt[idt[s]] = wt[s] * (gwt[s] - dot);
        } else if (score == Score::Softmax) {
          // w = p[ids] with p the softmax over all experts: grad = p * (scatter(grad_w) - dot).
          acc_t mx = -std::numeric_limits<acc_t>::infinity();
          for (int64_t e = 0; e < E; ++e) mx = std::max(mx, static_cast<acc_t>(in[t * E + e]));
          acc_t denom = 0;
          for (int64_t e = 0; e < E; ++e) denom += std::exp(static_cast<acc_t>(in[t * E + e]) - mx);
          for (int64_t e = 0; e < E; ++e) gt[e] = -dot * std::exp(static_cast<acc_t>(in[t * E + e]) - mx) / denom;
          for (int64_t s = 0; s < k; ++s) gt[idt[s]] += wt[s] * gwt[s];
        } else {
          // Sigmoid: w = sig[ids] (/ sum over the selected when renormalised).
          acc_t total = 0;
          for (int64_t s = 0; s < k; ++s) total += sigmoid(static_cast<acc_t>(in[t * E + idt[s]]));
          for (int64_t s = 0; s < k; ++s) {
            const acc_t sg = sigmoid(static_cast<acc_t>(in[t * E + idt[s]]));
            const acc_t grad_sig = renormalize ? (gwt[s] - dot) / total : gwt[s];
            gt[idt[s]] = grad_sig * sg * (acc_t(1) - sg);
          }
        }
      }
    });
  });
  return grad.to(logits.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fomoe, CPU, m) {
  m.impl("route", &route_cpu);
  m.impl("route_backward", &route_backward_cpu);
}

}  // namespace fomoe
