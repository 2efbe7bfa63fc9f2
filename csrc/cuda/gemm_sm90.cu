// Entry points of the sm90 grouped GEMMs: availability probe, workspace size, and dispatch
// to the variant translation units (gemm_sm90_<kind>_<tile>.cu).
#include "cuda/gemm.h"
#include "cuda/gemm_sm90_variants.h"

namespace fomoe::cuda::gemm {
namespace {

// Compiled for every architecture in the build; only an sm_90a image declares shared memory.
// cudaFuncGetAttributes then tells, without launching anything (safe during graph capture),
// whether the image the driver picked for this device is an sm_90a one: the CUTLASS kernels
// of other images are stubs.
__global__ void sm90a_probe_kernel(int* out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __shared__ int marker[256];
  marker[threadIdx.x % 256] = threadIdx.x;
  __syncthreads();
  if (out != nullptr) out[threadIdx.x] = marker[255 - threadIdx.x % 256];
#endif
}

}  // namespace

bool sm90_available() {
#if defined(FOMOE_HAVE_CUTLASS)
  constexpr int kMaxDevices = 64;
  static int known[kMaxDevices] = {};  // 0 unknown, 1 yes, 2 no (a benign race: every writer agrees)
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) {
    cudaGetLastError();
    return false;
  }
  if (known[device] == 0) {
    cudaFuncAttributes attr{};
    const bool ok = cudaFuncGetAttributes(&attr, sm90a_probe_kernel) == cudaSuccess && attr.sharedSizeBytes >= 1024;
    cudaGetLastError();  // a missing image is an answer, not a sticky error
    known[device] = ok ? 1 : 2;
  }
  return known[device] == 1;
#else
  return false;
#endif
}

size_t sm90_workspace_bytes(int groups, int sm_count) {
  // CUTLASS tensor maps, then 3 pointer arrays, 3 stride arrays and the shapes (each 128-aligned;
  // 16 bytes per entry bounds every one of them, the kernels check the exact carve).
  const size_t n = static_cast<size_t>(groups);
  auto round = [](size_t b) { return (b + 127) / 128 * 128; };
  return round(sm90::cutlass_workspace_bound(sm_count)) + 7 * round(n * 16);
}

cudaError_t sm90_grouped_mm(const GroupedMm<__nv_bfloat16>& p, Sm90Tile tile, int sm_count, void* workspace,
                            size_t workspace_bytes, cudaStream_t stream) {
#if defined(FOMOE_HAVE_CUTLASS)
  const bool large = tile == Sm90Tile::kLarge;
  if (p.b_layout == BLayout::kRowMajor) {
    return large ? sm90::run_grouped_mm<Sm90Tile::kLarge, BLayout::kRowMajor>(p, sm_count, workspace, workspace_bytes,
                                                                              stream)
                 : sm90::run_grouped_mm<Sm90Tile::kSmall, BLayout::kRowMajor>(p, sm_count, workspace, workspace_bytes,
                                                                              stream);
  }
  return large ? sm90::run_grouped_mm<Sm90Tile::kLarge, BLayout::kTransposed>(p, sm_count, workspace, workspace_bytes,
                                                                              stream)
               : sm90::run_grouped_mm<Sm90Tile::kSmall, BLayout::kTransposed>(p, sm_count, workspace, workspace_bytes,
                                                                              stream);
#else
  return cudaErrorNotSupported;
#endif
}

namespace {

template <typename OutT>
cudaError_t dispatch_wgrad(const GroupedMmWgrad<__nv_bfloat16, OutT>& p, Sm90Tile tile, int sm_count,
                           void* workspace, size_t workspace_bytes, cudaStream_t stream) {
#if defined(FOMOE_HAVE_CUTLASS)
  return tile == Sm90Tile::kLarge
             ? sm90::run_grouped_mm_wgrad<Sm90Tile::kLarge, OutT>(p, sm_count, workspace, workspace_bytes, stream)
             : sm90::run_grouped_mm_wgrad<Sm90Tile::kSmall, OutT>(p, sm_count, workspace, workspace_bytes, stream);
#else
  return cudaErrorNotSupported;
#endif
}

}  // namespace

cudaError_t sm90_grouped_mm_wgrad(const GroupedMmWgrad<__nv_bfloat16>& p, Sm90Tile tile, int sm_count,
                                  void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  return dispatch_wgrad(p, tile, sm_count, workspace, workspace_bytes, stream);
}

cudaError_t sm90_grouped_mm_wgrad(const GroupedMmWgrad<__nv_bfloat16, float>& p, Sm90Tile tile, int sm_count,
                                  void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  return dispatch_wgrad(p, tile, sm_count, workspace, workspace_bytes, stream);
}

}  // namespace fomoe::cuda::gemm
