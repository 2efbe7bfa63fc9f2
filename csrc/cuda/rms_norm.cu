// fomoe::rms_norm on the GPU (see rms_norm.h). A block per row (grid-stride over rows): each
// thread holds K accesses of N elements of the row (16 bytes of fp32 when d and the pointers
// allow, else one element), issued together, so a row of up to kThreads * K * N elements is
// read once and kept in registers between the reduction and the write; longer rows are read
// again for the second pass. Row sums go through the warps' shuffles and shared memory in a
// fixed order. The weight gradient accumulates per thread over the block's rows into one
// partial row per block (or, for rows too long for registers, a column pass over the same
// row chunks): every sum has a fixed order, so results are bitwise reproducible.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/gemm_device.cuh"
#include "cuda/rms_norm.h"

namespace fomoe::cuda::norm {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxBlocks = 132 * 8;  // a wave of 8 blocks per SM; also the weight gradient's partial rows

template <typename A>
__device__ __forceinline__ A inv_rms(A sum_sq, int64_t d, double eps) {
  if constexpr (sizeof(A) == 8) {
    return A(1) / sqrt(sum_sq / A(d) + A(eps));
  } else {
    return rsqrtf(sum_sq / A(d) + A(eps));
  }
}

// N elements of p (type P) at column c, widened to A.
template <typename P, int N, typename A>
__device__ __forceinline__ void load(const P* p, A (&v)[N]) {
  if constexpr (N > 1) {
    load_accum<P, N>(p, reinterpret_cast<gemm::accum_t<P>(&)[N]>(v));
  } else {
    v[0] = to_accum(p[0]);
  }
}

template <typename P, int N, typename A>
__device__ __forceinline__ void store(P* p, const A (&v)[N]) {
  if constexpr (N > 1) {
    store_accum<P, N>(p, reinterpret_cast<const gemm::accum_t<P>(&)[N]>(v));
  } else {
    p[0] = from_accum<P>(v[0]);
  }
}

// Sums of V values over the block, the same on every thread. `scratch` holds kWarps * V values;
// the trailing barrier lets the caller reuse it for the next row.
template <int V, typename A>
__device__ __forceinline__ void block_sums(A (&v)[V], A* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int i = 0; i < V; ++i) v[i] = group_sum<32>(v[i]);
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < V; ++i) scratch[i * kWarps + warp] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < V; ++i) {
    A total = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += scratch[i * kWarps + w];
    v[i] = total;
  }
  __syncthreads();
}

template <int N, int K>
constexpr int64_t segment_cols() {
  return int64_t{kThreads} * N * K;
}

// Column of access k of this thread within a segment.
template <int N>
__device__ __forceinline__ int64_t column(int k) {
  return (static_cast<int64_t>(k) * kThreads + threadIdx.x) * N;
}

template <typename T, typename D, typename O, int N, int K>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ x, const D* __restrict__ delta, const accum_t<T>* __restrict__ weight,
                   T* s, O* __restrict__ normed, int64_t rows, int64_t d, double eps) {
  using A = accum_t<T>;
  constexpr int64_t kSegment = segment_cols<N, K>();
  __shared__ A scratch[kWarps];
  const bool cached = d <= kSegment;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * d;
    T* sr = s + row * d;
    A v[K][N];
    A sum_sq[1] = {0};
    for (int64_t base = 0; base < d; base += kSegment) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int64_t c = base + column<N>(k);
        if (c < d) {
          load<T, N>(xr + c, v[k]);
          if (delta != nullptr) {
            A dv[N];
            load<D, N>(delta + row * d + c, dv);
#pragma unroll
            for (int j = 0; j < N; ++j) v[k][j] = to_accum(from_accum<T>(v[k][j] + dv[j]));  // s as stored
            store<T, N>(sr + c, v[k]);
          }
#pragma unroll
          for (int j = 0; j < N; ++j) sum_sq[0] += v[k][j] * v[k][j];
        }
      }
    }
    block_sums<1>(sum_sq, scratch);
    const A inv = inv_rms(sum_sq[0], d, eps);
    const T* src = delta != nullptr ? sr : xr;  // this thread's own writes: visible to it
    for (int64_t base = 0; base < d; base += kSegment) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int64_t c = base + column<N>(k);
        if (c < d) {
          if (!cached) load<T, N>(src + c, v[k]);
          A out[N], w[N];
          load<A, N>(weight + c, w);
#pragma unroll
          for (int j = 0; j < N; ++j) out[j] = v[k][j] * inv * w[j];
          store<O, N>(normed + row * d + c, out);
        }
      }
    }
  }
}

// Rows of one segment are read once, the incoming gradients with them, and add their weight
// gradient terms to the thread's registers, written as partial[blockIdx.x] at the end. Longer
// rows leave the weight gradient to weight_grad_kernel, writing rstd for it.
template <typename T, typename D, typename O, int N, int K>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const O* __restrict__ grad_normed, const T* __restrict__ grad_sum, const T* __restrict__ s,
                    const accum_t<T>* __restrict__ weight, T* __restrict__ grad_s, D* __restrict__ grad_delta,
                    accum_t<T>* __restrict__ rstd, accum_t<T>* __restrict__ partial, int64_t rows, int64_t d,
                    double eps) {
  using A = accum_t<T>;
  constexpr int64_t kSegment = segment_cols<N, K>();
  __shared__ A scratch[2 * kWarps];
  const bool cached = d <= kSegment;
  A wgrad[K][N] = {};
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* sr = s + row * d;
    const O* gr = grad_normed + row * d;
    const T* gsr = grad_sum != nullptr ? grad_sum + row * d : nullptr;
    A v[K][N], g[K][N], gs[K][N];
    A sums[2] = {0, 0};  // sum of s^2, sum of g * w * s
    for (int64_t base = 0; base < d; base += kSegment) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int64_t c = base + column<N>(k);
        if (c < d) {
          A w[N];
          load<T, N>(sr + c, v[k]);
          load<O, N>(gr + c, g[k]);
          if (cached && gsr != nullptr) load<T, N>(gsr + c, gs[k]);  // with the rest: one wait a row
          load<A, N>(weight + c, w);
#pragma unroll
          for (int j = 0; j < N; ++j) {
            sums[0] += v[k][j] * v[k][j];
            sums[1] += g[k][j] * w[j] * v[k][j];
          }
        }
      }
    }
    block_sums<2>(sums, scratch);
    const A inv = inv_rms(sums[0], d, eps);
    const A proj = inv * inv * inv * sums[1] / A(d);
    if (!cached && threadIdx.x == 0) rstd[row] = inv;
    for (int64_t base = 0; base < d; base += kSegment) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int64_t c = base + column<N>(k);
        if (c < d) {
          if (!cached) {
            load<T, N>(sr + c, v[k]);
            load<O, N>(gr + c, g[k]);
            if (gsr != nullptr) load<T, N>(gsr + c, gs[k]);
          }
          A out[N], w[N];
          load<A, N>(weight + c, w);
#pragma unroll
          for (int j = 0; j < N; ++j) {
            out[j] = inv * g[k][j] * w[j] - v[k][j] * proj;
            if (gsr != nullptr) out[j] += gs[k][j];
          }
          store<T, N>(grad_s + row * d + c, out);
          if (grad_delta != nullptr) store<D, N>(grad_delta + row * d + c, out);
          if (cached) {
#pragma unroll
            for (int j = 0; j < N; ++j) wgrad[k][j] += g[k][j] * v[k][j] * inv;
          }
        }
      }
    }
  }
  if (!cached) return;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t c = column<N>(k);
    if (c < d) store<A, N>(partial + blockIdx.x * d + c, wgrad[k]);
  }
}

// partial[chunk, c] = sum over the chunk's rows r of grad_normed[r, c] * s[r, c] * rstd[r].
template <typename T, typename O, int N>
__global__ void __launch_bounds__(kThreads)
    weight_grad_kernel(const O* __restrict__ grad_normed, const T* __restrict__ s,
                       const accum_t<T>* __restrict__ rstd, accum_t<T>* __restrict__ partial, int64_t rows,
                       int64_t d, int64_t rows_per_chunk) {
  using A = accum_t<T>;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * N;
  if (c >= d) return;
  const int64_t begin = blockIdx.y * rows_per_chunk;
  const int64_t end = begin + rows_per_chunk < rows ? begin + rows_per_chunk : rows;
  A acc[N] = {};
  for (int64_t r = begin; r < end; ++r) {
    A v[N], g[N];
    load<T, N>(s + r * d + c, v);
    load<O, N>(grad_normed + r * d + c, g);
    const A inv = rstd[r];
#pragma unroll
    for (int j = 0; j < N; ++j) acc[j] += g[j] * v[j] * inv;
  }
  store<A, N>(partial + blockIdx.y * d + c, acc);
}

bool aligned(const void* p, int64_t bytes) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Vector width: 4 elements (2 of fp64: 16 bytes), used when every row start of every tensor
// is aligned for it.
template <typename T>
constexpr int kVec = sizeof(T) == 8 ? 2 : 4;

template <int N, typename... P>
bool vectorizable(int64_t d, const P*... ptrs) {
  return d % N == 0 && (aligned(ptrs, N * sizeof(P)) && ...);
}

unsigned row_blocks(int64_t rows) {
  return static_cast<unsigned>(rows < 1 ? 1 : (rows < kMaxBlocks ? rows : kMaxBlocks));
}

// Runs f(N, K) as integral constants: the widest access the operands allow, and the fewest
// accesses a thread (2, 4 or 8) that hold the row: fewer registers, more blocks per SM. Rows of
// fp32 past 8192 elements take 8 and are read twice.
template <int VecN, typename F>
cudaError_t with_shape(bool vector, int64_t d, F&& f) {
  const auto with_k = [&](auto n) {
    constexpr int N = decltype(n)::value;
    if (d <= segment_cols<N, 2>()) return f(n, std::integral_constant<int, 2>{});
    if (d <= segment_cols<N, 4>()) return f(n, std::integral_constant<int, 4>{});
    return f(n, std::integral_constant<int, 8>{});
  };
  if (vector) return with_k(std::integral_constant<int, VecN>{});
  return with_k(std::integral_constant<int, 1>{});
}

}  // namespace

template <typename T, typename D, typename O>
cudaError_t rms_norm_forward(const T* x, const D* delta, const accum_t<T>* weight, T* s, O* normed, int64_t rows,
                             int64_t d, double eps, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  constexpr int VecN = kVec<T>;
  return with_shape<VecN>(vectorizable<VecN>(d, x, delta, s, normed, weight), d, [&](auto n, auto k) {
    forward_kernel<T, D, O, decltype(n)::value, decltype(k)::value>
        <<<row_blocks(rows), kThreads, 0, stream>>>(x, delta, weight, s, normed, rows, d, eps);
    return last_launch_error();
  });
}

int64_t rms_norm_backward_partials(int64_t rows) { return row_blocks(rows); }

template <typename T, typename D, typename O>
cudaError_t rms_norm_backward(const O* grad_normed, const T* grad_sum, const T* s, const accum_t<T>* weight,
                              T* grad_s, D* grad_delta, accum_t<T>* rstd, accum_t<T>* partial, int64_t rows,
                              int64_t d, double eps, cudaStream_t stream) {
  const unsigned blocks = row_blocks(rows);
  constexpr int VecN = kVec<T>;
  const bool vector = vectorizable<VecN>(d, grad_normed, grad_sum, s, grad_s, grad_delta, weight);
  return with_shape<VecN>(vector, d, [&](auto n, auto k) {
    constexpr int N = decltype(n)::value, K = decltype(k)::value;
    backward_kernel<T, D, O, N, K><<<blocks, kThreads, 0, stream>>>(grad_normed, grad_sum, s, weight, grad_s,
                                                                    grad_delta, rstd, partial, rows, d, eps);
    FOMOE_RETURN_IF_ERROR(last_launch_error());
    if (d > segment_cols<N, K>()) {  // rows too long for registers: the weight gradient's own pass
      const dim3 grid(static_cast<unsigned>(ceil_div(d, kThreads * N)), blocks);
      weight_grad_kernel<T, O, N><<<grid, kThreads, 0, stream>>>(grad_normed, s, rstd, partial, rows, d,
                                                                 ceil_div(rows, blocks));
    }
    return last_launch_error();
  });
}

// The dtype combinations the glue dispatches to (rms_norm.h).
#define FOMOE_RMS_NORM_INSTANTIATE(T, D, O)                                                                       \
  template cudaError_t rms_norm_forward<T, D, O>(const T*, const D*, const accum_t<T>*, T*, O*, int64_t, int64_t, \
                                                 double, cudaStream_t);                                           \
  template cudaError_t rms_norm_backward<T, D, O>(const O*, const T*, const T*, const accum_t<T>*, T*, D*,        \
                                                  accum_t<T>*, accum_t<T>*, int64_t, int64_t, double, cudaStream_t);
#define FOMOE_RMS_NORM_INSTANTIATE_FLOAT(D)         \
  FOMOE_RMS_NORM_INSTANTIATE(float, D, float)       \
  FOMOE_RMS_NORM_INSTANTIATE(float, D, __half)      \
  FOMOE_RMS_NORM_INSTANTIATE(float, D, __nv_bfloat16)
FOMOE_RMS_NORM_INSTANTIATE_FLOAT(float)
FOMOE_RMS_NORM_INSTANTIATE_FLOAT(__half)
FOMOE_RMS_NORM_INSTANTIATE_FLOAT(__nv_bfloat16)
FOMOE_RMS_NORM_INSTANTIATE(double, double, double)
FOMOE_RMS_NORM_INSTANTIATE(__half, __half, __half)
FOMOE_RMS_NORM_INSTANTIATE(__nv_bfloat16, __nv_bfloat16, __nv_bfloat16)
#undef FOMOE_RMS_NORM_INSTANTIATE_FLOAT
#undef FOMOE_RMS_NORM_INSTANTIATE


}  // namespace fomoe::cuda::norm
