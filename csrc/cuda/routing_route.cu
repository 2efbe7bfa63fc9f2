// fomoe::route launcher (kernels in routing_route.cuh, instantiated per dtype) and the
// fomoe::route_backward kernel. Torch-free.
#include "cuda/routing_flags.cuh"
#include "cuda/routing_route.cuh"

namespace fomoe::cuda::routing {
namespace detail {
namespace {

// Reductions over aligned groups of a run-time number G of lanes (a power of two dividing 32).
template <typename V>
__device__ __forceinline__ V group_sum_n(V v, int G) {
  for (int m = G / 2; m > 0; m /= 2) v += __shfl_xor_sync(kFullMask, v, m, G);
  return v;
}
template <typename V>
__device__ __forceinline__ V group_max_n(V v, int G) {
  for (int m = G / 2; m > 0; m /= 2) v = max_acc(v, __shfl_xor_sync(kFullMask, v, m, G));
  return v;
}

// One group of G lanes per token (G chosen as for the forward, at run time: the backward is
// cheap and one kernel per dtype keeps the build short), lane-strided over the experts. Mirrors
// the CPU kernel's formulas and summation orders; ids held fixed, duplicates behave as there
// (last write wins for assignments, in-order accumulation for the full-softmax case).
template <typename T>
__global__ void __launch_bounds__(kRouteThreads)
    route_backward_kernel(const acc_t<T>* __restrict__ grad_weights, const T* __restrict__ logits,
                          const acc_t<T>* __restrict__ weights, const int32_t* __restrict__ ids, int64_t tokens,
                          int E, int k, int G, bool softmax, bool renormalize, T* __restrict__ grad,
                          uint32_t* error_flags) {
  using A = acc_t<T>;
  const int64_t t = (int64_t(blockIdx.x) * kRouteThreads + threadIdx.x) / G;
  const int lane = threadIdx.x % G;
  const bool active = t < tokens;
  const int64_t tt = active ? t : 0;
  const T* row = logits + tt * E;
  const A* gw = grad_weights + tt * k;
  const A* w = weights + tt * k;
  const int32_t* id = ids + tt * k;
  T* out = grad + tt * E;

  A dot = 0;  // sum_s grad_w[s] * w[s]
  for (int s = 0; s < k; ++s) dot = add_rn(dot, mul_rn(gw[s], w[s]));
  if (active && lane == 0) {
    bool bad = false;
    for (int s = 0; s < k; ++s) bad |= id[s] < 0 || id[s] >= E;
    if (bad) raise_error(error_flags, kExpertIdOutOfRange);
  }

  if (softmax && !renormalize) {
    // w = p[ids] with p the softmax over all experts: grad = p * (scatter(grad_w) - dot).
    A mx = -INFINITY;
    for (int e = lane; e < E; e += G) mx = max_acc(mx, to_acc(row[e]));
    mx = group_max_n(mx, G);
    A denom = 0;
    for (int e = lane; e < E; e += G) denom += exp_acc(to_acc(row[e]) - mx);
    denom = group_sum_n(denom, G);
    if (!active) return;
    for (int e = lane; e < E; e += G) {
      A g = mul_rn(-dot, exp_acc(to_acc(row[e]) - mx)) / denom;
      for (int s = 0; s < k; ++s)
        if (id[s] == e) g = add_rn(g, mul_rn(w[s], gw[s]));
      out[e] = from_acc<T>(g);
    }
    return;
  }
  if (!active) return;
  if (softmax) {
    // w = softmax over the selected logits.
    for (int e = lane; e < E; e += G) {
      A g = 0;
      for (int s = 0; s < k; ++s)
        if (id[s] == e) g = mul_rn(w[s], gw[s] - dot);
      out[e] = from_acc<T>(g);
    }
    return;
  }
  // Sigmoid: w = sig[ids] (/ sum over the selected when renormalised).
  A total = 0;
  if (renormalize) {
    for (int s = 0; s < k; ++s)
      if (id[s] >= 0 && id[s] < E) total = add_rn(total, sigmoid_acc(to_acc(row[id[s]])));
  }
  for (int e = lane; e < E; e += G) {
    A g = 0;
    for (int s = 0; s < k; ++s) {
      if (id[s] != e) continue;
      const A sg = sigmoid_acc(to_acc(row[e]));
      const A grad_sig = renormalize ? (gw[s] - dot) / total : gw[s];
      g = mul_rn(mul_rn(grad_sig, sg), A(1) - sg);
    }
    out[e] = from_acc<T>(g);
  }
}

template <typename T>
cudaError_t launch_route_backward(const acc_t<T>* gw, const T* logits, const acc_t<T>* w, const int32_t* ids,
                                  int64_t tokens, int E, int k, int G, bool softmax, bool renorm, T* grad,
                                  uint32_t* flags, cudaStream_t stream) {
  const int64_t blocks = ceil_div(tokens * G, kRouteThreads);
  route_backward_kernel<T><<<static_cast<unsigned>(blocks), kRouteThreads, 0, stream>>>(
      gw, logits, w, ids, tokens, E, k, G, softmax, renorm, grad, flags);
  return last_launch_error();
}

}  // namespace

cudaError_t take_sticky_flags_route(uint32_t* flags, bool clear) { return take_this_files_sticky_flags(flags, clear); }

}  // namespace detail

cudaError_t route(const void* logits, DType dtype, int64_t tokens, int64_t experts, int64_t top_k, Score score,
                  bool renormalize, void* weights, int32_t* ids, cudaStream_t stream) {
  if (tokens < 0 || experts < 1 || top_k < 1 || top_k > experts || experts > INT32_MAX) return cudaErrorInvalidValue;
  if (tokens == 0) return cudaSuccess;
  const bool softmax = score == Score::kSoftmax;
  return detail::with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return detail::route_typed<T>(static_cast<const T*>(logits), tokens, experts, top_k, softmax, renormalize,
                                  static_cast<detail::acc_t<T>*>(weights), ids, stream);
  });
}

cudaError_t route_backward(const void* grad_weights, const void* logits, const void* weights, const int32_t* ids,
                           DType dtype, int64_t tokens, int64_t experts, int64_t top_k, Score score,
                           bool renormalize, void* grad_logits, uint32_t* error_flags, cudaStream_t stream) {
  if (tokens < 0 || experts < 1 || top_k < 0 || experts > INT32_MAX || top_k > INT32_MAX) return cudaErrorInvalidValue;
  if (tokens == 0) return cudaSuccess;
  const bool softmax = score == Score::kSoftmax;
  const int group = detail::route_shape(experts).group;
  return detail::with_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    using A = detail::acc_t<T>;
    return detail::launch_route_backward<T>(static_cast<const A*>(grad_weights), static_cast<const T*>(logits),
                                            static_cast<const A*>(weights), ids, tokens, static_cast<int>(experts),
                                            static_cast<int>(top_k), group, softmax, renormalize,
                                            static_cast<T*>(grad_logits), error_flags, stream);
  });
}

cudaError_t read_sticky_error_flags(uint32_t* flags, bool clear) {
  uint32_t route_bits = 0, dispatch_bits = 0, rows_bits = 0;
  FOMOE_RETURN_IF_ERROR(cudaDeviceSynchronize());
  FOMOE_RETURN_IF_ERROR(detail::take_sticky_flags_route(&route_bits, clear));
  FOMOE_RETURN_IF_ERROR(detail::take_sticky_flags_dispatch(&dispatch_bits, clear));
  FOMOE_RETURN_IF_ERROR(detail::take_sticky_flags_rows(&rows_bits, clear));
  *flags = route_bits | dispatch_bits | rows_bits;
  return cudaSuccess;
}

}  // namespace fomoe::cuda::routing
