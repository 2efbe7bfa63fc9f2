// The sm90 grouped GEMM variants, one translation unit each (gemm_sm90_<kind>_<tile>.cu) so
// they compile in parallel; gemm_sm90.cu dispatches among them. Kept free of CUTLASS
// headers so the dispatcher compiles quickly.
#pragma once

#include "cuda/gemm.h"

namespace fomoe::cuda::gemm::sm90 {

// Bytes of the CUTLASS part of the workspace (tensor maps per SM) every variant fits in.
inline size_t cutlass_workspace_bound(int sm_count) { return size_t(8) * 128 * size_t(sm_count) + 1024; }

template <Sm90Tile kTile, BLayout kLayout>
cudaError_t run_grouped_mm(const GroupedMm<__nv_bfloat16>& p, int sm_count, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream);

template <Sm90Tile kTile, typename OutT>
cudaError_t run_grouped_mm_wgrad(const GroupedMmWgrad<__nv_bfloat16, OutT>& p, int sm_count, void* workspace,
                                 size_t workspace_bytes, cudaStream_t stream);

}  // namespace fomoe::cuda::gemm::sm90
