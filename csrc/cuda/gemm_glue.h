// Torch side of the grouped GEMMs, shared by the glue of grouped_mm / grouped_mm_wgrad
// (gemm.cpp) and of the expert FFN (expert_ffn.cpp): path choice (Hopper kernels or the
// portable ones), workspace allocation, dtype dispatch.
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/glue.h"

namespace fomoe::cuda {

// Calls f with a value of the CUDA element type matching `dtype` (float, double, half, bf16).
template <typename F>
void with_cuda_dtype(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: FOMOE_CHECK(false, "fomoe.", op, ": unsupported dtype ", dtype);
  }
}

template <typename T>
const T* ptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}

template <typename T>
T* mutable_ptr(at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

// out[r] = a[r] @ b[e] for rows r of group e (rows from the device offsets). a and out are
// contiguous, b is [E, K, M] with any strides: a contiguous b and the transposed view of a
// contiguous [E, M, K] run the Hopper kernels without a copy. Rows past offsets[-1] are
// zeroed when zero_tail, else left as they are.
void grouped_mm_into(const char* op, const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets,
                     at::Tensor& out, bool zero_tail);

// out[e] = a_e^T b_e over the rows of group e; a [N, K] and b [N, M] contiguous; every
// expert written (zeros where it has no rows). out_dtype: fp32 from bf16 operands is written by
// the Hopper kernels from their accumulators; other combinations cast the result.
at::Tensor grouped_weight_grad(const char* op, const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets,
                               at::ScalarType out_dtype);

}  // namespace fomoe::cuda
