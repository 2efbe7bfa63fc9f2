// sm90 grouped GEMM variant: weight gradient (a_e^T b_e over each group's rows), large tiles,
// fp32 out (the gradient of fp32 master weights, written from the accumulators).
#if defined(FOMOE_HAVE_CUTLASS)
#include "cuda/gemm_sm90.cuh"
FOMOE_SM90_GROUPED_MM_WGRAD(kLarge, float)
#endif
