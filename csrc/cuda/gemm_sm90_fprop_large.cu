// sm90 grouped GEMM variant: forward (b[e] row-major [K, M]), large tiles.
#if defined(FOMOE_HAVE_CUTLASS)
#include "cuda/gemm_sm90.cuh"
FOMOE_SM90_GROUPED_MM(kLarge, kRowMajor)
#endif
