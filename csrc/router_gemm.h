// The router's GEMMs on operands widened to the accumulation dtype (fp32; fp64 for fp64 x):
// fomoe::router_logits and its backward on the CPU, and on CUDA for every x but bf16 (which
// csrc/cuda/router.cpp runs on bf16 pieces instead). Autocast is excluded: these GEMMs must
// not be narrowed, whatever region the op is called from.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <array>
#include <tuple>

#include "checks.h"

namespace fomoe {

inline at::Tensor router_logits_widened(const at::Tensor& x, const at::Tensor& weight) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto acc = accum_dtype(x.scalar_type());
  return at::mm(x.to(acc), weight.to(acc).t());
}

inline std::tuple<at::Tensor, at::Tensor> router_logits_backward_widened(const at::Tensor& grad, const at::Tensor& x,
                                                                         const at::Tensor& weight,
                                                                         std::array<bool, 2> output_mask) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto acc = accum_dtype(x.scalar_type());
  const auto g = grad.to(acc);
  auto grad_x = output_mask[0] ? at::mm(g, weight.to(acc)).to(x.scalar_type()) : at::empty({0}, x.options());
  auto grad_w = output_mask[1] ? at::mm(g.t(), x.to(acc)).to(weight.scalar_type()) : at::empty({0}, weight.options());
  return {grad_x, grad_w};
}

}  // namespace fomoe
