// Torch-free interface of the grouped GEMM kernels (csrc/cuda/gemm*.cu), shared by the glue
// (gemm.cpp, expert_ffn.cpp). Every kernel reads the per-expert row ranges from `offsets`
// in device memory ([groups+1] int32, as fomoe.dispatch returns them): no host sync, so the
// launches are safe to capture in CUDA graphs. Offsets are clamped into [0, rows] on the
// device, so malformed tables give wrong numbers but never an out-of-bounds access.
//
// Two families:
//   * sm90: bf16 in, fp32 accumulate, bf16 out; wgmma + TMA (CUTLASS 3 ptr-array grouped
//     GEMM) with per-group pointers and shapes written on the device by a small kernel.
//     Needs sm_90a code in the build (FOMOE_CUDA_ARCHS containing 90a), a Hopper GPU and
//     every row length a multiple of 8 elements (16-byte TMA alignment).
//   * simt: any GPU and any float dtype, fp32 accumulation (fp64 for double); the fallback.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace fomoe::cuda::gemm {

// Accumulation type of every kernel here: fp32, or fp64 for double inputs.
template <typename T>
using accum_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// How b[e] ([K, M] logically) lies in memory.
enum class BLayout {
  kRowMajor,    // b is [E, K, M] contiguous (M fastest): the forward GEMMs
  kTransposed,  // b is the transpose of a contiguous [E, M, K] (K fastest): the dgrad GEMMs
};

// Tile shapes of the sm90 kernels.
enum class Sm90Tile {
  kLarge,  // 128x256x64 cooperative, 2x1 cluster: groups of hundreds of rows and more
  kSmall,  // 64x128x128 ping-pong, 2x1 cluster: small groups, where big tiles would idle
};

// out[r] = a[r] @ b[e] for r in [offsets[e], offsets[e+1]); rows past offsets[groups] untouched.
//   a [rows, k] row-major, out [rows, m] row-major.
template <typename T>
struct GroupedMm {
  const T* a;
  const T* b;
  T* out;
  const int32_t* offsets;
  int groups;
  int64_t rows, k, m;
  BLayout b_layout;
};

// out[e] = a[rows_e]^T @ b[rows_e]: a [rows, k], b [rows, m], out [groups, k, m], all row-major.
// OutT: the output's element type (the sm90 kernels also write fp32 from bf16 operands).
template <typename T, typename OutT = T>
struct GroupedMmWgrad {
  const T* a;
  const T* b;
  OutT* out;
  const int32_t* offsets;
  int groups;
  int64_t rows, k, m;
};

// ---- sm90 (gemm_sm90_*.cu) -----------------------------------------------------------------

// True when this build holds sm_90a code for the current device (checked without any launch,
// so it is safe during CUDA-graph capture).
bool sm90_available();
// Scratch bytes (per-group pointers, strides, shapes, CUTLASS tensor maps) one call needs.
size_t sm90_workspace_bytes(int groups, int sm_count);
cudaError_t sm90_grouped_mm(const GroupedMm<__nv_bfloat16>& p, Sm90Tile tile, int sm_count, void* workspace,
                            size_t workspace_bytes, cudaStream_t stream);
// Writes every expert, zeros for experts without rows (at most 65535 experts); bf16 or fp32 out.
cudaError_t sm90_grouped_mm_wgrad(const GroupedMmWgrad<__nv_bfloat16>& p, Sm90Tile tile, int sm_count,
                                  void* workspace, size_t workspace_bytes, cudaStream_t stream);
cudaError_t sm90_grouped_mm_wgrad(const GroupedMmWgrad<__nv_bfloat16, float>& p, Sm90Tile tile, int sm_count,
                                  void* workspace, size_t workspace_bytes, cudaStream_t stream);

// ---- simt fallback and helpers (gemm_simt.cu); T in {float, double, __half, __nv_bfloat16} ----

// b_stride_{e,k,m}: element strides of b viewed as [E, K, M] (any layout; no copy needed).
template <typename T>
cudaError_t simt_grouped_mm(const GroupedMm<T>& p, int64_t b_stride_e, int64_t b_stride_k, int64_t b_stride_m,
                            cudaStream_t stream);
// Writes every expert, zeros for experts without rows.
template <typename T>
cudaError_t simt_grouped_mm_wgrad(const GroupedMmWgrad<T>& p, cudaStream_t stream);

// Zeros rows [offsets[groups], rows) of out [rows, cols].
template <typename T>
cudaError_t zero_rows_past_kept(T* out, int64_t rows, int64_t cols, const int32_t* offsets, int groups,
                                cudaStream_t stream);
}  // namespace fomoe::cuda::gemm
