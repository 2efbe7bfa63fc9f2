// CUDA kernels of fomoe::router_logits (csrc/cuda/router.h): elementwise, over at most a few
// MB (the router weight, the logits' gradient), so one element per thread.
#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/router.h"

namespace fomoe::cuda::router {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n) { return static_cast<int>(std::min<int64_t>(ceil_div(n, kThreads), 8192)); }

__global__ void bf16_pieces_kernel(const float* __restrict__ src, int64_t rows, int64_t cols,
                                   __nv_bfloat16* __restrict__ dst, int64_t dst_row_stride, int64_t dst_slot_stride,
                                   PiecePattern pattern) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    const float v = src[i];
    __nv_bfloat16 piece[3];
    piece[0] = __float2bfloat16_rn(v);
    // The remainders are exact in fp32; a non-finite value has none (inf - inf would be NaN).
    const float r1 = isfinite(v) ? v - __bfloat162float(piece[0]) : 0.0f;
    piece[1] = __float2bfloat16_rn(r1);
    piece[2] = __float2bfloat16_rn(r1 - __bfloat162float(piece[1]));
    __nv_bfloat16* out = dst + (i / cols) * dst_row_stride + i % cols;
    for (int s = 0; s < pattern.slots; ++s) out[s * dst_slot_stride] = piece[pattern.piece[s]];
  }
}

template <typename O>
__global__ void sum_pieces_kernel(const float* __restrict__ src, int64_t rows, int64_t cols, int64_t src_row_stride,
                                  int64_t src_piece_stride, O* __restrict__ dst) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    const float* p = src + (i / cols) * src_row_stride + i % cols;
    const float sum = (p[2 * src_piece_stride] + p[src_piece_stride]) + p[0];
    if constexpr (sizeof(O) == sizeof(float)) {
      dst[i] = sum;
    } else {
      dst[i] = __float2bfloat16_rn(sum);
    }
  }
}

}  // namespace

cudaError_t bf16_pieces(const float* src, int64_t rows, int64_t cols, __nv_bfloat16* dst, int64_t dst_row_stride,
                        int64_t dst_slot_stride, PiecePattern pattern, cudaStream_t stream) {
  if (rows * cols == 0) return cudaSuccess;
  bf16_pieces_kernel<<<blocks_for(rows * cols), kThreads, 0, stream>>>(src, rows, cols, dst, dst_row_stride,
                                                                       dst_slot_stride, pattern);
  return last_launch_error();
}

template <typename O>
cudaError_t sum_pieces(const float* src, int64_t rows, int64_t cols, int64_t src_row_stride,
                       int64_t src_piece_stride, O* dst, cudaStream_t stream) {
  if (rows * cols == 0) return cudaSuccess;
  sum_pieces_kernel<O><<<blocks_for(rows * cols), kThreads, 0, stream>>>(src, rows, cols, src_row_stride,
                                                                         src_piece_stride, dst);
  return last_launch_error();
}

template cudaError_t sum_pieces<float>(const float*, int64_t, int64_t, int64_t, int64_t, float*, cudaStream_t);
template cudaError_t sum_pieces<__nv_bfloat16>(const float*, int64_t, int64_t, int64_t, int64_t, __nv_bfloat16*,
                                               cudaStream_t);

}  // namespace fomoe::cuda::router
