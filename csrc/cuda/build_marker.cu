// Keeps the kernel object library non-empty whatever FOMOE_CUDA_SOURCES selects, and records
// the architectures the kernels were compiled for.
#include "cuda/common.cuh"

namespace fomoe::cuda {
const char* compiled_for() { return "fomoe CUDA kernels (" __FILE__ ")"; }
}  // namespace fomoe::cuda
