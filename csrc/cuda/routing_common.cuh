// Device helpers shared by the routing kernel files (routing*.cu): dtype mapping, conversions,
// exactly rounded arithmetic, warp-group reductions and the error-flag words. Torch-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/routing.h"

namespace fomoe::cuda::routing::detail {

constexpr unsigned kFullMask = 0xffffffffu;

// Accumulation dtype: fp64 for fp64 data, fp32 for everything else (as the CPU kernels).
template <typename T>
struct Accum {
  using type = float;
};
template <>
struct Accum<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Accum<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }

// Separately rounded multiply and add: the compiler may not fuse them into an FMA, so sums match
// the CPU kernels (which do not fuse either) bit for bit.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

__device__ __forceinline__ float max_acc(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_acc(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ float exp_acc(float v) { return expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }

template <typename A>
__device__ __forceinline__ A sigmoid_acc(A v) {
  return A(1) / (A(1) + exp_acc(-v));
}

// group_sum: common.cuh. The max in the same butterfly order:
template <int G, typename V>
__device__ __forceinline__ V group_max(V v) {  // NaN-ignoring, like std::max(acc, v) from -inf
#pragma unroll
  for (int m = G / 2; m > 0; m /= 2) v = max_acc(v, __shfl_xor_sync(kFullMask, v, m, G));
  return v;
}

// Host side: runs f(Tag<T>{}) for the C++ type of a DType.
template <typename T>
struct Tag {
  using type = T;
};
template <typename F>
cudaError_t with_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(Tag<float>{});
    case DType::kFloat64: return f(Tag<double>{});
    case DType::kBFloat16: return f(Tag<__nv_bfloat16>{});
    case DType::kFloat16: return f(Tag<__half>{});
  }
  return cudaErrorInvalidValue;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Per-translation-unit readers of the sticky error words (see routing_flags.cuh).
cudaError_t take_sticky_flags_route(uint32_t* flags, bool clear);
cudaError_t take_sticky_flags_dispatch(uint32_t* flags, bool clear);
cudaError_t take_sticky_flags_rows(uint32_t* flags, bool clear);

}  // namespace fomoe::cuda::routing::detail
