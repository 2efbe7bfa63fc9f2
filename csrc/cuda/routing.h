// Torch-free interface of the routing kernels (csrc/cuda/routing*.cu): router top-k, skip-token
// dispatch, and row movement between token order and expert order. The glue (routing.cpp)
// registers them as the CUDA kernels of fomoe::route, route_backward, dispatch, gather, combine
// and combine_gate_grad; other kernel families (the fused expert FFN) may call gather_rows and
// combine_rows directly.
//
// Contract of every launcher:
//   * raw device pointers, element counts and strides, the stream to launch on; returns the
//     launch error (cudaSuccess when nothing needed launching). Never synchronises the host, never
//     allocates: data-dependent sizes stay in device memory, so every launch is safe to capture
//     in a CUDA graph.
//   * dtypes: activations and logits are DType; gate weights, scales and router weights are the
//     accumulation dtype: double for DType::kFloat64, float for every other dtype.
//   * deterministic: same inputs, bitwise the same outputs. No floating-point atomics anywhere;
//     the only atomics are integer histogram counters in shared memory (dispatch), whose result
//     does not depend on their order, and the error-flag bits below.
//   * data-dependent bad input (an expert id or table entry out of range) never leads to an
//     out-of-bounds access: the offending entry is treated as skipped and an ErrorFlag bit is
//     OR-ed into *error_flags (a device word the caller zeroed), or, when error_flags is null,
//     into a sticky per-device word that read_sticky_error_flags() returns. The glue passes a
//     fresh word and checks it synchronously only when FOMOE_VALIDATE=1 (a debugging mode), so
//     the hot path has no host synchronisation.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace fomoe::cuda::routing {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

enum class Score : int { kSoftmax = 0, kSigmoid = 1 };

// Bits raised on the device for data the kernels could not use (see the contract above).
enum ErrorFlag : uint32_t {
  kExpertIdOutOfRange = 1u << 0,      // an expert id outside [0, num_experts)
  kResidentMapOutOfRange = 1u << 1,   // a resident_map entry outside [-1, num_local)
  kTableEntryOutOfRange = 1u << 2,    // a permutation / inverse entry outside [-1, limit)
};

// ---- router ---------------------------------------------------------------------------------

// logits [tokens, experts] row-major -> weights [tokens, top_k] (accumulation dtype) and ids
// [tokens, top_k] int32, sorted by descending logit: NaN ranks highest (as +inf), ties go to the
// lower expert id. score softmax: w = softmax over the top-k logits (renormalize) or over all
// logits; sigmoid: w = sigmoid(logit), divided by their sum over the top-k when renormalize.
// Any 1 <= top_k <= experts (fastest for experts <= 1024).
cudaError_t route(const void* logits, DType dtype, int64_t tokens, int64_t experts, int64_t top_k, Score score,
                  bool renormalize, void* weights, int32_t* ids, cudaStream_t stream);

// Gradient of route's weights wrt the logits, ids held fixed: grad_logits [tokens, experts] in
// `dtype`; grad_weights and weights [tokens, top_k] in the accumulation dtype. Ids outside
// [0, experts) contribute nothing and raise kExpertIdOutOfRange.
cudaError_t route_backward(const void* grad_weights, const void* logits, const void* weights, const int32_t* ids,
                           DType dtype, int64_t tokens, int64_t experts, int64_t top_k, Score score,
                           bool renormalize, void* grad_logits, uint32_t* error_flags, cudaStream_t stream);

// ---- skip-token dispatch --------------------------------------------------------------------

// Scratch bytes dispatch needs (per-tile per-expert counts); 0 when assignments == 0.
size_t dispatch_workspace_bytes(int64_t assignments, int64_t num_local);
// Most local experts dispatch can take on the current device (bounded by shared memory).
int64_t dispatch_max_local_experts();

// ids [assignments] int32 (flat t*top_k+s), resident_map [num_experts] (global id -> local slot
// or -1) -> permutation [assignments] (assignments grouped by local slot, ascending flat index
// within a slot, -1 past the kept count), offsets [num_local+1] (offsets[num_local] = kept count)
// and inverse [assignments] (row of each assignment in expert order, -1 when skipped).
// Three kernels: per-tile histograms, per-expert scan over tiles, stable placement.
cudaError_t dispatch(const int32_t* ids, int64_t assignments, const int32_t* resident_map, int64_t num_experts,
                     int64_t num_local, int32_t* permutation, int32_t* offsets, int32_t* inverse, void* workspace,
                     size_t workspace_bytes, uint32_t* error_flags, cudaStream_t stream);

// ---- row movement ---------------------------------------------------------------------------
// Row-major matrices with a row stride in elements. 16-byte vector accesses when every row start
// is 16-byte aligned (pointers, strides and d allow it), element accesses otherwise.

// out[j] = scale[p] * x[p / top_k] with p = permutation[j], in the accumulation dtype, rounded
// once to dtype; rows with p == -1 are zero (or left untouched when !zero_skipped_rows).
struct GatherRows {
  const void* x = nullptr;               // [tokens, d]
  int64_t x_stride = 0;
  int64_t tokens = 0;
  int64_t top_k = 1;
  const int32_t* permutation = nullptr;  // [rows], entries in [-1, tokens*top_k)
  int64_t rows = 0;
  const void* scale = nullptr;           // optional [tokens*top_k], accumulation dtype
  // Optional: the inverse of `permutation` ([tokens, top_k], the expert-order row of each
  // assignment or -1). With it, large batches are gathered token by token: each token row is
  // read once and written to its rows (the row-by-row kernel reads it top_k times, from DRAM
  // once the token rows outgrow L2). The result is the row-by-row one for any tables: rows whose
  // permutation entry the inverse does not name back are copied row by row.
  const int32_t* inverse = nullptr;
  void* out = nullptr;                   // [rows, d]
  int64_t out_stride = 0;
  int64_t d = 0;
  DType dtype = DType::kFloat32;
  bool zero_skipped_rows = true;
  uint32_t* error_flags = nullptr;
};
cudaError_t gather_rows(const GatherRows& p, cudaStream_t stream);

// out[t] = sum over s = 0..top_k-1 with r = inverse[t, s] != -1 of gate[t, s] * rows[r], summed in
// slot order in the accumulation dtype (no atomics: deterministic), rounded once to dtype.
struct CombineRows {
  const void* rows = nullptr;            // [num_rows, d]
  int64_t rows_stride = 0;
  int64_t num_rows = 0;
  const int32_t* inverse = nullptr;      // [tokens, top_k], entries in [-1, num_rows)
  int64_t tokens = 0;
  int64_t top_k = 1;
  const void* gate = nullptr;            // optional [tokens, top_k], accumulation dtype (null: 1)
  void* out = nullptr;                   // [tokens, d]
  int64_t out_stride = 0;
  int64_t d = 0;
  DType dtype = DType::kFloat32;
  uint32_t* error_flags = nullptr;
};
cudaError_t combine_rows(const CombineRows& p, cudaStream_t stream);

// grad_gate[t, s] = <grad_out[t], rows[inverse[t, s]]> in the accumulation dtype, 0 for skipped
// slots: the gate weights' gradient of combine_rows.
struct CombineGateGrad {
  const void* grad_out = nullptr;        // [tokens, d]
  int64_t grad_out_stride = 0;
  const void* rows = nullptr;            // [num_rows, d]
  int64_t rows_stride = 0;
  int64_t num_rows = 0;
  const int32_t* inverse = nullptr;      // [tokens, top_k]
  int64_t tokens = 0;
  int64_t top_k = 1;
  int64_t d = 0;
  DType dtype = DType::kFloat32;
  void* grad_gate = nullptr;             // [tokens, top_k], accumulation dtype
  uint32_t* error_flags = nullptr;
};
cudaError_t combine_gate_grad(const CombineGateGrad& p, cudaStream_t stream);

// ---- errors ---------------------------------------------------------------------------------

// ErrorFlag bits raised on the current device by launches that got error_flags == null, since the
// last clear. Synchronises the device: for tests and debugging, never for the hot path.
cudaError_t read_sticky_error_flags(uint32_t* flags, bool clear);

}  // namespace fomoe::cuda::routing
