// sm90 grouped GEMM variant: dgrad (b[e] the transpose of a row-major [M, K]), large tiles.
#if defined(FOMOE_HAVE_CUTLASS)
#include "cuda/gemm_sm90.cuh"
FOMOE_SM90_GROUPED_MM(kLarge, kTransposed)
#endif
