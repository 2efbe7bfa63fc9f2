// Input validation shared by the CPU kernels and the CUDA glue: one place for the shape,
// dtype and device rules of every op, so both devices reject the same inputs with the
// same message. Checks that need the data (expert ids in range) live in the kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/string_view.h>

#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

namespace fomoe {

// Error messages are assembled without iostreams. Streaming an integer from an extension's own
// translation unit (what TORCH_CHECK's c10::str does) was seen to segfault with some toolchains
// (Ubuntu 24.04 gcc 13.3 + torch 2.11 cu130: any extension, even a minimal one, crashed raising
// TORCH_CHECK(false, "n=", 42)), turning a clear error into a crash. FOMOE_CHECK formats numbers
// with std::to_string and shapes by hand instead; its arguments are only evaluated on failure.
namespace detail {
inline void append(std::string& out, const char* s) { out += s; }
inline void append(std::string& out, const std::string& s) { out += s; }
inline void append(std::string& out, std::string_view s) { out.append(s.data(), s.size()); }
inline void append(std::string& out, char c) { out += c; }
inline void append(std::string& out, bool b) { out += b ? "true" : "false"; }
template <typename T>
  requires(std::is_integral_v<T> || std::is_floating_point_v<T>)
inline void append(std::string& out, T v) {
  out += std::to_string(v);
}
inline void append(std::string& out, c10::ArrayRef<int64_t> values) {
  out += '[';
  for (size_t i = 0; i < values.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(values[i]);
  }
  out += ']';
}
inline void append(std::string& out, at::ScalarType t) { out += c10::toString(t); }
inline void append(std::string& out, const c10::Device& d) { out += d.str(); }
}  // namespace detail

template <typename... Args>
std::string message(const Args&... args) {
  std::string out;
  (detail::append(out, args), ...);
  return out;
}

}  // namespace fomoe

#define FOMOE_CHECK(cond, ...) TORCH_CHECK(cond, ::fomoe::message(__VA_ARGS__))

namespace fomoe {

enum class Score { Softmax, Sigmoid };

inline Score parse_score(c10::string_view score) {
  if (score == "softmax") return Score::Softmax;
  if (score == "sigmoid") return Score::Sigmoid;
  FOMOE_CHECK(false, "fomoe: score must be 'softmax' or 'sigmoid', got '", std::string(score), "'");
}

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// fp32 accumulation for every activation dtype except fp64 (kept for gradcheck).
inline at::ScalarType accum_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_same_device(const char* op, const at::Tensor& ref, const at::Tensor& t, const char* name) {
  FOMOE_CHECK(t.device() == ref.device(), "fomoe.", op, ": ", name, " is on ", t.device(),
              " but the other inputs are on ", ref.device());
}

inline void check_route(const at::Tensor& logits, int64_t top_k) {
  FOMOE_CHECK(logits.dim() == 2, "fomoe.route: logits must be 2-D [tokens, experts], got shape ", logits.sizes());
  FOMOE_CHECK(is_float_dtype(logits.scalar_type()), "fomoe.route: logits must be a floating dtype, got ",
              logits.scalar_type());
  const int64_t E = logits.size(1);
  FOMOE_CHECK(E >= 1, "fomoe.route: logits have no experts (size(1) == 0)");
  FOMOE_CHECK(top_k >= 1 && top_k <= E, "fomoe.route: top_k must be in [1, num_experts=", E, "], got ", top_k);
}

inline void check_route_backward(const at::Tensor& grad_weights, const at::Tensor& logits,
                                 const at::Tensor& weights, const at::Tensor& ids) {
  check_route(logits, ids.dim() == 2 ? ids.size(1) : 1);
  FOMOE_CHECK(ids.dim() == 2 && ids.size(0) == logits.size(0), "fomoe.route_backward: ids must be [T, k]");
  FOMOE_CHECK(ids.scalar_type() == at::kInt, "fomoe.route_backward: ids must be int32");
  FOMOE_CHECK(weights.sizes() == ids.sizes() && grad_weights.sizes() == ids.sizes(),
              "fomoe.route_backward: weights and grad_weights must match ids' shape ", ids.sizes());
  for (const auto* t : {&grad_weights, &weights, &ids}) check_same_device("route_backward", logits, *t, "an input");
}

inline void check_dispatch(const at::Tensor& ids, const at::Tensor& resident_map, int64_t num_local) {
  FOMOE_CHECK(ids.dim() == 2, "fomoe.dispatch: ids must be 2-D [tokens, top_k], got shape ", ids.sizes());
  FOMOE_CHECK(ids.scalar_type() == at::kInt, "fomoe.dispatch: ids must be int32, got ", ids.scalar_type());
  FOMOE_CHECK(resident_map.dim() == 1 && resident_map.size(0) >= 1,
              "fomoe.dispatch: resident_map must be 1-D [num_experts], got shape ", resident_map.sizes());
  FOMOE_CHECK(resident_map.scalar_type() == at::kInt, "fomoe.dispatch: resident_map must be int32, got ",
              resident_map.scalar_type());
  FOMOE_CHECK(num_local >= 0 && num_local <= resident_map.size(0),
              "fomoe.dispatch: num_local must be in [0, num_experts=", resident_map.size(0), "], got ", num_local);
  FOMOE_CHECK(ids.numel() < (int64_t{1} << 31), "fomoe.dispatch: at most 2^31-1 assignments per call");
  check_same_device("dispatch", ids, resident_map, "resident_map");
}

// permutation [T*k] int32 and inverse [T, k] int32, consistent with each other.
inline void check_routing_tables(const char* op, const at::Tensor& permutation, const at::Tensor& inverse) {
  FOMOE_CHECK(inverse.dim() == 2, "fomoe.", op, ": inverse must be 2-D [tokens, top_k], got shape ", inverse.sizes());
  FOMOE_CHECK(permutation.dim() == 1 && permutation.size(0) == inverse.numel(), "fomoe.", op,
              ": permutation must be 1-D of size tokens*top_k=", inverse.numel(), ", got shape ", permutation.sizes());
  FOMOE_CHECK(permutation.scalar_type() == at::kInt && inverse.scalar_type() == at::kInt, "fomoe.", op,
              ": permutation and inverse must be int32 (as returned by fomoe.dispatch)");
  check_same_device(op, inverse, permutation, "permutation");
}

inline void check_gate(const char* op, const at::Tensor& gate, const at::Tensor& inverse, const at::Tensor& act) {
  FOMOE_CHECK(gate.sizes() == inverse.sizes(), "fomoe.", op, ": gate weights must be [tokens, top_k]=",
              inverse.sizes(), ", got ", gate.sizes());
  FOMOE_CHECK(is_float_dtype(gate.scalar_type()), "fomoe.", op, ": gate weights must be floating, got ",
              gate.scalar_type());
  check_same_device(op, act, gate, "gate");
}

inline void check_gather(const at::Tensor& x, const at::Tensor& permutation, const at::Tensor& inverse,
                         const std::optional<at::Tensor>& scale) {
  check_routing_tables("gather", permutation, inverse);
  FOMOE_CHECK(x.dim() == 2 && x.size(0) == inverse.size(0), "fomoe.gather: x must be [tokens=", inverse.size(0),
              ", d], got shape ", x.sizes());
  FOMOE_CHECK(is_float_dtype(x.scalar_type()), "fomoe.gather: x must be floating, got ", x.scalar_type());
  check_same_device("gather", x, permutation, "permutation");
  if (scale) check_gate("gather", *scale, inverse, x);
}

inline void check_combine(const at::Tensor& rows, const at::Tensor& permutation, const at::Tensor& inverse,
                          const std::optional<at::Tensor>& gate) {
  check_routing_tables("combine", permutation, inverse);
  FOMOE_CHECK(rows.dim() == 2 && rows.size(0) == permutation.size(0), "fomoe.combine: rows must be [tokens*top_k=",
              permutation.size(0), ", d], got shape ", rows.sizes());
  FOMOE_CHECK(is_float_dtype(rows.scalar_type()), "fomoe.combine: rows must be floating, got ", rows.scalar_type());
  check_same_device("combine", rows, permutation, "permutation");
  if (gate) check_gate("combine", *gate, inverse, rows);
}

inline void check_combine_gate_grad(const at::Tensor& grad_out, const at::Tensor& rows, const at::Tensor& inverse) {
  FOMOE_CHECK(grad_out.dim() == 2 && rows.dim() == 2 && inverse.dim() == 2 && grad_out.size(0) == inverse.size(0) &&
                  grad_out.size(1) == rows.size(1),
              "fomoe.combine_gate_grad: want grad_out [T, d], rows [N, d], inverse [T, k]; got ", grad_out.sizes(), ", ",
              rows.sizes(), ", ", inverse.sizes());
  FOMOE_CHECK(inverse.scalar_type() == at::kInt, "fomoe.combine_gate_grad: inverse must be int32");
  FOMOE_CHECK(is_float_dtype(rows.scalar_type()) && is_float_dtype(grad_out.scalar_type()),
              "fomoe.combine_gate_grad: grad_out and rows must be floating, got ", grad_out.scalar_type(), " and ",
              rows.scalar_type());
  check_same_device("combine_gate_grad", rows, grad_out, "grad_out");
  check_same_device("combine_gate_grad", rows, inverse, "inverse");
}

inline void check_offsets(const char* op, const at::Tensor& offsets, int64_t num_groups, const at::Tensor& ref) {
  FOMOE_CHECK(offsets.dim() == 1 && offsets.size(0) == num_groups + 1, "fomoe.", op,
              ": offsets must be 1-D [num_experts+1=", num_groups + 1, "] (as returned by fomoe.dispatch), got shape ",
              offsets.sizes());
  FOMOE_CHECK(offsets.scalar_type() == at::kInt, "fomoe.", op, ": offsets must be int32, got ", offsets.scalar_type());
  check_same_device(op, ref, offsets, "offsets");
}

inline void check_grouped_mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets) {
  FOMOE_CHECK(a.dim() == 2, "fomoe.grouped_mm: a must be 2-D [rows, K], got shape ", a.sizes());
  FOMOE_CHECK(b.dim() == 3, "fomoe.grouped_mm: b must be 3-D [experts, K, M], got shape ", b.sizes());
  FOMOE_CHECK(a.size(1) == b.size(1), "fomoe.grouped_mm: inner sizes differ: a is ", a.sizes(), ", b is ", b.sizes());
  FOMOE_CHECK(is_float_dtype(a.scalar_type()) && a.scalar_type() == b.scalar_type(),
              "fomoe.grouped_mm: a and b must share one floating dtype, got ", a.scalar_type(), " and ", b.scalar_type());
  check_same_device("grouped_mm", a, b, "b");
  check_offsets("grouped_mm", offsets, b.size(0), a);
}

inline void check_grouped_mm_wgrad(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets) {
  FOMOE_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(0) == b.size(0),
              "fomoe.grouped_mm_wgrad: a [rows, K] and b [rows, M] must share their rows, got ", a.sizes(), " and ",
              b.sizes());
  FOMOE_CHECK(is_float_dtype(a.scalar_type()) && a.scalar_type() == b.scalar_type(),
              "fomoe.grouped_mm_wgrad: a and b must share one floating dtype, got ", a.scalar_type(), " and ",
              b.scalar_type());
  check_same_device("grouped_mm_wgrad", a, b, "b");
  FOMOE_CHECK(offsets.dim() == 1 && offsets.size(0) >= 1, "fomoe.grouped_mm_wgrad: offsets must be 1-D [experts+1]");
  check_offsets("grouped_mm_wgrad", offsets, offsets.size(0) - 1, a);
}

// expert_ffn's weights share a floating dtype, x's or another (they are cast to x's).
inline void check_expert_weight_dtypes(const at::Tensor& w13, const at::Tensor& w2) {
  FOMOE_CHECK(is_float_dtype(w13.scalar_type()) && w13.scalar_type() == w2.scalar_type(),
              "fomoe.expert_ffn: w13 and w2 must share one floating dtype (x's or another: they are cast to x's), got ",
              w13.scalar_type(), " and ", w2.scalar_type());
}

inline void check_expert_ffn(const at::Tensor& x, const at::Tensor& permutation, const at::Tensor& offsets,
                             const at::Tensor& inverse, const at::Tensor& w13, const at::Tensor& w2,
                             const at::Tensor& gate) {
  const char* op = "expert_ffn";
  check_routing_tables(op, permutation, inverse);
  FOMOE_CHECK(x.dim() == 2 && x.size(0) == inverse.size(0), "fomoe.expert_ffn: x must be [tokens=", inverse.size(0),
              ", d_model], got shape ", x.sizes());
  FOMOE_CHECK(w13.dim() == 3 && w2.dim() == 3, "fomoe.expert_ffn: w13 must be [experts, d_model, 2*d_ff] and w2 "
              "[experts, d_ff, d_model], got ", w13.sizes(), " and ", w2.sizes());
  const int64_t E = w13.size(0), d = x.size(1), f = w2.size(1);
  FOMOE_CHECK(w2.size(0) == E && w13.size(1) == d && w13.size(2) == 2 * f && w2.size(2) == d,
              "fomoe.expert_ffn: inconsistent shapes: x ", x.sizes(), ", w13 ", w13.sizes(), ", w2 ", w2.sizes(),
              " (want w13 [E, d, 2*f] and w2 [E, f, d])");
  FOMOE_CHECK(is_float_dtype(x.scalar_type()), "fomoe.expert_ffn: x must be floating, got ", x.scalar_type());
  check_expert_weight_dtypes(w13, w2);
  check_same_device(op, x, w13, "w13");
  check_same_device(op, x, w2, "w2");
  check_same_device(op, x, permutation, "permutation");
  check_offsets(op, offsets, E, x);
  check_gate(op, gate, inverse, x);
}

// A requested dtype argument (ScalarType?), else the fallback; floating either way.
inline at::ScalarType float_dtype_or(std::optional<at::ScalarType> requested, at::ScalarType fallback,
                                     const char* op, const char* what) {
  const auto t = requested.value_or(fallback);
  FOMOE_CHECK(is_float_dtype(t), "fomoe.", op, ": ", what, " must be floating, got ", t);
  return t;
}

// The dtype expert_ffn_backward returns the weight gradients in: the requested one, else the weights'.
inline at::ScalarType weight_grad_dtype(std::optional<at::ScalarType> requested, const at::Tensor& w13) {
  return float_dtype_or(requested, w13.scalar_type(), "expert_ffn_backward", "weight_grad_dtype");
}

inline void check_rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  FOMOE_CHECK(x.dim() == 4, "fomoe.rotary: x must be 4-D [batch, seq, heads, head_dim], got shape ", x.sizes());
  FOMOE_CHECK(x.size(3) % 2 == 0, "fomoe.rotary: head_dim must be even, got ", x.size(3));
  FOMOE_CHECK(is_float_dtype(x.scalar_type()), "fomoe.rotary: x must be floating, got ", x.scalar_type());
  for (const auto* t : {&cos, &sin}) {
    FOMOE_CHECK(t->dim() == 2 && t->size(0) == x.size(1) && t->size(1) == x.size(3) / 2,
                "fomoe.rotary: cos and sin must be [seq=", x.size(1), ", head_dim/2=", x.size(3) / 2, "], got ",
                t->sizes());
    FOMOE_CHECK(is_float_dtype(t->scalar_type()), "fomoe.rotary: cos and sin must be floating, got ",
                t->scalar_type());
    check_same_device("rotary", x, *t, "a table");
  }
}

// rms_norm / rms_norm_backward: x (or s) [..., d] floating, weight [d] floating, the tensors in
// like_x shaped like x, everything on x's device. The dtypes that travel with the stream (delta,
// normed and their gradients) are its own or, on an fp32 stream, fp16 / bf16: each value is
// then one rounding from its fp32 result on both devices.
inline bool norm_companion_dtype(at::ScalarType stream, at::ScalarType t) {
  return t == stream || (stream == at::kFloat && (t == at::kHalf || t == at::kBFloat16));
}

inline void check_norm_companion(const char* op, at::ScalarType stream, at::ScalarType t, const char* what) {
  FOMOE_CHECK(norm_companion_dtype(stream, t), "fomoe.", op, ": ", what, " must be ", stream,
              stream == at::kFloat ? ", Half or BFloat16" : "", " (the stream's dtype",
              stream == at::kFloat ? " or a 16-bit one" : "", "), got ", t);
}

inline void check_rms_norm(const char* op, const at::Tensor& x, const at::Tensor& weight,
                           std::initializer_list<std::pair<const at::Tensor*, const char*>> like_x) {
  FOMOE_CHECK(x.dim() >= 1 && x.size(-1) > 0, "fomoe.", op, ": x must be [..., d] with d > 0, got shape ", x.sizes());
  FOMOE_CHECK(is_float_dtype(x.scalar_type()), "fomoe.", op, ": x must be floating, got ", x.scalar_type());
  FOMOE_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), "fomoe.", op, ": weight must be [d=", x.size(-1),
              "], got shape ", weight.sizes());
  FOMOE_CHECK(is_float_dtype(weight.scalar_type()), "fomoe.", op, ": weight must be floating, got ",
              weight.scalar_type());
  check_same_device(op, x, weight, "weight");
  for (const auto& [t, name] : like_x) {
    if (!t->defined()) continue;
    FOMOE_CHECK(t->sizes() == x.sizes(), "fomoe.", op, ": ", name, " must have x's shape ", x.sizes(), ", got ",
                t->sizes());
    check_norm_companion(op, x.scalar_type(), t->scalar_type(), name);
    check_same_device(op, x, *t, name);
  }
}

inline void check_router_logits(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  FOMOE_CHECK(x.dim() == 2, "fomoe.", op, ": x must be 2-D [tokens, d_model], got shape ", x.sizes());
  FOMOE_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1) && weight.size(0) > 0, "fomoe.", op,
              ": weight must be [experts > 0, d_model=", x.size(1), "], got shape ", weight.sizes());
  FOMOE_CHECK(is_float_dtype(x.scalar_type()), "fomoe.", op, ": x must be floating, got ", x.scalar_type());
  FOMOE_CHECK(is_float_dtype(weight.scalar_type()), "fomoe.", op, ": weight must be floating, got ",
              weight.scalar_type());
  check_same_device(op, x, weight, "weight");
}

inline void check_router_logits_backward(const char* op, const at::Tensor& grad, const at::Tensor& x,
                                         const at::Tensor& weight) {
  check_router_logits(op, x, weight);
  FOMOE_CHECK(grad.dim() == 2 && grad.size(0) == x.size(0) && grad.size(1) == weight.size(0), "fomoe.", op,
              ": grad must be [tokens=", x.size(0), ", experts=", weight.size(0), "], got shape ", grad.sizes());
  FOMOE_CHECK(is_float_dtype(grad.scalar_type()), "fomoe.", op, ": grad must be floating, got ", grad.scalar_type());
  check_same_device(op, x, grad, "grad");
}

}  // namespace fomoe
