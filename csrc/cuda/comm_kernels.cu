// CUDA kernels of the federation's sync (see comm_kernels.h). Memory-bound element-wise work;
// the segment kernels read a host-built table so one launch covers every slice of a bucket.
#include <cuda_bf16.h>

#include "cuda/comm_kernels.h"
#include "cuda/common.cuh"

namespace fomoe::cuda::comm {
namespace {

// The segment that block `block` belongs to: the last s with block_prefix[s] <= block.
__device__ __forceinline__ int64_t find_segment(const int64_t* prefix, int64_t num_segments, int64_t block) {
  int64_t lo = 0, hi = num_segments - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (prefix[mid] <= block) lo = mid; else hi = mid - 1;
  }
  return lo;
}

__device__ __forceinline__ float load_as_float(int64_t addr, int64_t dtype, int64_t i) {
  if (dtype == static_cast<int64_t>(DType::kBFloat16)) {
    return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(addr)[i]);
  }
  return reinterpret_cast<const float*>(addr)[i];
}

__global__ void pack_delta_kernel(float* __restrict__ bucket, const Segment* __restrict__ segments,
                                  const int64_t* __restrict__ prefix, int64_t num_segments,
                                  const float* __restrict__ scales) {
  const int64_t block = blockIdx.x;
  const int64_t s = find_segment(prefix, num_segments, block);
  const Segment seg = segments[s];
  const float scale = (scales != nullptr && seg.expert >= 0) ? scales[seg.expert] : 1.0f;
  const float* a = reinterpret_cast<const float*>(seg.a);
  const int64_t base = (block - prefix[s]) * kElemsPerBlock;
#pragma unroll
  for (int e = 0; e < kElemsPerThread; ++e) {
    const int64_t i = base + int64_t(e) * kThreads + threadIdx.x;
    if (i < seg.numel) {
      // Two roundings, like the CPU path's sub then mul: (a - b) first, then the scale.
      const float d = a[i] - load_as_float(seg.b, seg.b_dtype, i);
      bucket[seg.offset + i] = scales != nullptr && seg.expert >= 0 ? d * scale : d;
    }
  }
}

__global__ void unpack_average_kernel(const float* __restrict__ bucket, const Segment* __restrict__ segments,
                                      const int64_t* __restrict__ prefix, int64_t num_segments,
                                      const float* __restrict__ divisors, float uniform_divisor) {
  const int64_t block = blockIdx.x;
  const int64_t s = find_segment(prefix, num_segments, block);
  const Segment seg = segments[s];
  const float divisor = (divisors != nullptr && seg.expert >= 0) ? divisors[seg.expert] : uniform_divisor;
  float* out = reinterpret_cast<float*>(seg.a);
  const int64_t base = (block - prefix[s]) * kElemsPerBlock;
#pragma unroll
  for (int e = 0; e < kElemsPerThread; ++e) {
    const int64_t i = base + int64_t(e) * kThreads + threadIdx.x;
    if (i < seg.numel) out[i] = divisor > 0.0f ? bucket[seg.offset + i] / divisor : 0.0f;
  }
}

template <typename F>
__global__ void elementwise_kernel(int64_t n, F f) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) f(i);
}

template <typename F>
cudaError_t launch_elementwise(int64_t n, F f, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  // Enough blocks to fill an H200 several times over; the grid-stride loop covers the rest.
  const int64_t blocks = ceil_div(n, kThreads) < 132 * 16 ? ceil_div(n, kThreads) : 132 * 16;
  elementwise_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(n, f);
  return last_launch_error();
}

__device__ __forceinline__ uint16_t to_bf16_bits(float x) {
  const __nv_bfloat16 b = __float2bfloat16_rn(x);
  return *reinterpret_cast<const uint16_t*>(&b);
}

__device__ __forceinline__ float from_bf16_bits(uint16_t bits) {
  __nv_bfloat16 b;
  *reinterpret_cast<uint16_t*>(&b) = bits;
  return __bfloat162float(b);
}

struct AddF32 {
  float* acc; const float* in;
  __device__ void operator()(int64_t i) const { acc[i] += in[i]; }
};
struct AddBF16 {
  float* acc; const uint16_t* in;
  __device__ void operator()(int64_t i) const { acc[i] += from_bf16_bits(in[i]); }
};
struct ToBF16 {
  uint16_t* out; const float* in;
  __device__ void operator()(int64_t i) const { out[i] = to_bf16_bits(in[i]); }
};
struct FromBF16 {
  float* out; const uint16_t* in;
  __device__ void operator()(int64_t i) const { out[i] = from_bf16_bits(in[i]); }
};
struct RoundBF16 {
  float* x;
  __device__ void operator()(int64_t i) const { x[i] = from_bf16_bits(to_bf16_bits(x[i])); }
};

}  // namespace

cudaError_t pack_delta(float* bucket, const Segment* segments, const int64_t* block_prefix, int64_t num_segments,
                       int64_t num_blocks, const float* scales, cudaStream_t stream) {
  if (num_blocks <= 0 || num_segments <= 0) return cudaSuccess;
  if (num_blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  pack_delta_kernel<<<static_cast<unsigned>(num_blocks), kThreads, 0, stream>>>(bucket, segments, block_prefix,
                                                                               num_segments, scales);
  return last_launch_error();
}

cudaError_t unpack_average(const float* bucket, const Segment* segments, const int64_t* block_prefix,
                           int64_t num_segments, int64_t num_blocks, const float* divisors, float uniform_divisor,
                           cudaStream_t stream) {
  if (num_blocks <= 0 || num_segments <= 0) return cudaSuccess;
  if (num_blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  unpack_average_kernel<<<static_cast<unsigned>(num_blocks), kThreads, 0, stream>>>(
      bucket, segments, block_prefix, num_segments, divisors, uniform_divisor);
  return last_launch_error();
}

cudaError_t add_f32(float* acc, const float* in, int64_t n, cudaStream_t stream) {
  return launch_elementwise(n, AddF32{acc, in}, stream);
}
cudaError_t add_bf16(float* acc, const uint16_t* in, int64_t n, cudaStream_t stream) {
  return launch_elementwise(n, AddBF16{acc, in}, stream);
}
cudaError_t f32_to_bf16(uint16_t* out, const float* in, int64_t n, cudaStream_t stream) {
  return launch_elementwise(n, ToBF16{out, in}, stream);
}
cudaError_t bf16_to_f32(float* out, const uint16_t* in, int64_t n, cudaStream_t stream) {
  return launch_elementwise(n, FromBF16{out, in}, stream);
}
cudaError_t round_to_bf16(float* x, int64_t n, cudaStream_t stream) {
  return launch_elementwise(n, RoundBF16{x}, stream);
}

}  // namespace fomoe::cuda::comm
