// Autograd of the fomoe ops, one formula per op for every device: each forward runs the op
// below the autograd key and saves what its backward needs; each backward calls the ops
// that compute its gradients (the *_backward ops, or the forward ops in transposed roles).
// In C++ rather than Python because a training step runs these once per MoE layer and
// direction: a Python autograd wrapper costs tens of microseconds of host time per call,
// as much as the kernels of a small layer.
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

#include "checks.h"
#include "op_handle.h"

namespace fomoe {
namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ---- the ops the formulas call ------------------------------------------------------------

using RouterLogitsSig = Tensor(const Tensor&, const Tensor&);
using RouterLogitsBackwardSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                           std::array<bool, 2>);
using RouteSig = std::tuple<Tensor, Tensor>(const Tensor&, int64_t, c10::string_view, bool);
using RouteBackwardSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, c10::string_view, bool);
using RowsSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const OptionalTensor&);  // gather, combine
using GateGradSig = Tensor(const Tensor&, const Tensor&, const Tensor&);
using GroupedSig = Tensor(const Tensor&, const Tensor&, const Tensor&);  // grouped_mm, grouped_mm_wgrad
using ExpertFfnSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                const Tensor&, const Tensor&, const Tensor&, bool);
using ExpertFfnBackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, std::optional<at::ScalarType>);
using RotarySig = Tensor(const Tensor&, const Tensor&, const Tensor&, bool);
using RmsNormSig = std::tuple<Tensor, Tensor>(const Tensor&, const OptionalTensor&, const Tensor&, double,
                                              std::optional<at::ScalarType>);
using RmsNormBackwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptionalTensor&, const Tensor&,
                                                              const Tensor&, double, std::optional<at::ScalarType>);

// Each handle is looked up at its first call (the library is fully registered by then).
#define FOMOE_OP(fn, Sig, name)                      \
  const c10::TypedOperatorHandle<Sig>& fn() {        \
    static const auto handle = op_handle<Sig>(name); \
    return handle;                                   \
  }
FOMOE_OP(router_logits_op, RouterLogitsSig, "fomoe::router_logits")
FOMOE_OP(router_logits_backward_op, RouterLogitsBackwardSig, "fomoe::router_logits_backward")
FOMOE_OP(route_op, RouteSig, "fomoe::route")
FOMOE_OP(route_backward_op, RouteBackwardSig, "fomoe::route_backward")
FOMOE_OP(gather_op, RowsSig, "fomoe::gather")
FOMOE_OP(combine_op, RowsSig, "fomoe::combine")
FOMOE_OP(combine_gate_grad_op, GateGradSig, "fomoe::combine_gate_grad")
FOMOE_OP(grouped_mm_op, GroupedSig, "fomoe::grouped_mm")
FOMOE_OP(grouped_mm_wgrad_op, GroupedSig, "fomoe::grouped_mm_wgrad")
FOMOE_OP(expert_ffn_op, ExpertFfnSig, "fomoe::expert_ffn")
FOMOE_OP(expert_ffn_backward_op, ExpertFfnBackwardSig, "fomoe::expert_ffn_backward")
FOMOE_OP(rotary_op, RotarySig, "fomoe::rotary")
FOMOE_OP(rms_norm_op, RmsNormSig, "fomoe::rms_norm")
FOMOE_OP(rms_norm_backward_op, RmsNormBackwardSig, "fomoe::rms_norm_backward")
#undef FOMOE_OP

OptionalTensor optional(const Tensor& t) { return t.defined() ? OptionalTensor(t) : std::nullopt; }
bool present(const OptionalTensor& t) { return t.has_value() && t->defined(); }

// ---- formulas -------------------------------------------------------------------------------

struct RouterLogits : torch::autograd::Function<RouterLogits> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto logits = router_logits_op().call(x, weight);
    ctx->save_for_backward({x, weight});
    return {logits};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const std::array<bool, 2> needed{ctx->needs_input_grad(0), ctx->needs_input_grad(1)};
    auto [grad_x, grad_weight] = router_logits_backward_op().call(grads[0], saved[0], saved[1], needed);
    return {needed[0] ? grad_x : Tensor(), needed[1] ? grad_weight : Tensor()};
  }
};

struct Route : torch::autograd::Function<Route> {
  static variable_list forward(AutogradContext* ctx, const Tensor& logits, int64_t top_k, c10::string_view score,
                               bool renormalize) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [weights, ids] = route_op().call(logits, top_k, score, renormalize);
    ctx->save_for_backward({logits, weights, ids});
    ctx->saved_data["score"] = std::string(score);
    ctx->saved_data["renormalize"] = renormalize;
    ctx->mark_non_differentiable({ids});
    ctx->set_materialize_grads(false);
    return {weights, ids};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(4);
    const auto saved = ctx->get_saved_variables();
    auto grad_logits = route_backward_op().call(grads[0].contiguous(), saved[0], saved[1], saved[2],
                                                ctx->saved_data["score"].toStringRef(),
                                                ctx->saved_data["renormalize"].toBool());
    return {grad_logits, Tensor(), Tensor(), Tensor()};
  }
};

// gather and combine are each other's adjoint; the optional per-assignment weights get
// combine_gate_grad (a row dot product) in both.
struct Gather : torch::autograd::Function<Gather> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& permutation,
                               const Tensor& inverse, const OptionalTensor& scale) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto rows = gather_op().call(x, permutation, inverse, scale);
    const bool scaled = present(scale);
    ctx->save_for_backward({scaled ? x : Tensor(), permutation, inverse, scaled ? *scale : Tensor()});
    return {rows};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &permutation = saved[1], &inverse = saved[2], &scale = saved[3];
    Tensor grad_x, grad_scale;
    if (ctx->needs_input_grad(0)) grad_x = combine_op().call(grads[0], permutation, inverse, optional(scale));
    if (scale.defined() && ctx->needs_input_grad(3))
      grad_scale = combine_gate_grad_op().call(x, grads[0], inverse).to(scale.scalar_type());
    return {grad_x, Tensor(), Tensor(), grad_scale};
  }
};

struct Combine : torch::autograd::Function<Combine> {
  static variable_list forward(AutogradContext* ctx, const Tensor& rows, const Tensor& permutation,
                               const Tensor& inverse, const OptionalTensor& gate) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto y = combine_op().call(rows, permutation, inverse, gate);
    const bool weighted = present(gate);
    ctx->save_for_backward({weighted ? rows : Tensor(), permutation, inverse, weighted ? *gate : Tensor()});
    return {y};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &rows = saved[0], &permutation = saved[1], &inverse = saved[2], &gate = saved[3];
    Tensor grad_rows, grad_gate;
    if (ctx->needs_input_grad(0)) grad_rows = gather_op().call(grads[0], permutation, inverse, optional(gate));
    if (gate.defined() && ctx->needs_input_grad(3))
      grad_gate = combine_gate_grad_op().call(grads[0], rows, inverse).to(gate.scalar_type());
    return {grad_rows, Tensor(), Tensor(), grad_gate};
  }
};

struct GroupedMm : torch::autograd::Function<GroupedMm> {
  static variable_list forward(AutogradContext* ctx, const Tensor& a, const Tensor& b, const Tensor& offsets) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto out = grouped_mm_op().call(a, b, offsets);
    ctx->save_for_backward({a, b, offsets});
    return {out};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &a = saved[0], &b = saved[1], &offsets = saved[2];
    Tensor grad_a, grad_b;
    if (ctx->needs_input_grad(0)) grad_a = grouped_mm_op().call(grads[0], b.transpose(1, 2), offsets);
    if (ctx->needs_input_grad(1)) grad_b = grouped_mm_wgrad_op().call(a, grads[0], offsets);
    return {grad_a, grad_b, Tensor()};
  }
};

constexpr int kExpertFfnInputs = 8;  // x, permutation, offsets, inverse, w13, w2, gate, save_for_backward

// Weights of another dtype than x (fp32 master weights under autocast) are cast here, below
// autograd: the cast copies serve the forward and the backward's dgrad GEMMs, and the backward
// writes the weight gradients in the weights' own dtype straight from its fp32 accumulators
// (a cast node in the graph would round them to x's dtype and widen them again in one more pass).
struct ExpertFfn : torch::autograd::Function<ExpertFfn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& permutation,
                               const Tensor& offsets, const Tensor& inverse, const Tensor& w13_in,
                               const Tensor& w2_in, const Tensor& gate, bool save_for_backward) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    check_expert_weight_dtypes(w13_in, w2_in);  // before the casts below make them agree
    const auto as_x = [&](const Tensor& w) { return w.scalar_type() == x.scalar_type() ? w : w.to(x.scalar_type()); };
    const Tensor w13 = as_x(w13_in), w2 = as_x(w2_in);
    auto [y, h] = expert_ffn_op().call(x, permutation, offsets, inverse, w13, w2, gate, save_for_backward);
    ctx->save_for_backward({x, permutation, offsets, inverse, w13, w2, gate, h});
    ctx->saved_data["saved_h"] = save_for_backward;
    ctx->saved_data["weight_dtype"] = static_cast<int64_t>(w13_in.scalar_type());
    // h is the backward's saved state, not a differentiable result: without these two lines
    // autograd would hand the backward a materialised zero gradient for it, a [T*k, 2*d_ff]
    // fill every step (as much memory as h, and a fixed cost skip-token cannot cut).
    ctx->mark_non_differentiable({h});
    ctx->set_materialize_grads(false);
    return {y, h};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(kExpertFfnInputs);  // only h was used: no gradient
    TORCH_CHECK(ctx->saved_data["saved_h"].toBool(),
                "fomoe.expert_ffn was called with save_for_backward=False; call it through fomoe.ops.expert_ffn "
                "(which decides) or pass True to differentiate it");
    const auto s = ctx->get_saved_variables();
    auto [grad_x, grad_w13, grad_w2, grad_gate] =
        expert_ffn_backward_op().call(grads[0].contiguous(), s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7],
                                      static_cast<at::ScalarType>(ctx->saved_data["weight_dtype"].toInt()));
    return {grad_x, Tensor(), Tensor(), Tensor(), grad_w13, grad_w2, grad_gate, Tensor()};
  }
};

// A rotation's adjoint is the rotation by the negated angle: the backward is the same op.
// The tables are constants (no gradient).
struct Rotary : torch::autograd::Function<Rotary> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& cos, const Tensor& sin,
                               bool inverse) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({cos, sin});
    ctx->saved_data["inverse"] = inverse;
    return {rotary_op().call(x, cos, sin, inverse)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto grad_x = rotary_op().call(grads[0], saved[0], saved[1], !ctx->saved_data["inverse"].toBool());
    return {grad_x, Tensor(), Tensor(), Tensor()};
  }
};

// The sum's gradient is the residual stream's plus the norm's; x and delta both get it (delta in
// its own dtype, written by the same kernel when that differs from x's). The backward
// recomputes the row scales from s, which is saved (x itself when there is no delta).
struct RmsNorm : torch::autograd::Function<RmsNorm> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptionalTensor& delta,
                               const Tensor& weight, double eps, std::optional<at::ScalarType> out_dtype) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [s, normed] = rms_norm_op().call(x, delta, weight, eps, out_dtype);
    const bool has_delta = present(delta);
    ctx->save_for_backward({has_delta ? s : x, weight});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["delta_dtype"] = has_delta ? static_cast<int64_t>(delta->scalar_type()) : int64_t{-1};
    if (!has_delta) ctx->mark_non_differentiable({s});  // an empty placeholder: s is x
    ctx->set_materialize_grads(false);
    return {s, normed};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &s = saved[0], &weight = saved[1];
    const int64_t delta_code = ctx->saved_data["delta_dtype"].toInt();
    const bool has_delta = delta_code >= 0;
    const auto delta_t = static_cast<at::ScalarType>(delta_code);
    const Tensor& grad_sum = grads[0];
    if (!grads[1].defined()) {  // only the sum was used: the residual path alone
      const bool to_delta = has_delta && grad_sum.defined();
      return {grad_sum, to_delta ? grad_sum.to(delta_t) : Tensor(), Tensor(), Tensor(), Tensor()};
    }
    const bool separate = has_delta && delta_t != s.scalar_type();
    auto [grad_s, grad_delta, grad_weight] = rms_norm_backward_op().call(
        grads[1], has_delta ? optional(grad_sum) : std::nullopt, s, weight, ctx->saved_data["eps"].toDouble(),
        separate ? std::optional<at::ScalarType>(delta_t) : std::nullopt);
    return {grad_s, has_delta ? (separate ? grad_delta : grad_s) : Tensor(), grad_weight, Tensor(), Tensor()};
  }
};

// ---- the Autograd kernels (the schema's signatures) -----------------------------------------

Tensor router_logits_autograd(const Tensor& x, const Tensor& weight) { return RouterLogits::apply(x, weight)[0]; }

std::tuple<Tensor, Tensor> route_autograd(const Tensor& logits, int64_t top_k, c10::string_view score,
                                          bool renormalize) {
  auto out = Route::apply(logits, top_k, score, renormalize);
  return {out[0], out[1]};
}

Tensor gather_autograd(const Tensor& x, const Tensor& permutation, const Tensor& inverse,
                       const OptionalTensor& scale) {
  return Gather::apply(x, permutation, inverse, scale)[0];
}

Tensor combine_autograd(const Tensor& rows, const Tensor& permutation, const Tensor& inverse,
                        const OptionalTensor& gate) {
  return Combine::apply(rows, permutation, inverse, gate)[0];
}

Tensor grouped_mm_autograd(const Tensor& a, const Tensor& b, const Tensor& offsets) {
  return GroupedMm::apply(a, b, offsets)[0];
}

std::tuple<Tensor, Tensor> expert_ffn_autograd(const Tensor& x, const Tensor& permutation, const Tensor& offsets,
                                               const Tensor& inverse, const Tensor& w13, const Tensor& w2,
                                               const Tensor& gate, bool save_for_backward) {
  auto out = ExpertFfn::apply(x, permutation, offsets, inverse, w13, w2, gate, save_for_backward);
  return {out[0], out[1]};
}

Tensor rotary_autograd(const Tensor& x, const Tensor& cos, const Tensor& sin, bool inverse) {
  return Rotary::apply(x, cos, sin, inverse)[0];
}

std::tuple<Tensor, Tensor> rms_norm_autograd(const Tensor& x, const OptionalTensor& delta, const Tensor& weight,
                                             double eps, std::optional<at::ScalarType> out_dtype) {
  auto out = RmsNorm::apply(x, delta, weight, eps, out_dtype);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fomoe, Autograd, m) {
  m.impl("router_logits", &router_logits_autograd);
  m.impl("route", &route_autograd);
  m.impl("gather", &gather_autograd);
  m.impl("combine", &combine_autograd);
  m.impl("grouped_mm", &grouped_mm_autograd);
  m.impl("expert_ffn", &expert_ffn_autograd);
  m.impl("rotary", &rotary_autograd);
  m.impl("rms_norm", &rms_norm_autograd);
}

}  // namespace fomoe
