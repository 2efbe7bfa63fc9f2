// CUDA glue of the fused expert FFN: fomoe::expert_ffn and fomoe::expert_ffn_backward.
//
// Forward:  gather x into expert order -> grouped GEMM with w13 (h, saved for the backward)
//           -> SwiGLU -> grouped GEMM with w2 -> gate-weighted combine through `inverse`
//           (a gather per token, deterministic; no atomics).
// Backward: gather grad_y -> dgrad GEMM with w2^T (the unweighted grad of the SwiGLU
//           output) -> one fused pass: gate gradient (row dot with the recomputed SwiGLU
//           output), SwiGLU backward scaled by the gate, gate-scaled SwiGLU output
//           -> weight-gradient GEMM for w2 -> gather x -> weight-gradient GEMM for w13
//           -> dgrad GEMM with w13^T -> combine.
// Only h [T*k, 2*d_ff] is saved between them; every other intermediate is recomputed or
// lives only inside one call. All launches read offsets on the device: no host sync.
// h's rows past the kept count are left unwritten: the backward reads only the kept rows,
// and writing them (half of h when half the assignments are skipped) is pure overhead.
// The backward keeps its transient peak low: the gate-scaled SwiGLU output overwrites the
// SwiGLU output's gradient in place, and x is gathered only for the w13 weight gradient, into
// the buffer grad_y's rows used (peak n*(d + 3*d_ff) elements beyond h, was n*(2*d + 4*d_ff)).
// The row gather and combine are the routing kernels' (routing.h), so a build selecting
// expert_ffn* with FOMOE_CUDA_SOURCES must select routing* too. Rows past the kept count are
// never gathered, computed or read.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "cuda/expert_ffn.h"
#include "cuda/gemm_glue.h"
#include "cuda/routing.h"
#include "cuda/routing_glue.h"

namespace fomoe::cuda {
namespace {

// Rows of x [tokens, d] into expert order (out [rows, d]); rows of skipped assignments (past
// the kept count) are left as they are: nothing reads them.
void gather_into(const char* op, const at::Tensor& x, const at::Tensor& permutation, const at::Tensor& inverse,
                 at::Tensor& out, cudaStream_t stream) {
  auto p = gather_rows_args(op, x, permutation, inverse, at::Tensor(), out);
  p.zero_skipped_rows = false;
  check_launch(routing::gather_rows(p, stream), op);
}

// y[t] = sum_s gate[t, s] * rows[inverse[t, s]] (gate may be undefined: weights of 1).
void combine_into(const char* op, const at::Tensor& rows, const at::Tensor& inverse, const at::Tensor& gate,
                  at::Tensor& y, cudaStream_t stream) {
  check_launch(routing::combine_rows(combine_rows_args(op, rows, inverse, gate, y), stream), op);
}

void check_all_cuda(const char* op, std::initializer_list<std::pair<const at::Tensor*, const char*>> tensors) {
  for (const auto& [t, name] : tensors) check_cuda_tensor(op, *t, name);
}

std::tuple<at::Tensor, at::Tensor> expert_ffn_cuda(const at::Tensor& x, const at::Tensor& permutation,
                                                   const at::Tensor& offsets, const at::Tensor& inverse,
                                                   const at::Tensor& w13, const at::Tensor& w2,
                                                   const at::Tensor& gate, bool save_for_backward) {
  const char* op = "expert_ffn";
  check_expert_ffn(x, permutation, offsets, inverse, w13, w2, gate);
  check_all_cuda(op, {{&x, "x"}});
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t tokens = x.size(0), d = x.size(1), top_k = inverse.size(1), n = permutation.numel();
  const int64_t f = w2.size(1);
  const int groups = static_cast<int>(w13.size(0));
  // Weights of another dtype are cast to x's (autograd casts them first and keeps the copies).
  const auto xc = x.contiguous(), w13c = w13.to(x.scalar_type()).contiguous(), w2c = w2.to(x.scalar_type()).contiguous();
  const auto perm = permutation.contiguous(), off = offsets.contiguous(), inv = inverse.contiguous();
  const auto gate_acc = gate.to(accum_dtype(x.scalar_type())).contiguous();
  const cudaStream_t stream = current_stream();

  auto xg = at::empty({n, d}, x.options());
  auto h = at::empty({n, 2 * f}, x.options());
  auto a = at::empty({n, f}, x.options());
  auto y = at::empty({tokens, d}, x.options());
  with_cuda_dtype(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    gather_into(op, xc, perm, inv, xg, stream);
    // Rows of h past the kept count stay unwritten (see the top of this file).
    grouped_mm_into(op, xg, w13c, off, h, /*zero_tail=*/false);
    xg.reset();
    check_launch(ffn::swiglu_forward<T>(ptr<T>(h), mutable_ptr<T>(a), off.const_data_ptr<int32_t>(), groups, n, f,
                                        stream),
                 op);
    auto o = at::empty({n, d}, x.options());
    grouped_mm_into(op, a, w2c, off, o, /*zero_tail=*/false);
    a.reset();
    combine_into(op, o, inv, gate_acc, y, stream);
  });
  if (!save_for_backward) h = at::empty({0}, x.options());
  return {y, h};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> expert_ffn_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& permutation, const at::Tensor& offsets,
    const at::Tensor& inverse, const at::Tensor& w13, const at::Tensor& w2, const at::Tensor& gate,
    const at::Tensor& h, std::optional<at::ScalarType> weight_grad_dtype_in) {
  const char* op = "expert_ffn_backward";
  check_expert_ffn(x, permutation, offsets, inverse, w13, w2, gate);
  const auto grad_dtype = weight_grad_dtype(weight_grad_dtype_in, w13);
  FOMOE_CHECK(grad_y.sizes() == x.sizes(), "fomoe.expert_ffn_backward: grad_y must match x's shape ", x.sizes(),
              ", got ", grad_y.sizes());
  FOMOE_CHECK(h.dim() == 2 && h.size(0) == permutation.numel() && h.size(1) == w13.size(2) &&
                  h.scalar_type() == x.scalar_type(),
              "fomoe.expert_ffn_backward: h must be the [T*k, 2*d_ff] tensor expert_ffn saved (dtype ",
              x.scalar_type(), "), got ", h.sizes(), " ", h.scalar_type());
  check_all_cuda(op, {{&x, "x"}, {&grad_y, "grad_y"}, {&h, "h"}});
  check_same_device(op, x, grad_y, "grad_y");
  check_same_device(op, x, h, "h");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t tokens = x.size(0), d = x.size(1), top_k = inverse.size(1), n = permutation.numel();
  const int64_t f = w2.size(1);
  const int groups = static_cast<int>(w13.size(0));
  const auto acc = accum_dtype(x.scalar_type());
  const auto xc = x.contiguous(), gy = grad_y.to(x.scalar_type()).contiguous(), hc = h.contiguous();
  const auto w13c = w13.to(x.scalar_type()).contiguous(), w2c = w2.to(x.scalar_type()).contiguous();
  const auto perm = permutation.contiguous(), off = offsets.contiguous(), inv = inverse.contiguous();
  const auto gate_acc = gate.to(acc).contiguous();
  const int32_t* offp = off.const_data_ptr<int32_t>();
  const cudaStream_t stream = current_stream();

  at::Tensor grad_x, grad_w13, grad_w2;
  auto grad_gate = at::zeros({tokens, top_k}, x.options().dtype(acc));  // skipped slots stay zero
  with_cuda_dtype(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    // One [T*k, d] buffer serves three operands in turn (stream order makes each reuse safe):
    // grad_y's rows, then x's rows, then the rows of grad_x.
    auto rows_d = at::empty({n, d}, x.options());
    gather_into(op, gy, perm, inv, rows_d, stream);
    // Unweighted gradient of each row's expert output wrt the SwiGLU output: grad_y rows @ w2[e]^T.
    auto grad_a = at::empty({n, f}, x.options());
    grouped_mm_into(op, rows_d, w2c.transpose(1, 2), off, grad_a, /*zero_tail=*/false);
    auto grad_h = at::empty({n, 2 * f}, x.options());
    // The fused pass writes the gate-scaled SwiGLU output over grad_a (each element is read
    // before it is overwritten, by the same thread): one [T*k, d_ff] buffer less at the peak.
    check_launch(ffn::swiglu_gate_backward<T>(ptr<T>(hc), ptr<T>(grad_a), ptr<gemm::accum_t<T>>(gate_acc),
                                              perm.const_data_ptr<int32_t>(), offp, groups, n, f,
                                              mutable_ptr<T>(grad_h), /*a_gated=*/mutable_ptr<T>(grad_a),
                                              mutable_ptr<gemm::accum_t<T>>(grad_gate), stream),
                 op);
    grad_w2 = grouped_weight_grad(op, /*a_gated=*/grad_a, /*grad_y rows=*/rows_d, off, grad_dtype);
    grad_a.reset();
    gather_into(op, xc, perm, inv, rows_d, stream);  // x's rows, needed only for the w13 gradient
    grad_w13 = grouped_weight_grad(op, /*x rows=*/rows_d, grad_h, off, grad_dtype);
    grouped_mm_into(op, grad_h, w13c.transpose(1, 2), off, /*grad_x rows=*/rows_d, /*zero_tail=*/false);
    grad_h.reset();
    grad_x = at::empty({tokens, d}, x.options());
    combine_into(op, rows_d, inv, at::Tensor(), grad_x, stream);
  });
  return {grad_x, grad_w13, grad_w2, grad_gate.to(gate.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fomoe, CUDA, m) {
  m.impl("expert_ffn", &expert_ffn_cuda);
  m.impl("expert_ffn_backward", &expert_ffn_backward_cuda);
}

}  // namespace fomoe::cuda
