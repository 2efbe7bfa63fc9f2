// Torch-free launchers of fomoe::rms_norm's CUDA kernels (csrc/cuda/rms_norm.cu).
// T: the residual stream's dtype (x, s, grad_s) in {float, double, __half, __nv_bfloat16};
// D (delta, grad_delta) and O (normed, grad_normed) are T, or __half / __nv_bfloat16 when T
// is float; the glue casts other combinations. Math in accum_t<T> (fp32, fp64 for double).
// Every tensor is contiguous [rows, d].
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/gemm.h"

namespace fomoe::cuda::norm {

using gemm::accum_t;

// s = x + delta (written when delta is non-null; else s is x), normed = s * rsqrt(mean(s^2) +
// eps) * weight.
template <typename T, typename D, typename O>
cudaError_t rms_norm_forward(const T* x, const D* delta, const accum_t<T>* weight, T* s, O* normed, int64_t rows,
                             int64_t d, double eps, cudaStream_t stream);

// grad_s = rstd * (g * w) - s * rstd^3 * sum(g * w * s) / d (+ grad_sum when non-null), also
// written to grad_delta when non-null; and the weight gradient, sum over rows of g * s * rstd,
// as partial sums partial [rms_norm_backward_partials(rows), d] that the caller adds up in
// order (bitwise reproducible). rstd [rows] is scratch for rows too long to keep in registers.
template <typename T, typename D, typename O>
cudaError_t rms_norm_backward(const O* grad_normed, const T* grad_sum, const T* s, const accum_t<T>* weight,
                              T* grad_s, D* grad_delta, accum_t<T>* rstd, accum_t<T>* partial, int64_t rows,
                              int64_t d, double eps, cudaStream_t stream);

int64_t rms_norm_backward_partials(int64_t rows);

}  // namespace fomoe::cuda::norm
