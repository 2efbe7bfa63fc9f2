// Torch-free launchers of the expert FFN's SwiGLU kernels (csrc/cuda/expert_ffn.cu), the work
// between the grouped GEMMs (the row gather and combine around them are routing.h's). Both
// stop at the kept count offsets[groups] read on the device, so skip-token's dropped
// assignments cost no time, and both compute in accum_t (fp32, fp64 for double).
// T in {float, double, __half, __nv_bfloat16}.
#pragma once

#include "cuda/gemm.h"

namespace fomoe::cuda::ffn {

using gemm::accum_t;

// a[j] = silu(h[j, :f]) * h[j, f:] for j < kept.
template <typename T>
cudaError_t swiglu_forward(const T* h, T* a, const int32_t* offsets, int groups, int64_t rows, int64_t f,
                           cudaStream_t stream);

// The backward between the two dgrad GEMMs, one pass per row j < kept, with g = gate[perm[j]]
// and a = swiglu(h[j]) recomputed from h:
//   grad_gate[perm[j]] = <grad_a[j], a>           (grad_a: unweighted gradient of the expert output)
//   grad_h[j]          = SwiGLU'(h[j]) applied to g * grad_a[j]
//   a_gated[j]         = g * a                    (the w2 weight gradient's left operand)
// grad_gate entries of skipped assignments are not written (the caller zero-fills).
// a_gated may be grad_a itself (in place): each element is read before the same thread
// overwrites it.
template <typename T>
cudaError_t swiglu_gate_backward(const T* h, const T* grad_a, const accum_t<T>* gate, const int32_t* permutation,
                                 const int32_t* offsets, int groups, int64_t rows, int64_t f, T* grad_h, T* a_gated,
                                 accum_t<T>* grad_gate, cudaStream_t stream);

}  // namespace fomoe::cuda::ffn
