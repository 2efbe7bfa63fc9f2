// The error-flag word of one routing kernel file. Include from exactly the .cu files whose
// kernels raise ErrorFlag bits; each gets its own sticky word (kernel files are compiled without
// relocatable device code, so a device variable cannot be shared between them), read by that
// file's take_sticky_flags_<name>() and merged by read_sticky_error_flags().
#pragma once

#include "cuda/routing_common.cuh"

namespace fomoe::cuda::routing::detail {
namespace {

__device__ uint32_t sticky_error_flags = 0;

// ORs `bit` into the caller's word, or into this file's sticky word when the caller passed none.
// Kernels note bad entries in a register and call this once at their end, so no atomic or call
// sits between their loads.
__device__ __forceinline__ void raise_error(uint32_t* flags, uint32_t bit) {
  atomicOr(flags != nullptr ? flags : &sticky_error_flags, bit);
}

inline cudaError_t take_this_files_sticky_flags(uint32_t* flags, bool clear) {
  FOMOE_RETURN_IF_ERROR(cudaMemcpyFromSymbol(flags, sticky_error_flags, sizeof(uint32_t)));
  if (clear) {
    const uint32_t zero = 0;
    FOMOE_RETURN_IF_ERROR(cudaMemcpyToSymbol(sticky_error_flags, &zero, sizeof(uint32_t)));
  }
  return cudaSuccess;
}

}  // namespace
}  // namespace fomoe::cuda::routing::detail
