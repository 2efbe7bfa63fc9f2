// sm90 grouped GEMM variant: forward (b[e] row-major [K, M]), small tiles.
#if defined(FOMOE_HAVE_CUTLASS)
#include "cuda/gemm_sm90.cuh"
FOMOE_SM90_GROUPED_MM(kSmall, kRowMajor)
#endif
