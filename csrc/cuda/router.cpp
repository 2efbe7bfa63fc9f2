// CUDA glue of fomoe::router_logits and its backward. A bf16 x runs on tensor cores through
// bf16 pieces of the fp32 operands (csrc/cuda/router.h); every other dtype takes the widened
// GEMMs the CPU runs (csrc/router_gemm.h).
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "checks.h"
#include "cuda/gemm_glue.h"
#include "cuda/router.h"
#include "router_gemm.h"

namespace fomoe::cuda {
namespace {

// The bf16 pieces of the fp32 matrix t [rows, cols], slot s holding piece pattern.piece[s]:
// stacked as row blocks [slots * rows, cols], or side by side in each row [rows, slots * cols].
at::Tensor pieces_of(const at::Tensor& t, router::PiecePattern pattern, bool side_by_side, const char* op) {
  const auto src = t.to(at::kFloat).contiguous();
  const int64_t rows = src.size(0), cols = src.size(1), slots = pattern.slots;
  auto out = side_by_side ? at::empty({rows, slots * cols}, src.options().dtype(at::kBFloat16))
                          : at::empty({slots * rows, cols}, src.options().dtype(at::kBFloat16));
  const int64_t row_stride = side_by_side ? slots * cols : cols, slot_stride = side_by_side ? cols : rows * cols;
  check_launch(router::bf16_pieces(ptr<float>(src), rows, cols, mutable_ptr<__nv_bfloat16>(out), row_stride,
                                   slot_stride, pattern, current_stream()),
               op);
  return out;
}

// (p2 + p1) + p0 of the three [rows, cols] blocks of parts (block i at i * piece_stride).
at::Tensor sum_of_pieces(const at::Tensor& parts, int64_t rows, int64_t cols, int64_t row_stride,
                         int64_t piece_stride, at::ScalarType out_dtype, const char* op) {
  const auto written = out_dtype == at::kBFloat16 ? at::kBFloat16 : at::kFloat;
  auto out = at::empty({rows, cols}, parts.options().dtype(written));
  const auto sum_into = [&](auto* dst) {  // the two instantiations router.cu provides
    check_launch(router::sum_pieces(ptr<float>(parts), rows, cols, row_stride, piece_stride, dst, current_stream()),
                 op);
  };
  if (written == at::kBFloat16) sum_into(mutable_ptr<__nv_bfloat16>(out)); else sum_into(mutable_ptr<float>(out));
  return written == out_dtype ? out : out.to(out_dtype);
}

at::Tensor router_logits_cuda(const at::Tensor& x, const at::Tensor& weight) {
  const char* op = "router_logits";
  check_router_logits(op, x, weight);
  check_cuda_tensor(op, x, "x");
  if (x.scalar_type() != at::kBFloat16) return router_logits_widened(x, weight);
  const c10::cuda::CUDAGuard guard(x.device());
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t T = x.size(0), E = weight.size(0);
  const auto w = pieces_of(weight, {3, {0, 1, 2}}, false, op);  // [3E, d]
  const auto parts = at::mm(x, w.t(), at::kFloat);       // [T, 3E]: each piece's products, fp32
  return sum_of_pieces(parts, T, E, 3 * E, E, at::kFloat, op);
}

std::tuple<at::Tensor, at::Tensor> router_logits_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                               const at::Tensor& weight,
                                                               std::array<bool, 2> output_mask) {
  const char* op = "router_logits_backward";
  check_router_logits_backward(op, grad, x, weight);
  check_cuda_tensor(op, x, "x");
  if (x.scalar_type() != at::kBFloat16) return router_logits_backward_widened(grad, x, weight, output_mask);
  const c10::cuda::CUDAGuard guard(x.device());
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t T = x.size(0), d = x.size(1), E = weight.size(0);
  // The gradient's slots [g1, g2, g3, g1, g2, g1]: the first three carry it exactly (the
  // weight's gradient reads them); against the weight's pieces [w1, w1, w1, w2, w2, w3] they
  // hold every product of grad @ W down to 2^-26 of its size, so x's gradient is the fp32
  // sum rounded once to bf16.
  const auto slots = pieces_of(grad, {6, {0, 1, 2, 0, 1, 0}}, true, op);  // [T, 6E]
  auto grad_x = output_mask[0] ? at::mm(slots, pieces_of(weight, {6, {0, 0, 0, 1, 1, 2}}, false, op))
                               : at::empty({0}, x.options());
  at::Tensor grad_w = at::empty({0}, weight.options());
  if (output_mask[1]) {
    const auto parts = at::mm(slots.narrow(1, 0, 3 * E).t(), x, at::kFloat);  // [3E, d]
    grad_w = sum_of_pieces(parts, E, d, d, E * d, weight.scalar_type(), op);
  }
  return {grad_x, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(fomoe, CUDA, m) {
  m.impl("router_logits", &router_logits_cuda);
  m.impl("router_logits_backward", &router_logits_backward_cuda);
}

}  // namespace fomoe::cuda
