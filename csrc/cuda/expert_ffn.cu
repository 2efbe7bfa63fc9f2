// SwiGLU kernels of the expert FFN (see expert_ffn.h): the forward activation and the fused
// SwiGLU + gate backward. One warp per row, 16-byte accesses when the row length and pointers
// allow, fp32 (fp64) math.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/expert_ffn.h"
#include "cuda/gemm_device.cuh"

namespace fomoe::cuda::ffn {
namespace {

constexpr int kWarps = 8;  // rows per block: blockDim = (32, kWarps)

template <typename T>
constexpr int kVecWidth = 16 / static_cast<int>(sizeof(T));

__device__ __forceinline__ float sigmoid(float v) { return 1.0f / (1.0f + __expf(-v)); }
__device__ __forceinline__ double sigmoid(double v) { return 1.0 / (1.0 + exp(-v)); }

template <typename T>
__device__ __forceinline__ accum_t<T> warp_sum(accum_t<T> v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ int64_t warp_row() {
  return static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.y;
}

template <typename T, int N>
__global__ void __launch_bounds__(32 * kWarps)
    swiglu_forward_kernel(const T* h, T* a, const int32_t* offsets, int groups, int64_t rows, int64_t f) {
  using A = accum_t<T>;
  const int64_t j = warp_row();
  if (j >= kept_rows(offsets, groups, rows)) return;
  const T* hj = h + j * 2 * f;
  T* aj = a + j * f;
  for (int64_t c = threadIdx.x * N; c < f; c += 32 * N) {
    A h1[N], h3[N], out[N];
    load_accum<T, N>(hj + c, h1);
    load_accum<T, N>(hj + f + c, h3);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = h1[i] * sigmoid(h1[i]) * h3[i];
    store_accum<T, N>(aj + c, out);
  }
}

template <typename T, int N>
__global__ void __launch_bounds__(32 * kWarps)
    swiglu_gate_backward_kernel(const T* h, const T* grad_a, const accum_t<T>* gate, const int32_t* permutation,
                                const int32_t* offsets, int groups, int64_t rows, int64_t f, T* grad_h, T* a_gated,
                                accum_t<T>* grad_gate) {
  using A = accum_t<T>;
  const int64_t j = warp_row();
  if (j >= kept_rows(offsets, groups, rows)) return;
  const int32_t p = __ldg(permutation + j);
  const bool valid = p >= 0 && p < rows;
  const A g = valid ? gate[p] : A(0);
  const T* hj = h + j * 2 * f;
  const T* gaj = grad_a + j * f;
  T* ghj = grad_h + j * 2 * f;
  T* agj = a_gated + j * f;
  A dot = 0;
  for (int64_t c = threadIdx.x * N; c < f; c += 32 * N) {
    A h1[N], h3[N], ga[N], gh1[N], gh3[N], ag[N];
    load_accum<T, N>(hj + c, h1);
    load_accum<T, N>(hj + f + c, h3);
    load_accum<T, N>(gaj + c, ga);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const A sig = sigmoid(h1[i]);
      const A silu = h1[i] * sig;
      const A act = silu * h3[i];
      dot += ga[i] * act;
      const A gg = g * ga[i];
      gh1[i] = gg * h3[i] * sig * (A(1) + h1[i] * (A(1) - sig));
      gh3[i] = gg * silu;
      ag[i] = g * act;
    }
    store_accum<T, N>(ghj + c, gh1);
    store_accum<T, N>(ghj + f + c, gh3);
    store_accum<T, N>(agj + c, ag);
  }
  dot = warp_sum<T>(dot);
  if (threadIdx.x == 0 && valid) grad_gate[p] = dot;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// 16-byte accesses need every row start aligned: the row length and each base pointer.
template <typename T>
bool vectorizable(int64_t row_len, std::initializer_list<const void*> ptrs) {
  if (row_len % kVecWidth<T> != 0) return false;
  for (const void* p : ptrs)
    if (p != nullptr && !aligned16(p)) return false;
  return true;
}

unsigned row_blocks(int64_t rows) { return static_cast<unsigned>((rows + kWarps - 1) / kWarps); }

const dim3 kBlock(32, kWarps);

}  // namespace

template <typename T>
cudaError_t swiglu_forward(const T* h, T* a, const int32_t* offsets, int groups, int64_t rows, int64_t f,
                           cudaStream_t stream) {
  if (rows == 0 || f == 0) return cudaSuccess;
  if (vectorizable<T>(f, {h, a})) {
    swiglu_forward_kernel<T, kVecWidth<T>><<<row_blocks(rows), kBlock, 0, stream>>>(h, a, offsets, groups, rows, f);
  } else {
    swiglu_forward_kernel<T, 1><<<row_blocks(rows), kBlock, 0, stream>>>(h, a, offsets, groups, rows, f);
  }
  return last_launch_error();
}

template <typename T>
cudaError_t swiglu_gate_backward(const T* h, const T* grad_a, const accum_t<T>* gate, const int32_t* permutation,
                                 const int32_t* offsets, int groups, int64_t rows, int64_t f, T* grad_h, T* a_gated,
                                 accum_t<T>* grad_gate, cudaStream_t stream) {
  if (rows == 0 || f == 0) return cudaSuccess;
  if (vectorizable<T>(f, {h, grad_a, grad_h, a_gated})) {
    swiglu_gate_backward_kernel<T, kVecWidth<T>><<<row_blocks(rows), kBlock, 0, stream>>>(
        h, grad_a, gate, permutation, offsets, groups, rows, f, grad_h, a_gated, grad_gate);
  } else {
    swiglu_gate_backward_kernel<T, 1><<<row_blocks(rows), kBlock, 0, stream>>>(
        h, grad_a, gate, permutation, offsets, groups, rows, f, grad_h, a_gated, grad_gate);
  }
  return last_launch_error();
}

#define FOMOE_INSTANTIATE(T)                                                                                       \
  template cudaError_t swiglu_forward<T>(const T*, T*, const int32_t*, int, int64_t, int64_t, cudaStream_t);       \
  template cudaError_t swiglu_gate_backward<T>(const T*, const T*, const accum_t<T>*, const int32_t*,              \
                                               const int32_t*, int, int64_t, int64_t, T*, T*, accum_t<T>*,         \
                                               cudaStream_t);
FOMOE_INSTANTIATE(float)
FOMOE_INSTANTIATE(double)
FOMOE_INSTANTIATE(__half)
FOMOE_INSTANTIATE(__nv_bfloat16)
#undef FOMOE_INSTANTIATE

}  // namespace fomoe::cuda::ffn
