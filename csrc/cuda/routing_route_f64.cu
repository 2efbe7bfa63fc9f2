// fomoe::route kernels for double logits (see routing_route.cuh); one file per dtype so they compile in parallel.
#include "cuda/routing_route.cuh"

namespace fomoe::cuda::routing::detail {
template cudaError_t route_typed<double>(const double*, int64_t, int64_t, int64_t, bool, bool, double*, int32_t*, cudaStream_t);
}  // namespace fomoe::cuda::routing::detail
