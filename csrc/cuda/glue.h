// Shared helpers of the CUDA glue files (csrc/cuda/*.cpp): the torch side of a kernel launch.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "checks.h"

namespace fomoe::cuda {

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Turns a kernel file's cudaError_t into a clear error naming the op.
inline void check_launch(cudaError_t err, const char* op) {
  FOMOE_CHECK(err == cudaSuccess, "fomoe.", op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

inline void check_cuda_tensor(const char* op, const at::Tensor& t, const char* name) {
  FOMOE_CHECK(t.is_cuda(), "fomoe.", op, ": ", name, " must be a CUDA tensor");
}

}  // namespace fomoe::cuda
