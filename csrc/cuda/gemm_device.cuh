// Device helpers shared by the grouped GEMM and expert FFN kernels: reading the per-expert
// offsets table, dtype conversion to the accumulation type, 16-byte vectors, zero fills.
// Offsets are clamped into [0, rows] and each range to start <= end, so a malformed table
// can never send a kernel outside its buffers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda/gemm.h"

namespace fomoe::cuda {

__device__ __forceinline__ int64_t clamped_offset(const int32_t* offsets, int i, int64_t rows) {
  const int64_t v = __ldg(offsets + i);
  return v < 0 ? 0 : (v > rows ? rows : v);
}

struct RowRange {
  int64_t start, end;
  __device__ __forceinline__ int64_t size() const { return end - start; }
};

// Rows [offsets[e], offsets[e+1]) of group e.
__device__ __forceinline__ RowRange group_rows(const int32_t* offsets, int e, int64_t rows) {
  const int64_t start = clamped_offset(offsets, e, rows);
  const int64_t end = clamped_offset(offsets, e + 1, rows);
  return {start, end < start ? start : end};
}

// Rows in expert order that carry an assignment (offsets[-1], the kept count).
__device__ __forceinline__ int64_t kept_rows(const int32_t* offsets, int groups, int64_t rows) {
  return clamped_offset(offsets, groups, rows);
}

template <typename T>
__device__ __forceinline__ gemm::accum_t<T> to_accum(T v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else {
    return v;
  }
}

template <typename T>
__device__ __forceinline__ T from_accum(gemm::accum_t<T> v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16(v);
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half(v);
  } else {
    return v;
  }
}

// N elements moved as one access (16 bytes when N = 16 / sizeof(T)).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_accum(const T* p, gemm::accum_t<T> (&out)[N]) {
  const Vec<T, N> v = *reinterpret_cast<const Vec<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_accum(v.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_accum(T* p, const gemm::accum_t<T> (&in)[N]) {
  Vec<T, N> v;
#pragma unroll
  for (int i = 0; i < N; ++i) v.v[i] = from_accum<T>(in[i]);
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

// Zeros bytes [begin, end) of base with 16-byte stores where aligned; the calling thread is
// worker `worker` of `workers` sweeping the range together.
__device__ __forceinline__ void zero_bytes(char* base, int64_t begin, int64_t end, int64_t worker,
                                           int64_t workers) {
  if (begin >= end) return;
  const auto addr = reinterpret_cast<uintptr_t>(base);
  int64_t head_end = begin + static_cast<int64_t>((16 - ((addr + begin) & 15)) & 15);
  if (head_end > end) head_end = end;
  const int64_t body_words = (end - head_end) / 16;
  const int64_t tail_begin = head_end + body_words * 16;
  for (int64_t i = begin + worker; i < head_end; i += workers) base[i] = 0;
  uint4* body = reinterpret_cast<uint4*>(base + head_end);
  for (int64_t i = worker; i < body_words; i += workers) body[i] = make_uint4(0, 0, 0, 0);
  for (int64_t i = tail_begin + worker; i < end; i += workers) base[i] = 0;
}

// Blocks of 256 threads for zero_bytes over `bytes`: enough to stream a few MB per launch,
// few enough (at most max_blocks) that launches with nothing to zero cost next to nothing.
inline int zero_blocks(int64_t bytes, int64_t max_blocks = 1024) {
  const int64_t blocks = (bytes / 16 + 255) / 256;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > max_blocks ? max_blocks : blocks));
}

}  // namespace fomoe::cuda
