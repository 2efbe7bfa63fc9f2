// Torch side of the row-movement launchers (routing.h), shared by the glue of the routing ops
// (routing.cpp) and of the fused expert FFN (expert_ffn.cpp): dtype mapping and the launch
// arguments of a gather or combine over contiguous tensors.
#pragma once

#include <ATen/ATen.h>

#include "checks.h"
#include "cuda/routing.h"

namespace fomoe::cuda {

inline routing::DType routing_dtype(const char* op, at::ScalarType t) {
  switch (t) {
    case at::kFloat: return routing::DType::kFloat32;
    case at::kDouble: return routing::DType::kFloat64;
    case at::kBFloat16: return routing::DType::kBFloat16;
    case at::kHalf: return routing::DType::kFloat16;
    default: FOMOE_CHECK(false, "fomoe.", op, ": unsupported dtype ", t, " (want float32, float64, bfloat16 or float16)");
  }
}

// out[j] = scale[perm[j]] * x[perm[j] / k] (scale may be undefined: weights of 1); x, the
// tables, scale (accumulation dtype) and out ([perm.numel(), d]) contiguous.
inline routing::GatherRows gather_rows_args(const char* op, const at::Tensor& x, const at::Tensor& permutation,
                                            const at::Tensor& inverse, const at::Tensor& scale, at::Tensor& out) {
  routing::GatherRows p;
  p.x = x.const_data_ptr();
  p.x_stride = x.size(1);
  p.tokens = x.size(0);
  p.top_k = inverse.size(1);
  p.permutation = permutation.const_data_ptr<int32_t>();
  p.inverse = inverse.const_data_ptr<int32_t>();
  p.rows = permutation.numel();
  p.scale = scale.defined() ? scale.const_data_ptr() : nullptr;
  p.out = out.mutable_data_ptr();
  p.out_stride = out.size(1);
  p.d = x.size(1);
  p.dtype = routing_dtype(op, x.scalar_type());
  return p;
}

// y[t] = sum_s gate[t, s] * rows[inverse[t, s]] (gate may be undefined: weights of 1); rows,
// inverse, gate (accumulation dtype) and y ([tokens, d]) contiguous.
inline routing::CombineRows combine_rows_args(const char* op, const at::Tensor& rows, const at::Tensor& inverse,
                                              const at::Tensor& gate, at::Tensor& y) {
  routing::CombineRows p;
  p.rows = rows.const_data_ptr();
  p.rows_stride = rows.size(1);
  p.num_rows = rows.size(0);
  p.inverse = inverse.const_data_ptr<int32_t>();
  p.tokens = inverse.size(0);
  p.top_k = inverse.size(1);
  p.gate = gate.defined() ? gate.const_data_ptr() : nullptr;
  p.out = y.mutable_data_ptr();
  p.out_stride = y.size(1);
  p.d = y.size(1);
  p.dtype = routing_dtype(op, rows.scalar_type());
  return p;
}

}  // namespace fomoe::cuda
