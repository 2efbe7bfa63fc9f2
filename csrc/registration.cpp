// The fomoe op library: every schema lives here. Kernels register per device in the files
// that implement them (csrc/cpu/*.cpp, csrc/cuda/*.cpp), autograd in csrc/autograd.cpp,
// autocast in csrc/autocast.cpp; fake kernels are registered from Python (fomoe/ops.py).
// Semantics are documented in fomoe/reference.py, which is also the test oracle.
#include <torch/library.h>

TORCH_LIBRARY(fomoe, m) {
  // Router logits [T, E] = x [T, d] @ weight [E, d]^T, fp32 (fp64 for fp64 x) for any float x
  // and weight, under autocast too. A bf16 x is not widened on CUDA: the weight goes in as three
  // bf16 pieces summing to it exactly, so every product is exact in the GEMM's fp32
  // accumulators (tensor cores, not the FMA units an fp32 GEMM takes). The backward returns
  // grad_x in x's dtype (one rounding of an fp32-accurate value) and grad_weight in weight's,
  // each an empty tensor where output_mask says it is not needed.
  m.def("router_logits(Tensor x, Tensor weight) -> Tensor");
  m.def("router_logits_backward(Tensor grad, Tensor x, Tensor weight, bool[2] output_mask) -> (Tensor grad_x, Tensor grad_weight)");

  // Router: logits [T, E] -> gate weights [T, k] (fp32; fp64 for fp64 logits) and expert
  // ids [T, k] (int32), sorted by descending score. score: "softmax" | "sigmoid".
  m.def("route(Tensor logits, int top_k, str score=\"softmax\", bool renormalize=True) -> (Tensor weights, Tensor ids)");
  m.def("route_backward(Tensor grad_weights, Tensor logits, Tensor weights, Tensor ids, str score, bool renormalize) -> Tensor");

  // Skip-token dispatch: ids [T, k] + resident map [E] (global id -> local slot or -1) ->
  // permutation [T*k] (flat assignment t*k+s grouped by local expert, ascending within an
  // expert; -1 past the kept count), offsets [num_local+1] (offsets[-1] is the kept count)
  // and inverse [T, k] (row of each assignment in expert order, -1 when skipped).
  m.def("dispatch(Tensor ids, Tensor resident_map, int num_local) -> (Tensor permutation, Tensor offsets, Tensor inverse)");

  // Row movement between token order and expert order.
  //   gather:  out[j] = scale[perm[j]] * x[perm[j] / k]   (zero rows where perm[j] == -1)
  //   combine: y[t]   = sum_s gate[t, s] * rows[inverse[t, s]]   (skipped slots add nothing)
  m.def("gather(Tensor x, Tensor permutation, Tensor inverse, Tensor? scale=None) -> Tensor");
  m.def("combine(Tensor rows, Tensor permutation, Tensor inverse, Tensor? gate=None) -> Tensor");
  m.def("combine_gate_grad(Tensor grad_out, Tensor rows, Tensor inverse) -> Tensor");

  // Grouped GEMM with device offsets: rows [offsets[e], offsets[e+1]) of a use b[e].
  //   grouped_mm:       a [N, K] x b [E, K, M] -> [N, M]   (rows >= offsets[-1] are zero)
  //   grouped_mm_wgrad: a [N, K], b [N, M] -> [E, K, M], out[e] = a_e^T b_e  (variable K)
  m.def("grouped_mm(Tensor a, Tensor b, Tensor offsets) -> Tensor");
  m.def("grouped_mm_wgrad(Tensor a, Tensor b, Tensor offsets) -> Tensor");

  // Fused expert FFN: y[t] = sum over kept assignments (t, s) of
  //   gate[t, s] * (silu(x[t] W1_e) * (x[t] W3_e)) W2_e,   w13[e] = [W1_e | W3_e]  ([d, 2*d_ff]).
  // Returns y [T, d] and, when save_for_backward, the pre-activation h [T*k, 2*d_ff] in
  // expert order that the backward needs (an empty tensor otherwise). w13 and w2 share a
  // dtype, which may differ from x's (fp32 master weights under autocast): the GEMMs run in
  // x's dtype. The backward returns the weight gradients in weight_grad_dtype (default: the
  // weights'), written in that dtype from the fp32 accumulators where the kernels allow.
  m.def("expert_ffn(Tensor x, Tensor permutation, Tensor offsets, Tensor inverse, Tensor w13, Tensor w2, Tensor gate, bool save_for_backward) -> (Tensor y, Tensor h)");
  m.def("expert_ffn_backward(Tensor grad_y, Tensor x, Tensor permutation, Tensor offsets, Tensor inverse, Tensor w13, Tensor w2, Tensor gate, Tensor h, ScalarType? weight_grad_dtype=None) -> (Tensor grad_x, Tensor grad_w13, Tensor grad_w2, Tensor grad_gate)");

  // Rotary position embedding of the model around the MoE layers, on channel pairs
  // (i, i + D/2) of x [B, S, H, D] with tables cos, sin [S, D/2] (any float dtype):
  //   out[..., i] = x_i cos - x_{i+D/2} sin,  out[..., i+D/2] = x_{i+D/2} cos + x_i sin
  // computed in fp32 (fp64 for fp64 x), returned contiguous in x's dtype. inverse rotates by
  // the negated angle (the adjoint, which is the backward). x may be a strided view.
  m.def("rotary(Tensor x, Tensor cos, Tensor sin, bool inverse=False) -> Tensor");

  // RMSNorm of the residual stream, with the add of the last sublayer's output fused in:
  //   s = x + delta (x alone when delta is None),  normed = s * rsqrt(mean(s^2) + eps) * weight
  // over the last dim, computed in fp32 (fp64 for fp64 x); delta [..., d] of any float dtype.
  // Returns s in x's dtype (an empty tensor when delta is None: s is x) and normed in
  // out_dtype (default x's): under autocast the bf16 copy the next GEMM reads, written
  // directly. The backward takes the gradient of both outputs (grad_sum: the residual
  // stream's, None when s is unused), recomputes the row scales from s and returns grad_s
  // (the sum of both paths, x's dtype), the same values in delta_dtype when asked (else an
  // empty tensor) and grad_weight (weight's dtype).
  m.def("rms_norm(Tensor x, Tensor? delta, Tensor weight, float eps, ScalarType? out_dtype=None) -> (Tensor sum, Tensor normed)");
  m.def("rms_norm_backward(Tensor grad_normed, Tensor? grad_sum, Tensor s, Tensor weight, float eps, ScalarType? delta_dtype=None) -> (Tensor grad_s, Tensor grad_delta, Tensor grad_weight)");
}
