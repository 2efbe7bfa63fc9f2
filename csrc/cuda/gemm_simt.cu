// Portable grouped GEMMs (any GPU, any float dtype) and the zero fills shared with the sm90
// path. The GEMMs are plain shared-memory SIMT tiles: the correct fallback for GPUs without
// the Hopper kernels, for dtypes other than bf16 and for rows whose length is not a multiple
// of 8 elements. Accumulation is fp32 (fp64 for double).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/gemm.h"
#include "cuda/gemm_device.cuh"

namespace fomoe::cuda::gemm {
namespace {

template <typename T>
using acc_t = accum_t<T>;

template <typename T>
__device__ __forceinline__ acc_t<T> load_acc(const T* p) {
  return to_accum(*p);
}

constexpr int kTile = 64;     // output tile edge
constexpr int kDepth = 16;    // reduction slice per shared-memory stage
constexpr int kThreads = 256; // 16 x 16 threads, 4 x 4 outputs each
constexpr int kPer = 4;

// One block computes a 64x64 tile of one group's output. blockIdx.x enumerates the row tiles
// of all groups in order (an upper bound is launched; blocks past the last tile exit).
template <typename T>
__global__ void __launch_bounds__(kThreads) simt_grouped_mm_kernel(GroupedMm<T> p, int64_t sb_e, int64_t sb_k,
                                                                   int64_t sb_m) {
  using A = acc_t<T>;
  __shared__ A a_s[kDepth][kTile];
  __shared__ A b_s[kDepth][kTile];

  int64_t tile = blockIdx.x;
  int e = 0;
  RowRange range{0, 0};
  for (; e < p.groups; ++e) {
    range = group_rows(p.offsets, e, p.rows);
    const int64_t tiles = (range.size() + kTile - 1) / kTile;
    if (tile < tiles) break;
    tile -= tiles;
  }
  if (e == p.groups) return;

  const int64_t row0 = range.start + tile * kTile;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const T* b = p.b + e * sb_e;
  A acc[kPer][kPer] = {};

  for (int64_t k0 = 0; k0 < p.k; k0 += kDepth) {
    for (int i = threadIdx.x; i < kTile * kDepth; i += kThreads) {
      const int r = i / kDepth, kk = i % kDepth;  // consecutive threads walk along k in a's rows
      const int64_t row = row0 + r, kg = k0 + kk;
      a_s[kk][r] = (row < range.end && kg < p.k) ? load_acc(p.a + row * p.k + kg) : A(0);
      const int c = i % kTile, kb = i / kTile;  // and along m in b's rows
      const int64_t col = col0 + c, kgb = k0 + kb;
      b_s[kb][c] = (col < p.m && kgb < p.k) ? load_acc(b + kgb * sb_k + col * sb_m) : A(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kDepth; ++kk) {
      A av[kPer], bv[kPer];
#pragma unroll
      for (int i = 0; i < kPer; ++i) av[i] = a_s[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < kPer; ++j) bv[j] = b_s[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < kPer; ++i)
#pragma unroll
        for (int j = 0; j < kPer; ++j) acc[i][j] += av[i] * bv[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t row = row0 + ty + 16 * i;
    if (row >= range.end) continue;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int64_t col = col0 + tx + 16 * j;
      if (col < p.m) p.out[row * p.m + col] = from_accum<T>(acc[i][j]);
    }
  }
}

// One block computes a 64x64 tile of out[e] = a_e^T b_e, walking the group's rows.
template <typename T>
__global__ void __launch_bounds__(kThreads) simt_grouped_mm_wgrad_kernel(GroupedMmWgrad<T> p) {
  using A = acc_t<T>;
  __shared__ A a_s[kDepth][kTile];
  __shared__ A b_s[kDepth][kTile];

  const int e = blockIdx.z;
  const RowRange range = group_rows(p.offsets, e, p.rows);
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kTile;  // along k (rows of out[e])
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTile;  // along m
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  A acc[kPer][kPer] = {};

  for (int64_t r0 = range.start; r0 < range.end; r0 += kDepth) {
    for (int i = threadIdx.x; i < kTile * kDepth; i += kThreads) {
      const int c = i % kTile, rr = i / kTile;
      const int64_t r = r0 + rr;
      const bool in = r < range.end;
      a_s[rr][c] = (in && i0 + c < p.k) ? load_acc(p.a + r * p.k + i0 + c) : A(0);
      b_s[rr][c] = (in && j0 + c < p.m) ? load_acc(p.b + r * p.m + j0 + c) : A(0);
    }
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kDepth; ++rr) {
      A av[kPer], bv[kPer];
#pragma unroll
      for (int i = 0; i < kPer; ++i) av[i] = a_s[rr][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < kPer; ++j) bv[j] = b_s[rr][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < kPer; ++i)
#pragma unroll
        for (int j = 0; j < kPer; ++j) acc[i][j] += av[i] * bv[j];
    }
    __syncthreads();
  }
  T* out = p.out + static_cast<int64_t>(e) * p.k * p.m;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t row = i0 + ty + 16 * i;
    if (row >= p.k) continue;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int64_t col = j0 + tx + 16 * j;
      if (col < p.m) out[row * p.m + col] = from_accum<T>(acc[i][j]);
    }
  }
}

__global__ void zero_rows_past_kept_kernel(char* out, int64_t rows, int64_t row_bytes, const int32_t* offsets,
                                           int groups) {
  const int64_t kept = kept_rows(offsets, groups, rows);
  const int64_t worker = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  zero_bytes(out, kept * row_bytes, rows * row_bytes, worker, static_cast<int64_t>(gridDim.x) * blockDim.x);
}

}  // namespace

template <typename T>
cudaError_t simt_grouped_mm(const GroupedMm<T>& p, int64_t b_stride_e, int64_t b_stride_k, int64_t b_stride_m,
                            cudaStream_t stream) {
  if (p.rows == 0 || p.m == 0 || p.groups == 0) return cudaSuccess;
  const int64_t row_tiles = ceil_div(p.rows, kTile) + p.groups;  // each group adds at most one partial tile
  const int64_t col_tiles = ceil_div(p.m, kTile);
  if (row_tiles > 0x7fffffff || col_tiles > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(col_tiles));
  simt_grouped_mm_kernel<T><<<grid, kThreads, 0, stream>>>(p, b_stride_e, b_stride_k, b_stride_m);
  return last_launch_error();
}

template <typename T>
cudaError_t simt_grouped_mm_wgrad(const GroupedMmWgrad<T>& p, cudaStream_t stream) {
  if (p.k == 0 || p.m == 0 || p.groups == 0) return cudaSuccess;
  const int64_t tiles_m = ceil_div(p.m, kTile), tiles_k = ceil_div(p.k, kTile);
  if (tiles_m > 0x7fffffff || tiles_k > 65535 || p.groups > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(tiles_m), static_cast<unsigned>(tiles_k), static_cast<unsigned>(p.groups));
  simt_grouped_mm_wgrad_kernel<T><<<grid, kThreads, 0, stream>>>(p);
  return last_launch_error();
}

template <typename T>
cudaError_t zero_rows_past_kept(T* out, int64_t rows, int64_t cols, const int32_t* offsets, int groups,
                                cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  const int64_t row_bytes = cols * static_cast<int64_t>(sizeof(T));
  zero_rows_past_kept_kernel<<<zero_blocks(rows * row_bytes), 256, 0, stream>>>(reinterpret_cast<char*>(out), rows,
                                                                                row_bytes, offsets, groups);
  return last_launch_error();
}

#define FOMOE_INSTANTIATE(T)                                                                                  \
  template cudaError_t simt_grouped_mm<T>(const GroupedMm<T>&, int64_t, int64_t, int64_t, cudaStream_t);       \
  template cudaError_t simt_grouped_mm_wgrad<T>(const GroupedMmWgrad<T>&, cudaStream_t);                       \
  template cudaError_t zero_rows_past_kept<T>(T*, int64_t, int64_t, const int32_t*, int, cudaStream_t);
FOMOE_INSTANTIATE(float)
FOMOE_INSTANTIATE(double)
FOMOE_INSTANTIATE(__half)
FOMOE_INSTANTIATE(__nv_bfloat16)
#undef FOMOE_INSTANTIATE

}  // namespace fomoe::cuda::gemm
