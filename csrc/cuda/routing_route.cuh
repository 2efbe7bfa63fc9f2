// Router top-k kernel (fomoe::route), shared by the per-dtype files routing_route_<dtype>.cu so
// the instantiations compile in parallel. Torch-free.
//
// One aligned group of G lanes per token (G = 1..32). Ranking: higher logit first, NaN as +inf,
// -0 == +0, ties to the lower expert id (as the CPU kernel). Logits become order-preserving
// unsigned keys (key 0 = absent), so ranking is one unsigned compare plus the id.
//
// Register path (E <= 1024): lane l holds the keys of experts [l*VPL, (l+1)*VPL) of its token.
// Each of the k rounds: every lane finds its best remaining key (a strict '>' scan in ascending
// expert order keeps the lowest id among equal keys), the group reduces those candidates with a
// butterfly, and the lane that owns the pick clears that key. About five instructions per logit
// per round, no memory traffic after the first load.
// Streaming path (VPL = 0, wider routers): each round re-reads the row and takes the best expert
// ranking strictly after the previous pick (a strict total order needs no record of the taken).
#pragma once

#include "cuda/routing_common.cuh"

namespace fomoe::cuda::routing::detail {

constexpr int kRouteThreads = 256;

// Order-preserving unsigned key of a logit: NaN ranks as +inf, -0 as +0; never 0 (0 = absent).
__device__ __forceinline__ uint32_t order_key(float v) {
  if (isnan(v)) v = INFINITY;
  if (v == 0.0f) v = 0.0f;
  const uint32_t u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ uint64_t order_key(double v) {
  if (isnan(v)) v = INFINITY;
  if (v == 0.0) v = 0.0;
  const uint64_t u = static_cast<uint64_t>(__double_as_longlong(v));
  return (u >> 63) ? ~u : (u | (1ull << 63));
}
// The logit of a key (NaN comes back as +inf and -0 as +0; the caller restores NaN).
__device__ __forceinline__ float key_value(uint32_t u) {
  return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}
__device__ __forceinline__ double key_value(uint64_t u) {
  return __longlong_as_double(static_cast<long long>((u >> 63) ? (u & ~(1ull << 63)) : ~u));
}

// A ranked candidate (key, expert id); larger ranks first. fp32 math packs both into one 64-bit
// word (key << 32 | ~id), so one integer compare ranks and breaks ties.
template <typename A>
struct Candidate;

template <>
struct Candidate<float> {
  using Key = uint32_t;
  uint64_t bits;
  __device__ static Candidate none() { return {0}; }        // ranks after every expert
  __device__ static Candidate first() { return {~0ull}; }   // ranks before every expert
  __device__ static Candidate of(Key key, int e) {
    return {key == 0 ? 0ull : (uint64_t(key) << 32) | uint64_t(~uint32_t(e))};
  }
  __device__ bool before(const Candidate& o) const { return bits > o.bits; }
  __device__ int id() const { return int(~uint32_t(bits)); }
  __device__ Key key() const { return Key(bits >> 32); }
  __device__ Candidate shfl_xor(int m, int width) const { return {__shfl_xor_sync(kFullMask, bits, m, width)}; }
};

template <>
struct Candidate<double> {
  using Key = uint64_t;
  uint64_t k;
  uint32_t inv_id;
  __device__ static Candidate none() { return {0, 0}; }
  __device__ static Candidate first() { return {~0ull, ~0u}; }
  __device__ static Candidate of(Key key, int e) { return key == 0 ? none() : Candidate{key, ~uint32_t(e)}; }
  __device__ bool before(const Candidate& o) const { return k > o.k || (k == o.k && inv_id > o.inv_id); }
  __device__ int id() const { return int(~inv_id); }
  __device__ Key key() const { return k; }
  __device__ Candidate shfl_xor(int m, int width) const {
    return {__shfl_xor_sync(kFullMask, k, m, width), __shfl_xor_sync(kFullMask, inv_id, m, width)};
  }
};

template <int G, typename A>
__device__ __forceinline__ Candidate<A> group_best(Candidate<A> c) {
#pragma unroll
  for (int m = G / 2; m > 0; m /= 2) {
    const Candidate<A> other = c.shfl_xor(m, G);
    if (other.before(c)) c = other;
  }
  return c;
}

// Loads lane chunk [first, first + VPL) of a row into accumulation-dtype values; entries past E
// are flagged absent. 16-byte loads when the chunk is whole and aligned.
template <typename T, int VPL>
__device__ __forceinline__ void load_chunk(const T* row, int first, int E, bool vector_ok, acc_t<T> (&x)[VPL],
                                           bool (&present)[VPL]) {
  constexpr int kPer16 = 16 / sizeof(T);
  if constexpr ((VPL * sizeof(T)) % 16 == 0) {
    if (vector_ok && first + VPL <= E) {
      struct alignas(16) Pack {
        T v[kPer16];
      };
      const Pack* src = reinterpret_cast<const Pack*>(row + first);
#pragma unroll
      for (int j = 0; j < VPL / kPer16; ++j) {
        const Pack p = src[j];
#pragma unroll
        for (int q = 0; q < kPer16; ++q) {
          x[j * kPer16 + q] = to_acc(p.v[q]);
          present[j * kPer16 + q] = true;
        }
      }
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    present[i] = first + i < E;
    x[i] = present[i] ? to_acc(row[first + i]) : acc_t<T>(0);
  }
}

// Softmax / sigmoid weight of pick s (value x), accumulating the renormalisation sum in *denom.
template <typename A>
__device__ __forceinline__ A pick_weight(A x, A top, bool softmax, bool renormalize, A* denom) {
  A w;
  if (softmax) {
    w = exp_acc(x - top);
    if (renormalize) {
      *denom += w;
    } else {
      w = w / *denom;
    }
  } else {
    w = sigmoid_acc(x);
    if (renormalize) *denom += w;
  }
  return w;
}

template <typename T, int G, int VPL>
__global__ void __launch_bounds__(kRouteThreads)
    route_kernel(const T* __restrict__ logits, int64_t tokens, int E, int k, bool softmax, bool renormalize,
                 bool vector_ok, acc_t<T>* __restrict__ weights, int32_t* __restrict__ ids) {
  using A = acc_t<T>;
  using C = Candidate<A>;
  using K = typename C::Key;
  const int64_t t = (int64_t(blockIdx.x) * kRouteThreads + threadIdx.x) / G;
  const int lane = threadIdx.x % G;
  // Lanes past the last token still run every round: the group reductions need all 32 lanes.
  const bool active = t < tokens;
  const T* row = logits + (active ? t : 0) * int64_t(E);
  A* w_out = weights + (active ? t : 0) * int64_t(k);
  int32_t* id_out = ids + (active ? t : 0) * int64_t(k);
  A top = 0, denom = 0;

  if constexpr (VPL > 0) {
    const int first = lane * VPL;
    K key[VPL];
    uint32_t nan_bits = 0;  // NaN logits keep their value for the weights
    {
      A x[VPL];
      bool present[VPL];
      load_chunk<T, VPL>(row, active ? first : E, E, vector_ok, x, present);
#pragma unroll
      for (int i = 0; i < VPL; ++i) {
        key[i] = present[i] ? order_key(x[i]) : K(0);
        if (present[i] && isnan(x[i])) nan_bits |= 1u << i;
      }
    }
    for (int s = 0; s < k; ++s) {
      K best = 0;
      int bi = 0;
#pragma unroll
      for (int i = 0; i < VPL; ++i) {
        if (key[i] > best) {  // strict: the lowest expert id among equal keys
          best = key[i];
          bi = i;
        }
      }
      const C pick = group_best<G>(C::of(best, first + bi));
      const int e_pick = pick.id();
      const int owner = G > 1 ? e_pick / VPL : 0;
      A mine = ((nan_bits >> bi) & 1u) ? A(NAN) : key_value(best);
      const A x = G > 1 ? __shfl_sync(kFullMask, mine, owner, G) : mine;
      if (s == 0) {
        top = x;
        if (softmax && !renormalize) {  // softmax over every expert: its denominator (nothing taken yet)
          A sum = 0;
#pragma unroll
          for (int i = 0; i < VPL; ++i)
            if (key[i] != 0) sum += exp_acc((((nan_bits >> i) & 1u) ? A(NAN) : key_value(key[i])) - top);
          denom = group_sum<G>(sum);
        }
      }
      const int taken = lane == owner ? bi : -1;
#pragma unroll
      for (int i = 0; i < VPL; ++i)
        if (i == taken) key[i] = 0;
      const A w = pick_weight(x, top, softmax, renormalize, &denom);
      if (active && lane == s % G) {
        id_out[s] = e_pick;
        w_out[s] = w;
      }
    }
  } else {
    C prev = C::first();
    for (int s = 0; s < k; ++s) {
      C best = C::none();
      A best_v = 0;
      for (int e = lane; e < E && active; e += G) {
        const A x = to_acc(row[e]);
        const C c = C::of(order_key(x), e);
        if (prev.before(c) && c.before(best)) {
          best = c;
          best_v = x;
        }
      }
      best = group_best<G>(best);
      prev = best;
      const int e_pick = best.id();
      const A x = __shfl_sync(kFullMask, best_v, e_pick % G, G);  // expert e lives with lane e % G
      if (s == 0) {
        top = x;
        if (softmax && !renormalize) {
          A sum = 0;
          for (int e = lane; e < E && active; e += G) sum += exp_acc(to_acc(row[e]) - top);
          denom = group_sum<G>(sum);
        }
      }
      const A w = pick_weight(x, top, softmax, renormalize, &denom);
      if (active && lane == s % G) {
        id_out[s] = e_pick;
        w_out[s] = w;
      }
    }
  }
  if (renormalize && active) {
    // Each lane divides the picks it wrote itself (no cross-thread visibility needed).
    for (int s = lane; s < k; s += G) w_out[s] = w_out[s] / denom;
  }
}

// Group width and logits per lane for a router of E experts: up to 32 keys per lane (fewer lanes
// per token means fewer instructions per round), whole warps from 513 experts on, and
// re-reading from memory past 1024.
struct RouteShape {
  int group;
  int per_lane;  // 0: streaming
};
inline RouteShape route_shape(int64_t E) {
  if (E <= 32) {
    int vpl = 1;
    while (vpl < E) vpl *= 2;
    return {1, vpl};
  }
  if (E <= 1024) {
    int g = 1;
    while (g * 32 < E) g *= 2;
    return {g, 32};
  }
  return {32, 0};
}

template <typename T, int G, int VPL>
cudaError_t launch_route(const T* logits, int64_t T_, int E, int k, bool softmax, bool renorm, acc_t<T>* w,
                         int32_t* ids, cudaStream_t stream) {
  const int64_t blocks = ceil_div(T_ * G, kRouteThreads);
  const bool vector_ok = aligned16(logits) && (int64_t(E) * int64_t(sizeof(T))) % 16 == 0;
  route_kernel<T, G, VPL><<<static_cast<unsigned>(blocks), kRouteThreads, 0, stream>>>(logits, T_, E, k, softmax,
                                                                                      renorm, vector_ok, w, ids);
  return last_launch_error();
}

template <typename T>
cudaError_t route_typed(const T* logits, int64_t tokens, int64_t experts, int64_t top_k, bool softmax,
                        bool renormalize, acc_t<T>* weights, int32_t* ids, cudaStream_t stream) {
  const int E = static_cast<int>(experts), k = static_cast<int>(top_k);
  const RouteShape shape = route_shape(experts);
#define FOMOE_ROUTE_CASE(G, VPL)                                                                        \
  if (shape.group == G && shape.per_lane == VPL)                                                        \
    return launch_route<T, G, VPL>(logits, tokens, E, k, softmax, renormalize, weights, ids, stream);
  FOMOE_ROUTE_CASE(1, 1)
  FOMOE_ROUTE_CASE(1, 2)
  FOMOE_ROUTE_CASE(1, 4)
  FOMOE_ROUTE_CASE(1, 8)
  FOMOE_ROUTE_CASE(1, 16)
  FOMOE_ROUTE_CASE(1, 32)
  FOMOE_ROUTE_CASE(2, 32)
  FOMOE_ROUTE_CASE(4, 32)
  FOMOE_ROUTE_CASE(8, 32)
  FOMOE_ROUTE_CASE(16, 32)
  FOMOE_ROUTE_CASE(32, 32)
  FOMOE_ROUTE_CASE(32, 0)
#undef FOMOE_ROUTE_CASE
  return cudaErrorInvalidValue;
}

// Defined once per dtype in routing_route_<dtype>.cu.
extern template cudaError_t route_typed<float>(const float*, int64_t, int64_t, int64_t, bool, bool, float*, int32_t*,
                                               cudaStream_t);
extern template cudaError_t route_typed<double>(const double*, int64_t, int64_t, int64_t, bool, bool, double*,
                                                int32_t*, cudaStream_t);
extern template cudaError_t route_typed<__nv_bfloat16>(const __nv_bfloat16*, int64_t, int64_t, int64_t, bool, bool,
                                                       float*, int32_t*, cudaStream_t);
extern template cudaError_t route_typed<__half>(const __half*, int64_t, int64_t, int64_t, bool, bool, float*,
                                                int32_t*, cudaStream_t);

}  // namespace fomoe::cuda::routing::detail
