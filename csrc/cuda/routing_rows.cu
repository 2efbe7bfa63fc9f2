// Row movement between token order and expert order (fomoe::gather, combine, combine_gate_grad).
// Memory-bound: 16-byte vector accesses where the rows allow, several loads in flight per
// thread, and combine gathers through `inverse` (a fixed summation order per token, no atomics).
// Torch-free.
#include <initializer_list>
#include <utility>

#include "cuda/routing_flags.cuh"

namespace fomoe::cuda::routing {
namespace detail {
namespace {

constexpr int kThreads = 256;
constexpr int kGatherUnroll = 8;  // vectors per thread in flight (gather)

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// Outputs are written once and not read back by these kernels: streaming stores (evict-first in
// L2) leave the cache to the inputs that are read several times (gather's token rows).
template <typename V>
__device__ __forceinline__ void store_streaming(V* dst, const V& v) {
  if constexpr (sizeof(V) == 16) {
    __stcs(reinterpret_cast<uint4*>(dst), *reinterpret_cast<const uint4*>(&v));
  } else {
    *dst = v;
  }
}

// Splits vector index `first + off` (off < 2^31) of a row-major [rows, vpr] grid into (row, col)
// with one 64-bit division per block and a 32-bit one per element.
struct RowCursor {
  int64_t row0;
  uint32_t col0, vpr;
  __device__ RowCursor(int64_t first, uint32_t vectors_per_row)
      : row0(first / vectors_per_row), col0(static_cast<uint32_t>(first % vectors_per_row)), vpr(vectors_per_row) {}
  __device__ void at(uint32_t off, int64_t* row, uint32_t* col) const {
    const uint32_t x = col0 + off;
    *row = row0 + x / vpr;
    *col = x % vpr;
  }
};

template <typename T, int VEC, bool kScale>
__global__ void __launch_bounds__(kThreads)
    gather_kernel(const T* __restrict__ x, int64_t x_stride, int64_t assignments, int k,
                  const int32_t* __restrict__ permutation, int64_t rows, const acc_t<T>* __restrict__ scale,
                  T* __restrict__ out, int64_t out_stride, uint32_t vpr, bool zero_skipped, uint32_t* flags) {
  using V = Vec<T, VEC>;
  using A = acc_t<T>;
  const RowCursor cursor(int64_t(blockIdx.x) * (kThreads * kGatherUnroll), vpr);
  V val[kGatherUnroll];
  int64_t dst[kGatherUnroll];
  bool store[kGatherUnroll];
  bool bad = false;  // reported once, after the loads: no call between them
#pragma unroll
  for (int u = 0; u < kGatherUnroll; ++u) {
    int64_t j;
    uint32_t c;
    cursor.at(u * kThreads + threadIdx.x, &j, &c);
    store[u] = false;
    if (j >= rows) continue;
    const int p = permutation[j];
    dst[u] = j * out_stride + int64_t(c) * VEC;
    if (p >= 0 && p < assignments) {
      val[u] = *reinterpret_cast<const V*>(x + int64_t(p / k) * x_stride + int64_t(c) * VEC);
      if constexpr (kScale) {
        const A s = scale[p];
#pragma unroll
        for (int e = 0; e < VEC; ++e) val[u].v[e] = from_acc<T>(mul_rn(s, to_acc(val[u].v[e])));
      }
      store[u] = true;
    } else {
      bad |= p != -1;
#pragma unroll
      for (int e = 0; e < VEC; ++e) val[u].v[e] = from_acc<T>(A(0));
      store[u] = zero_skipped;
    }
  }
#pragma unroll
  for (int u = 0; u < kGatherUnroll; ++u)
    if (store[u]) store_streaming(reinterpret_cast<V*>(out + dst[u]), val[u]);
  if (bad) raise_error(flags, kTableEntryOutOfRange);
}

// B: source rows in flight per output vector, chosen from k: more rows in flight cost registers
// and with them occupancy.
template <typename T, int VEC, bool kGate, int B>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(const T* __restrict__ src, int64_t src_stride, int64_t num_rows, const int32_t* __restrict__ inverse,
                   int64_t tokens, int k, const acc_t<T>* __restrict__ gate, T* __restrict__ out, int64_t out_stride,
                   uint32_t vpr, uint32_t* flags) {
  using V = Vec<T, VEC>;
  using A = acc_t<T>;
  const RowCursor cursor(int64_t(blockIdx.x) * kThreads, vpr);
  int64_t t;
  uint32_t c;
  cursor.at(threadIdx.x, &t, &c);
  if (t >= tokens) return;
  const int32_t* inv = inverse + t * k;
  bool bad = false;
  A acc[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) acc[e] = A(0);
  for (int s0 = 0; s0 < k; s0 += B) {
    V x[B];
    A g[B];
    bool use[B];
#pragma unroll
    for (int b = 0; b < B; ++b) {
      const int s = s0 + b;
      use[b] = false;
      if (s >= k) continue;
      const int r = inv[s];
      if (r >= 0 && r < num_rows) {
        x[b] = *reinterpret_cast<const V*>(src + int64_t(r) * src_stride + int64_t(c) * VEC);
        g[b] = kGate ? gate[t * k + s] : A(1);
        use[b] = true;
      } else {
        bad |= r != -1;
      }
    }
    // Slot order, skipped slots add nothing: the CPU kernel's sum, rounded the same way.
#pragma unroll
    for (int b = 0; b < B; ++b) {
      if (!use[b]) continue;
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] = add_rn(acc[e], mul_rn(g[b], to_acc(x[b].v[e])));
    }
  }
  V y;
#pragma unroll
  for (int e = 0; e < VEC; ++e) y.v[e] = from_acc<T>(acc[e]);
  store_streaming(reinterpret_cast<V*>(out + t * out_stride + int64_t(c) * VEC), y);
  if (bad) raise_error(flags, kTableEntryOutOfRange);
}

// One warp per (token, slot): a row dot product, reduced in a fixed butterfly order.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    combine_gate_grad_kernel(const T* __restrict__ gy, int64_t gy_stride, const T* __restrict__ src,
                             int64_t src_stride, int64_t num_rows, const int32_t* __restrict__ inverse,
                             int64_t pairs, int k, uint32_t vpr, acc_t<T>* __restrict__ grad_gate, uint32_t* flags) {
  using V = Vec<T, VEC>;
  using A = acc_t<T>;
  const int64_t pair = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (pair >= pairs) return;  // whole warps leave together
  const int r = inverse[pair];
  const bool valid = r >= 0 && r < num_rows;
  if (!valid) {
    if (lane == 0) {
      if (r != -1) raise_error(flags, kTableEntryOutOfRange);
      grad_gate[pair] = A(0);
    }
    return;
  }
  const T* a = gy + (pair / k) * gy_stride;
  const T* b = src + int64_t(r) * src_stride;
  A dot = 0;
  for (uint32_t c = lane; c < vpr; c += 32) {
    const V va = *reinterpret_cast<const V*>(a + int64_t(c) * VEC);
    const V vb = *reinterpret_cast<const V*>(b + int64_t(c) * VEC);
#pragma unroll
    for (int e = 0; e < VEC; ++e) dot += to_acc(va.v[e]) * to_acc(vb.v[e]);
  }
  dot = group_sum<32>(dot);
  if (lane == 0) grad_gate[pair] = dot;
}

// 16-byte vectors when every row start is 16-byte aligned, else single elements.
template <typename T>
int vector_width(int64_t d, std::initializer_list<std::pair<const void*, int64_t>> matrices) {
  constexpr int kVec = 16 / sizeof(T);
  if (d % kVec != 0) return 1;
  for (const auto& [ptr, stride] : matrices)
    if (!aligned16(ptr) || (stride * int64_t(sizeof(T))) % 16 != 0) return 1;
  return kVec;
}

// Grids past 2^31-1 blocks are out of reach (rows of 2^40 bytes and more).
inline bool grid_ok(int64_t blocks) { return blocks <= INT32_MAX; }

template <typename T, int VEC>
cudaError_t launch_gather(const GatherRows& p, cudaStream_t stream) {
  const uint32_t vpr = static_cast<uint32_t>(p.d / VEC);
  const int64_t blocks = ceil_div(p.rows * vpr, kThreads * kGatherUnroll);
  if (!grid_ok(blocks)) return cudaErrorInvalidValue;
  const auto* x = static_cast<const T*>(p.x);
  const auto* scale = static_cast<const acc_t<T>*>(p.scale);
  auto* out = static_cast<T*>(p.out);
  const int64_t assignments = p.tokens * p.top_k;
  const int k = static_cast<int>(p.top_k);
  if (scale != nullptr) {
    gather_kernel<T, VEC, true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        x, p.x_stride, assignments, k, p.permutation, p.rows, scale, out, p.out_stride, vpr, p.zero_skipped_rows,
        p.error_flags);
  } else {
    gather_kernel<T, VEC, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        x, p.x_stride, assignments, k, p.permutation, p.rows, scale, out, p.out_stride, vpr, p.zero_skipped_rows,
        p.error_flags);
  }
  return last_launch_error();
}

template <typename T, int VEC, int B>
cudaError_t launch_combine(const CombineRows& p, cudaStream_t stream) {
  const uint32_t vpr = static_cast<uint32_t>(p.d / VEC);
  const int64_t blocks = ceil_div(p.tokens * vpr, kThreads);
  if (!grid_ok(blocks)) return cudaErrorInvalidValue;
  const auto* rows = static_cast<const T*>(p.rows);
  const auto* gate = static_cast<const acc_t<T>*>(p.gate);
  auto* out = static_cast<T*>(p.out);
  const int k = static_cast<int>(p.top_k);
  if (gate != nullptr) {
    combine_kernel<T, VEC, true, B><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        rows, p.rows_stride, p.num_rows, p.inverse, p.tokens, k, gate, out, p.out_stride, vpr, p.error_flags);
  } else {
    combine_kernel<T, VEC, false, B><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        rows, p.rows_stride, p.num_rows, p.inverse, p.tokens, k, gate, out, p.out_stride, vpr, p.error_flags);
  }
  return last_launch_error();
}

template <typename T, int VEC>
cudaError_t launch_combine_gate_grad(const CombineGateGrad& p, cudaStream_t stream) {
  const int64_t pairs = p.tokens * p.top_k;
  const int64_t blocks = ceil_div(pairs * 32, kThreads);
  if (!grid_ok(blocks)) return cudaErrorInvalidValue;
  combine_gate_grad_kernel<T, VEC><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(p.grad_out), p.grad_out_stride, static_cast<const T*>(p.rows), p.rows_stride, p.num_rows,
      p.inverse, pairs, static_cast<int>(p.top_k), static_cast<uint32_t>(p.d / VEC),
      static_cast<acc_t<T>*>(p.grad_gate), p.error_flags);
  return last_launch_error();
}

// Row lengths must fit 32-bit vector indices; row counts the 64-bit products below.
bool sizes_ok(int64_t rows, int64_t d) { return rows >= 0 && d >= 0 && d < INT32_MAX && rows < (int64_t(1) << 40); }

}  // namespace

cudaError_t take_sticky_flags_rows(uint32_t* flags, bool clear) { return take_this_files_sticky_flags(flags, clear); }

}  // namespace detail

cudaError_t gather_rows(const GatherRows& p, cudaStream_t stream) {
  using namespace detail;
  if (!sizes_ok(p.rows, p.d) || p.tokens < 0 || p.top_k < 1 || p.top_k > INT32_MAX) return cudaErrorInvalidValue;
  if (p.rows == 0 || p.d == 0) return cudaSuccess;
  return with_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    if (vector_width<T>(p.d, {{p.x, p.x_stride}, {p.out, p.out_stride}}) == 1) return launch_gather<T, 1>(p, stream);
    return launch_gather<T, 16 / sizeof(T)>(p, stream);
  });
}

cudaError_t combine_rows(const CombineRows& p, cudaStream_t stream) {
  using namespace detail;
  if (!sizes_ok(p.tokens, p.d) || p.num_rows < 0 || p.top_k < 0 || p.top_k > INT32_MAX) return cudaErrorInvalidValue;
  if (p.tokens == 0 || p.d == 0) return cudaSuccess;
  return with_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    if (vector_width<T>(p.d, {{p.rows, p.rows_stride}, {p.out, p.out_stride}}) == 1)
      return launch_combine<T, 1, 4>(p, stream);
    constexpr int kVec = 16 / sizeof(T);
    // Measured on an H200 (bench/RESULTS.md): 8 rows in flight at 107 registers ran slower than
    // 4 at 67 (occupancy), and 2 rows at 45 registers suit k <= 2.
    if (p.top_k <= 2) return launch_combine<T, kVec, 2>(p, stream);
    return launch_combine<T, kVec, 4>(p, stream);
  });
}

cudaError_t combine_gate_grad(const CombineGateGrad& p, cudaStream_t stream) {
  using namespace detail;
  if (!sizes_ok(p.tokens, p.d) || p.num_rows < 0 || p.top_k < 0 || p.top_k > INT32_MAX) return cudaErrorInvalidValue;
  if (p.tokens == 0 || p.top_k == 0) return cudaSuccess;
  return with_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    if (vector_width<T>(p.d, {{p.grad_out, p.grad_out_stride}, {p.rows, p.rows_stride}}) == 1)
      return launch_combine_gate_grad<T, 1>(p, stream);
    return launch_combine_gate_grad<T, 16 / sizeof(T)>(p, stream);
  });
}

}  // namespace fomoe::cuda::routing
