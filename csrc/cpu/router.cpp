// CPU kernels of fomoe::router_logits and its backward: fp32 (fp64) GEMMs of the widened
// operands. The widened copy of a bf16 x is a temporary: the op keeps x itself for backward.
#include <torch/library.h>

#include "checks.h"
#include "router_gemm.h"

namespace fomoe {
namespace {

at::Tensor router_logits_cpu(const at::Tensor& x, const at::Tensor& weight) {
  check_router_logits("router_logits", x, weight);
  return router_logits_widened(x, weight);
}

std::tuple<at::Tensor, at::Tensor> router_logits_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                              const at::Tensor& weight,
                                                              std::array<bool, 2> output_mask) {
  check_router_logits_backward("router_logits_backward", grad, x, weight);
  return router_logits_backward_widened(grad, x, weight, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(fomoe, CPU, m) {
  m.impl("router_logits", &router_logits_cpu);
  m.impl("router_logits_backward", &router_logits_backward_cpu);
}

}  // namespace fomoe
