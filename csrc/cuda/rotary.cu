// fomoe::rotary on the GPU (see rotary.h): one thread per run of N channel pairs of one row
// (b, s, h), 16-byte loads and stores when the strides and pointers allow, else one pair at a
// time through the strides. Memory-bound: x read once, out written once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/gemm_device.cuh"
#include "cuda/rotary.h"

namespace fomoe::cuda::rope {
namespace {

constexpr int kThreads = 256;

template <typename T, int N>
__global__ void __launch_bounds__(kThreads)
    rotary_kernel(const T* __restrict__ x, T* __restrict__ out, const accum_t<T>* __restrict__ cos,
                  const accum_t<T>* __restrict__ sin, RotaryShape p, accum_t<T> sign) {
  using A = accum_t<T>;
  const int64_t runs = p.half / N;
  const int64_t total = p.batch * p.seq * p.heads * runs;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t row = i / runs, c = (i - row * runs) * N;
    const int64_t h = row % p.heads, s = (row / p.heads) % p.seq, b = row / (p.heads * p.seq);
    const T* in = x + b * p.stride_b + s * p.stride_s + h * p.stride_h;
    T* o = out + row * 2 * p.half + c;
    A x1[N], x2[N], c1[N], s1[N], y1[N], y2[N];
    if constexpr (N > 1) {  // the launcher checked stride_d == 1 and alignment
      load_accum<T, N>(in + c, x1);
      load_accum<T, N>(in + p.half + c, x2);
    } else {
      x1[0] = to_accum(in[c * p.stride_d]);
      x2[0] = to_accum(in[(c + p.half) * p.stride_d]);
    }
#pragma unroll
    for (int j = 0; j < N; ++j) {
      c1[j] = cos[s * p.half + c + j];
      s1[j] = sign * sin[s * p.half + c + j];
      y1[j] = x1[j] * c1[j] - x2[j] * s1[j];
      y2[j] = x2[j] * c1[j] + x1[j] * s1[j];
    }
    store_accum<T, N>(o, y1);
    store_accum<T, N>(o + p.half, y2);
  }
}

template <typename T, int N>
cudaError_t launch(const T* x, T* out, const accum_t<T>* cos, const accum_t<T>* sin, const RotaryShape& p,
                   bool inverse, cudaStream_t stream) {
  const int64_t total = p.batch * p.seq * p.heads * (p.half / N);
  // Grid-stride loop: a bounded grid (a few waves of 132 SMs) covers any size.
  const int64_t blocks = ceil_div(total, kThreads) < 132 * 32 ? ceil_div(total, kThreads) : 132 * 32;
  rotary_kernel<T, N><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(x, out, cos, sin, p,
                                                                               inverse ? -1 : 1);
  return last_launch_error();
}

bool aligned(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

}  // namespace

template <typename T>
cudaError_t rotary(const T* x, T* out, const accum_t<T>* cos, const accum_t<T>* sin, const RotaryShape& p,
                   bool inverse, cudaStream_t stream) {
  if (p.batch * p.seq * p.heads * p.half == 0) return cudaSuccess;
  constexpr int N = 16 / sizeof(T);
  const bool vector = N > 1 && p.stride_d == 1 && p.half % N == 0 && p.stride_b % N == 0 && p.stride_s % N == 0 &&
                      p.stride_h % N == 0 && aligned(x, 16) && aligned(out, 16);
  if constexpr (N > 1) {
    if (vector) return launch<T, N>(x, out, cos, sin, p, inverse, stream);
  }
  return launch<T, 1>(x, out, cos, sin, p, inverse, stream);
}

template cudaError_t rotary<float>(const float*, float*, const float*, const float*, const RotaryShape&, bool,
                                   cudaStream_t);
template cudaError_t rotary<double>(const double*, double*, const double*, const double*, const RotaryShape&, bool,
                                    cudaStream_t);
template cudaError_t rotary<__half>(const __half*, __half*, const float*, const float*, const RotaryShape&, bool,
                                    cudaStream_t);
template cudaError_t rotary<__nv_bfloat16>(const __nv_bfloat16*, __nv_bfloat16*, const float*, const float*,
                                           const RotaryShape&, bool, cudaStream_t);

}  // namespace fomoe::cuda::rope
