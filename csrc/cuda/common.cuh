// Shared helpers of the torch-free CUDA kernel files (csrc/cuda/*.cu). No torch headers here:
// kernels take raw pointers, sizes and a cudaStream_t, and report errors as cudaError_t to
// the glue files, which turn them into TORCH_CHECK messages.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fomoe::cuda {

// Returns the launch error of the kernel just launched (configuration errors, bad pointers).
inline cudaError_t last_launch_error() { return cudaGetLastError(); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Sum over aligned groups of G lanes (G a power of two dividing 32). Butterfly order: every
// lane ends with the same value, and the result does not depend on timing.
template <int G, typename V>
__device__ __forceinline__ V group_sum(V v) {
#pragma unroll
  for (int m = G / 2; m > 0; m /= 2) v += __shfl_xor_sync(0xffffffffu, v, m, G);
  return v;
}

}  // namespace fomoe::cuda

#define FOMOE_RETURN_IF_ERROR(expr)              \
  do {                                           \
    const cudaError_t fomoe_err_ = (expr);       \
    if (fomoe_err_ != cudaSuccess) return fomoe_err_; \
  } while (0)
