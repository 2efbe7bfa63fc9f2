// Torch-free launcher of fomoe::rotary's CUDA kernel (csrc/cuda/rotary.cu).
// T in {float, double, __half, __nv_bfloat16}; math in accum_t<T> (fp32, fp64 for double).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/gemm.h"

namespace fomoe::cuda::rope {

using gemm::accum_t;

// x [batch, seq, heads, 2*half] with element strides (any), out contiguous of the same shape.
struct RotaryShape {
  int64_t batch, seq, heads, half;
  int64_t stride_b, stride_s, stride_h, stride_d;
};

// out = pairs (i, i + half) of x rotated by (cos, sin)[s, i] (by the negated angle when
// inverse); tables contiguous [seq, half].
template <typename T>
cudaError_t rotary(const T* x, T* out, const accum_t<T>* cos, const accum_t<T>* sin, const RotaryShape& shape,
                   bool inverse, cudaStream_t stream);

}  // namespace fomoe::cuda::rope
