// Row movement between token order and expert order (fomoe::gather, combine, combine_gate_grad).
// Memory-bound: 16-byte vector accesses where the rows allow, several loads in flight per
// thread, and combine gathers through `inverse` (a fixed summation order per token, no atomics).
// Torch-free.
#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <type_traits>
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

// v * g element by element, rounded once per element (the gather's per-assignment scale).
template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> scaled(Vec<T, VEC> v, acc_t<T> g) {
#pragma unroll
  for (int e = 0; e < VEC; ++e) v.v[e] = from_acc<T>(mul_rn(g, to_acc(v.v[e])));
  return v;
}

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
  A s[kGatherUnroll];  // scales, applied after all loads are issued (not between them)
  int64_t dst[kGatherUnroll];
  bool store[kGatherUnroll];
  bool bad = false;  // reported once, after the loads: no call between them
#pragma unroll
  for (int u = 0; u < kGatherUnroll; ++u) {
    int64_t j;
    uint32_t c;
    cursor.at(u * kThreads + threadIdx.x, &j, &c);
    store[u] = false;
    s[u] = A(1);
    if (j >= rows) continue;
    const int p = permutation[j];
    dst[u] = j * out_stride + int64_t(c) * VEC;
    if (p >= 0 && p < assignments) {
      val[u] = *reinterpret_cast<const V*>(x + int64_t(p / k) * x_stride + int64_t(c) * VEC);
      if constexpr (kScale) s[u] = scale[p];
      store[u] = true;
    } else {
      bad |= p != -1;
#pragma unroll
      for (int e = 0; e < VEC; ++e) val[u].v[e] = from_acc<T>(A(0));
      store[u] = zero_skipped;
    }
  }
#pragma unroll
  for (int u = 0; u < kGatherUnroll; ++u) {
    if (!store[u]) continue;
    if constexpr (kScale) val[u] = scaled(val[u], s[u]);
    store_streaming(reinterpret_cast<V*>(out + dst[u]), val[u]);
  }
  if (bad) raise_error(flags, kTableEntryOutOfRange);
}

// Source rows are read once: streaming loads (evict-first) keep them from pushing other operands
// out of the caches. `load_if` gives zeros where `pred` is false; the 16-byte form is one
// predicated instruction (no branch), so the compiler keeps all of a lane's loads in flight
// together instead of splitting them around the zero-fill.
template <typename V>
__device__ __forceinline__ V load_if(const V* src, bool pred) {
  V v;
  if constexpr (sizeof(V) == 16) {
    uint32_t w[4];
    asm volatile(
        "{\n"
        "  .reg .pred p;\n"
        "  setp.ne.b32 p, %5, 0;\n"
        "  mov.b32 %0, 0;\n  mov.b32 %1, 0;\n  mov.b32 %2, 0;\n  mov.b32 %3, 0;\n"
        "  @p ld.global.cs.v4.u32 {%0, %1, %2, %3}, [%4];\n"
        "}\n"
        : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3])
        : "l"(src), "r"(int(pred)));
    memcpy(&v, w, 16);
  } else {
    memset(&v, 0, sizeof(V));  // all-zero bits: +0 in every float dtype
    if (pred) v = *src;
  }
  return v;
}

// Element e of a vector in the accumulation dtype. bf16 pairs widen straight from their 32-bit
// word, one shift or mask each (the generic conversion splits the word first, which costs
// registers when many vectors are in flight).
template <typename T, int VEC>
__device__ __forceinline__ acc_t<T> element(const Vec<T, VEC>& v, int e) {
  if constexpr (std::is_same_v<T, __nv_bfloat16> && VEC % 2 == 0) {
    uint32_t w;
    memcpy(&w, &v.v[e & ~1], 4);
    return __uint_as_float(e % 2 == 0 ? w << 16 : w & 0xffff0000u);
  } else {
    return to_acc(v.v[e]);
  }
}

// The routing table of one token for slots s0 .. s0+K-1: the source row of each slot, its gate
// weight, and a bit per slot in use (bit b clear: skipped, past k, or out of range; its row
// pointer is then `src`, never read). Every lane of a warp reads the same words, so each is one
// broadcast request, read once per warp rather than once per vector.
template <typename T, int K>
struct TokenSlots {
  const T* row[K];
  acc_t<T> gate[K];
  uint32_t used = 0;

  __device__ __forceinline__ bool in_use(int b) const { return (used >> b) & 1u; }

  // Returns whether an entry was out of range (neither -1 nor a row). All words are requested
  // before any is looked at, so the warp waits for one round trip, not K.
  __device__ __forceinline__ bool load(const T* src, int64_t src_stride, int64_t num_rows, const int32_t* inv,
                                       const acc_t<T>* gates, int s0, int k) {
    int32_t r[K];
#pragma unroll
    for (int b = 0; b < K; ++b) {
      r[b] = s0 + b < k ? __ldg(inv + s0 + b) : -1;
      gate[b] = gates != nullptr && s0 + b < k ? __ldg(gates + s0 + b) : acc_t<T>(1);
    }
    bool bad = false;
#pragma unroll
    for (int b = 0; b < K; ++b) {
      const bool valid = r[b] >= 0 && r[b] < num_rows;
      row[b] = valid ? src + int64_t(r[b]) * src_stride : src;
      used |= uint32_t(valid) << b;
      bad |= !valid && r[b] != -1;
    }
    return bad;
  }

  // Vector `vector` of slot b's row (zeros when the slot is not in use or !in_range).
  template <typename V>
  __device__ __forceinline__ V vector_of(int b, uint32_t vector, bool in_range) const {
    return load_if(reinterpret_cast<const V*>(row[b]) + vector, in_use(b) && in_range);
  }
};

// acc += gate * x over the slots in use, in slot order; skipped slots add nothing (the CPU
// kernel's sum, rounded the same way). Selects, not branches, so the sums of all vectors in
// flight can be scheduled together.
template <typename T, int VEC, int K>
__device__ __forceinline__ void accumulate(acc_t<T> (&acc)[VEC], const TokenSlots<T, K>& slots,
                                           const Vec<T, VEC> (&x)[K]) {
#pragma unroll
  for (int b = 0; b < K; ++b) {
    const bool use = slots.in_use(b);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const acc_t<T> sum = add_rn(acc[e], mul_rn(slots.gate[b], element(x[b], e)));
      acc[e] = use ? sum : acc[e];
    }
  }
}

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> round_to(const acc_t<T> (&acc)[VEC]) {
  Vec<T, VEC> v;
#pragma unroll
  for (int e = 0; e < VEC; ++e) v.v[e] = from_acc<T>(acc[e]);
  return v;
}

// Work split of combine and its gate gradient: K slots of a token are read together, over C
// vectors per lane (K * C independent 16-byte loads in flight per lane, from one warp-uniform
// table in registers). k <= K takes one pass; larger k loops over passes of K slots.
constexpr int kLoadsInFlight = 8;
constexpr int kMaxSlotsPerPass = kLoadsInFlight;
// Combine splits each token row into segments of this many warp-wide steps, so that short
// batches still give every SM enough warps, and long ones many small work items (even tails).
constexpr uint32_t kStepsPerSegment = 4;

// Blocks per SM the kernels below are compiled for. The bound matters beyond occupancy: without
// it the compiler trades the loads in flight for fewer registers (it issued combine's 8 loads as
// 3 + 5, and the gate gradient's as pairs); with it all of them are issued before the first use,
// in at most 80 registers (combine: 24 warps per SM) or 128 (gate gradient, one warp per token).
constexpr int kCombineBlocksPerSM = 3;
constexpr int kGateGradBlocksPerSM = 2;
constexpr int kTokenGatherBlocksPerSM = 2;  // 3 spilled the scaled bf16 variant (its scaled copies)

// The work item of a warp in a one-warp-per-(token, row segment) grid: its token, its vectors
// [begin, end) of the row, and the lane.
struct TokenSegment {
  int64_t token;
  uint32_t lane, begin, end;
  bool active;
  __device__ TokenSegment(int64_t tokens, uint32_t vpr, uint32_t segment_vectors, uint32_t segments) {
    const int64_t item = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / 32;
    lane = threadIdx.x % 32;
    active = item < tokens * segments;
    token = item / segments;
    begin = static_cast<uint32_t>(item % segments) * segment_vectors;
    end = min(vpr, begin + segment_vectors);
  }
};

// One warp per (token, row segment): out[t, segment] = sum over slots of gate * rows[inverse],
// the loads of K slots x C vectors issued before any of them is summed.
template <typename T, int VEC, int K, int C>
__global__ void __launch_bounds__(kThreads, kCombineBlocksPerSM)
    combine_kernel(const T* __restrict__ src, int64_t src_stride, int64_t num_rows, const int32_t* __restrict__ inverse,
                   int64_t tokens, int k, const acc_t<T>* __restrict__ gate, T* __restrict__ out, int64_t out_stride,
                   uint32_t vpr, uint32_t segment_vectors, uint32_t segments, uint32_t* flags) {
  using V = Vec<T, VEC>;
  using A = acc_t<T>;
  const TokenSegment seg(tokens, vpr, segment_vectors, segments);
  if (!seg.active) return;  // whole warps leave together
  const int64_t t = seg.token;
  const uint32_t lane = seg.lane, begin = seg.begin, end = seg.end;
  const int32_t* inv = inverse + t * k;
  const A* gates = gate != nullptr ? gate + t * k : nullptr;
  V* y = reinterpret_cast<V*>(out + t * out_stride);
  bool bad = false;
  if (k <= K) {
    TokenSlots<T, K> slots;
    bad = slots.load(src, src_stride, num_rows, inv, gates, 0, k);
    for (uint32_t c0 = begin + lane; c0 < end; c0 += 32 * C) {
      V x[C][K];
#pragma unroll
      for (int u = 0; u < C; ++u)
#pragma unroll
        for (int b = 0; b < K; ++b) x[u][b] = slots.template vector_of<V>(b, c0 + u * 32, c0 + u * 32 < end);
#pragma unroll
      for (int u = 0; u < C; ++u) {
        A acc[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] = A(0);
        accumulate(acc, slots, x[u]);
        if (c0 + u * 32 < end) store_streaming(y + c0 + u * 32, round_to<T>(acc));
      }
    }
  } else if constexpr (K == kMaxSlotsPerPass && C == 1) {
    // k > K: passes of K slots per vector; the table words come from L1 after the first vector.
    for (uint32_t c = begin + lane; c < end; c += 32) {
      A acc[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] = A(0);
      for (int s0 = 0; s0 < k; s0 += K) {
        TokenSlots<T, K> slots;
        bad |= slots.load(src, src_stride, num_rows, inv, gates, s0, k);
        V x[K];
#pragma unroll
        for (int b = 0; b < K; ++b) x[b] = slots.template vector_of<V>(b, c, true);
        accumulate(acc, slots, x);
      }
      store_streaming(y + c, round_to<T>(acc));
    }
  }
  if (bad && lane == 0) raise_error(flags, kTableEntryOutOfRange);
}

// One warp per token: grad_gate[t, s] = <gy[t], rows[inverse[t, s]]> for K slots per pass over the
// row, each lane summing its vectors in a fixed order, then a fixed butterfly over the lanes.
template <typename T, int VEC, int K, int C>
__global__ void __launch_bounds__(kThreads, kGateGradBlocksPerSM)
    combine_gate_grad_kernel(const T* __restrict__ gy, int64_t gy_stride, const T* __restrict__ src,
                             int64_t src_stride, int64_t num_rows, const int32_t* __restrict__ inverse,
                             int64_t tokens, int k, uint32_t vpr, acc_t<T>* __restrict__ grad_gate, uint32_t* flags) {
  using V = Vec<T, VEC>;
  using A = acc_t<T>;
  const int64_t t = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const uint32_t lane = threadIdx.x % 32;
  if (t >= tokens) return;  // whole warps leave together
  const V* a = reinterpret_cast<const V*>(gy + t * gy_stride);
  bool bad = false;
  for (int s0 = 0; s0 < k; s0 += K) {
    TokenSlots<T, K> slots;
    bad |= slots.load(src, src_stride, num_rows, inverse + t * k, nullptr, s0, k);
    A dot[K];
#pragma unroll
    for (int b = 0; b < K; ++b) dot[b] = A(0);
    for (uint32_t c0 = lane; c0 < vpr; c0 += 32 * C) {
      V ga[C], x[C][K];
#pragma unroll
      for (int u = 0; u < C; ++u) {
        const bool in_row = c0 + u * 32 < vpr;
        ga[u] = load_if(a + c0 + u * 32, in_row);
#pragma unroll
        for (int b = 0; b < K; ++b) x[u][b] = slots.template vector_of<V>(b, c0 + u * 32, in_row);
      }
      // Zeros (skipped slots, past the row) add exact zeros: every lane's order stays fixed.
#pragma unroll
      for (int u = 0; u < C; ++u)
#pragma unroll
        for (int b = 0; b < K; ++b)
#pragma unroll
          for (int e = 0; e < VEC; ++e) dot[b] += element(ga[u], e) * element(x[u][b], e);
    }
#pragma unroll
    for (int b = 0; b < K; ++b) {
      const A sum = group_sum<32>(dot[b]);
      if (lane == uint32_t(b) && s0 + b < k) grad_gate[t * k + s0 + b] = slots.in_use(b) ? sum : A(0);
    }
  }
  if (bad && lane == 0) raise_error(flags, kTableEntryOutOfRange);
}

// The rows gather_by_token_kernel does not write: one thread checks each output row, then its
// warp copies, one after another, the rows its lanes found (all lanes share each copy). A row
// whose entry p is valid but not named back by inverse[p] is copied; p == -1 gives zeros (when
// asked for); entries outside [-1, assignments) raise the flag and count as -1. For tables from
// dispatch no row needs a copy: a thread reads a word or two per row, so this pass costs a
// small grid (a warp per row cost 8x the token pass's blocks and ~15 us per gather at 2^17 rows).
template <typename T, int VEC, bool kScale>
__device__ __forceinline__ void unmapped_rows(int64_t block, const T* __restrict__ x, int64_t x_stride,
                                              int64_t assignments, int k, const int32_t* __restrict__ permutation,
                                              const int32_t* __restrict__ inverse, int64_t rows,
                                              const acc_t<T>* __restrict__ scale, T* __restrict__ out,
                                              int64_t out_stride, uint32_t vpr, bool zero_skipped, uint32_t* flags) {
  using V = Vec<T, VEC>;
  using A = acc_t<T>;
  const int64_t j = block * kThreads + threadIdx.x;
  const uint32_t lane = threadIdx.x % 32;
  if (j - lane >= rows) return;  // whole warps leave together
  int p = -1;
  bool needs_copy = false;
  if (j < rows) {
    p = __ldg(permutation + j);
    const bool valid = p >= 0 && p < assignments;
    if (!valid && p != -1) {
      raise_error(flags, kTableEntryOutOfRange);
      p = -1;
    }
    needs_copy = valid ? __ldg(inverse + p) != j : zero_skipped;
  }
  for (uint32_t todo = __ballot_sync(0xffffffffu, needs_copy); todo != 0; todo &= todo - 1) {
    const int from = __ffs(todo) - 1;
    const int64_t row = __shfl_sync(0xffffffffu, j, from);
    const int src_p = __shfl_sync(0xffffffffu, p, from);
    const bool valid = src_p >= 0;
    const V* src = reinterpret_cast<const V*>(x + int64_t(valid ? src_p / k : 0) * x_stride);
    [[maybe_unused]] const A g = kScale && valid ? __ldg(scale + src_p) : A(1);
    V* dst = reinterpret_cast<V*>(out + row * out_stride);
    for (uint32_t c = lane; c < vpr; c += 32) {
      const V w = load_if(src + c, valid);
      store_streaming(dst + c, kScale ? scaled(w, g) : w);
    }
  }
}

// Token-major gather: one warp per (token, row segment) loads its C vectors per lane of the
// token row once, then stores them (scaled per slot) to each row r = inverse[t, s] whose
// permutation entry names that assignment back. The blocks past token_blocks run
// unmapped_rows over every other row (one launch for both passes), so the result is the
// row-by-row kernel's for any tables: each row is written exactly once.
template <typename T, int VEC, int C, bool kScale>
__global__ void __launch_bounds__(kThreads, kTokenGatherBlocksPerSM)
    gather_by_token_kernel(const T* __restrict__ x, int64_t x_stride, int64_t tokens, int k,
                           const int32_t* __restrict__ permutation, const int32_t* __restrict__ inverse, int64_t rows,
                           const acc_t<T>* __restrict__ scale, T* __restrict__ out, int64_t out_stride, uint32_t vpr,
                           uint32_t segment_vectors, uint32_t segments, uint32_t token_blocks, bool zero_skipped,
                           uint32_t* flags) {
  using V = Vec<T, VEC>;
  using A = acc_t<T>;
  if (blockIdx.x >= token_blocks) {
    unmapped_rows<T, VEC, kScale>(blockIdx.x - token_blocks, x, x_stride, tokens * k, k, permutation, inverse, rows,
                                  scale, out, out_stride, vpr, zero_skipped, flags);
    return;
  }
  const TokenSegment seg(tokens, vpr, segment_vectors, segments);
  if (!seg.active) return;  // whole warps leave together
  const int64_t t = seg.token;
  const uint32_t lane = seg.lane, begin = seg.begin, end = seg.end;
  const auto writes_row = [&](int s, int32_t& r) {
    const int64_t a = t * k + s;
    r = __ldg(inverse + a);  // the same words in every lane: broadcasts, warp-uniform
    return r >= 0 && r < rows && __ldg(permutation + r) == a;
  };
  // A token whose assignments are all skipped is not read at all (skip-token saves its reads).
  bool any = false;
  for (int s = 0; s < k && !any; ++s) {
    int32_t r;
    any = writes_row(s, r);
  }
  if (!any) return;
  const V* src = reinterpret_cast<const V*>(x + t * x_stride);
  for (uint32_t c0 = begin + lane; c0 < end; c0 += 32 * C) {
    V v[C];
#pragma unroll
    for (int u = 0; u < C; ++u) v[u] = load_if(src + c0 + u * 32, c0 + u * 32 < end);
    for (int s = 0; s < k; ++s) {
      int32_t r;
      if (!writes_row(s, r)) continue;
      V* dst = reinterpret_cast<V*>(out + int64_t(r) * out_stride);
      [[maybe_unused]] const A g = kScale ? __ldg(scale + t * k + s) : A(1);
#pragma unroll
      for (int u = 0; u < C; ++u) {
        if (c0 + u * 32 >= end) continue;
        store_streaming(dst + c0 + u * 32, kScale ? scaled(v[u], g) : v[u]);
      }
    }
  }
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

// Token-major gather (see gather_by_token_kernel) when the inverse is given, rows are vectors,
// and the batch has enough tokens to fill the GPU with one warp per token segment (below that,
// the row-by-row kernel keeps more loads in flight, and the token rows fit in L2 anyway).
constexpr int kTokenGatherVectors = 8;        // C: vectors in flight per lane
constexpr int64_t kTokenGatherMinWarps = 4096;

template <typename T, int VEC>
cudaError_t launch_gather_by_token(const GatherRows& p, uint32_t vpr, cudaStream_t stream) {
  constexpr int C = kTokenGatherVectors;
  const uint32_t segment_vectors = 32 * C;   // one warp-wide step per segment: many small work items
  const uint32_t segments = static_cast<uint32_t>(ceil_div(vpr, segment_vectors));
  const int64_t token_blocks = ceil_div(p.tokens * segments, kThreads / 32);
  const int64_t row_blocks = ceil_div(p.rows, kThreads);  // a thread per row
  if (!grid_ok(token_blocks + row_blocks)) return cudaErrorInvalidValue;
  const auto* x = static_cast<const T*>(p.x);
  const auto* scale = static_cast<const acc_t<T>*>(p.scale);
  auto* out = static_cast<T*>(p.out);
  const int k = static_cast<int>(p.top_k);
  const auto run = [&](auto scaled) -> cudaError_t {
    constexpr bool kScale = decltype(scaled)::value;
    gather_by_token_kernel<T, VEC, C, kScale><<<static_cast<unsigned>(token_blocks + row_blocks), kThreads, 0, stream>>>(
        x, p.x_stride, p.tokens, k, p.permutation, p.inverse, p.rows, scale, out, p.out_stride, vpr, segment_vectors,
        segments, static_cast<uint32_t>(token_blocks), p.zero_skipped_rows, p.error_flags);
    return last_launch_error();
  };
  return scale != nullptr ? run(std::true_type{}) : run(std::false_type{});
}

template <typename T, int VEC>
cudaError_t launch_gather(const GatherRows& p, cudaStream_t stream) {
  const uint32_t vpr = static_cast<uint32_t>(p.d / VEC);
  if constexpr (VEC > 1) {
    if (p.inverse != nullptr &&
        p.tokens * ceil_div(vpr, 32 * kTokenGatherVectors) >= kTokenGatherMinWarps)
      return launch_gather_by_token<T, VEC>(p, vpr, stream);
  }
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

// Runs f(Slots<K>{}, Columns<C>{}) with K slots x C vectors per lane for top_k: K * C loads in
// flight whatever k is (k = 1: 1 x 8 ... k >= 5: 8 x 1). The element path (rows that are not
// 16-byte aligned) takes one shape: it is the slow path anyway.
template <int N>
using Const = std::integral_constant<int, N>;
template <int VEC, typename F>
cudaError_t with_pass_shape(int64_t top_k, F&& f) {
  if constexpr (VEC == 1) {
    return f(Const<kMaxSlotsPerPass>{}, Const<kLoadsInFlight / kMaxSlotsPerPass>{});
  } else {
    if (top_k > 4) return f(Const<kMaxSlotsPerPass>{}, Const<kLoadsInFlight / kMaxSlotsPerPass>{});
    if (top_k > 2) return f(Const<4>{}, Const<kLoadsInFlight / 4>{});
    if (top_k == 2) return f(Const<2>{}, Const<kLoadsInFlight / 2>{});
    return f(Const<1>{}, Const<kLoadsInFlight>{});
  }
}

template <typename T, int VEC>
cudaError_t launch_combine(const CombineRows& p, cudaStream_t stream) {
  const uint32_t vpr = static_cast<uint32_t>(p.d / VEC);
  return with_pass_shape<VEC>(p.top_k, [&](auto slots, auto columns) -> cudaError_t {
    constexpr int K = decltype(slots)::value, C = decltype(columns)::value;
    constexpr uint32_t kStep = 32 * C;  // vectors one warp covers per step
    const uint32_t segment_vectors = static_cast<uint32_t>(
        std::min<int64_t>(ceil_div(vpr, kStep), kStepsPerSegment) * kStep);
    const uint32_t segments = static_cast<uint32_t>(ceil_div(vpr, segment_vectors));
    if (p.tokens > int64_t(INT32_MAX) * (kThreads / 32) / segments) return cudaErrorInvalidValue;  // grid limit
    const int64_t blocks = ceil_div(p.tokens * segments, kThreads / 32);
    if (!grid_ok(blocks)) return cudaErrorInvalidValue;
    combine_kernel<T, VEC, K, C><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        static_cast<const T*>(p.rows), p.rows_stride, p.num_rows, p.inverse, p.tokens, static_cast<int>(p.top_k),
        static_cast<const acc_t<T>*>(p.gate), static_cast<T*>(p.out), p.out_stride, vpr, segment_vectors, segments,
        p.error_flags);
    return last_launch_error();
  });
}

template <typename T, int VEC>
cudaError_t launch_combine_gate_grad(const CombineGateGrad& p, cudaStream_t stream) {
  const int64_t blocks = ceil_div(p.tokens, kThreads / 32);
  if (!grid_ok(blocks)) return cudaErrorInvalidValue;
  return with_pass_shape<VEC>(p.top_k, [&](auto slots, auto columns) -> cudaError_t {
    combine_gate_grad_kernel<T, VEC, decltype(slots)::value, decltype(columns)::value>
        <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
            static_cast<const T*>(p.grad_out), p.grad_out_stride, static_cast<const T*>(p.rows), p.rows_stride,
            p.num_rows, p.inverse, p.tokens, static_cast<int>(p.top_k), static_cast<uint32_t>(p.d / VEC),
            static_cast<acc_t<T>*>(p.grad_gate), p.error_flags);
    return last_launch_error();
  });
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
    if (vector_width<T>(p.d, {{p.rows, p.rows_stride}, {p.out, p.out_stride}}) == 1) return launch_combine<T, 1>(p, stream);
    return launch_combine<T, 16 / sizeof(T)>(p, stream);
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
