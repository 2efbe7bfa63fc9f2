// Torch-free launchers of the federation's CUDA kernels (comm_kernels.cu): packing
// pseudo-gradients of many parameter slices into one contiguous bucket, unpacking the
// averaged bucket, and the element-wise steps of the ring all-reduce.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fomoe::cuda::comm {

// One row of a segment table: a contiguous run of `numel` elements that lives at `offset`
// in the bucket. Pack: bucket[offset + i] = (a[i] - b[i]) * scale, with a fp32 (θ_global)
// and b of `b_dtype` (the worker's parameter). Unpack: a[i] = bucket[offset + i] / divisor
// (a fp32: θ_global's gradient), 0 where the divisor is 0. `expert` indexes the per-expert
// scales / divisors (-1: scale 1, divisor `uniform_divisor`).
enum class DType : int64_t { kFloat32 = 0, kBFloat16 = 1 };

struct Segment {
  int64_t a;        // device address
  int64_t b;        // device address (pack only)
  int64_t numel;
  int64_t offset;
  int64_t expert;
  int64_t b_dtype;  // DType
};
static_assert(sizeof(Segment) == 6 * sizeof(int64_t), "Segment rows are int64[6] tables");

// Elements one block covers; `block_prefix[s]` is the first block of segment s (host-computed,
// num_segments + 1 entries).
constexpr int kThreads = 256;
constexpr int kElemsPerThread = 8;
constexpr int64_t kElemsPerBlock = int64_t(kThreads) * kElemsPerThread;

cudaError_t pack_delta(float* bucket, const Segment* segments, const int64_t* block_prefix, int64_t num_segments,
                       int64_t num_blocks, const float* scales, cudaStream_t stream);

cudaError_t unpack_average(const float* bucket, const Segment* segments, const int64_t* block_prefix,
                           int64_t num_segments, int64_t num_blocks, const float* divisors, float uniform_divisor,
                           cudaStream_t stream);

// Ring all-reduce steps. bf16 values are raw uint16 bit patterns (round to nearest even).
cudaError_t add_f32(float* acc, const float* in, int64_t n, cudaStream_t stream);
cudaError_t add_bf16(float* acc, const uint16_t* in, int64_t n, cudaStream_t stream);
cudaError_t f32_to_bf16(uint16_t* out, const float* in, int64_t n, cudaStream_t stream);
cudaError_t bf16_to_f32(float* out, const uint16_t* in, int64_t n, cudaStream_t stream);
// x = float(bf16(x)) in place: what a bf16 wire makes of a value.
cudaError_t round_to_bf16(float* x, int64_t n, cudaStream_t stream);

}  // namespace fomoe::cuda::comm
