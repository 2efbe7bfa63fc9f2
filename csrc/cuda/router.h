// Torch-free launchers of fomoe::router_logits' CUDA kernels (csrc/cuda/router.cu): an fp32
// matrix as bf16 pieces for the tensor-core GEMMs, and the pieces' products summed back.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fomoe::cuda::router {

// Which piece each output slot gets: 0, 1, 2 are the bf16 roundings of src, of what that
// leaves, and of what is left then (exact fp32 remainders): they sum to src exactly.
struct PiecePattern {
  int slots;
  int8_t piece[8];
};

// dst[r * dst_row_stride + s * dst_slot_stride + c] = piece pattern.piece[s] of src[r * cols + c].
cudaError_t bf16_pieces(const float* src, int64_t rows, int64_t cols, __nv_bfloat16* dst, int64_t dst_row_stride,
                        int64_t dst_slot_stride, PiecePattern pattern, cudaStream_t stream);

// dst[r * cols + c] = (p2 + p1) + p0, p_i = src[r * src_row_stride + i * src_piece_stride + c]:
// the three pieces' products summed smallest first. O: float or __nv_bfloat16.
template <typename O>
cudaError_t sum_pieces(const float* src, int64_t rows, int64_t cols, int64_t src_row_stride,
                       int64_t src_piece_stride, O* dst, cudaStream_t stream);

}  // namespace fomoe::cuda::router
