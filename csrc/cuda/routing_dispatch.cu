// fomoe::dispatch on the device: a stable counting sort of the token-expert assignments by local
// expert slot, dropping assignments to experts this worker does not hold (skip-token). Torch-free.
//
// The assignments are cut into tiles of kTile. Three kernels, no host synchronisation:
//   1. count:  each tile's histogram over local slots (shared-memory integer atomics, warp
//              aggregated; order-independent) -> counts[slot][tile].
//   2. scan:   one warp per slot turns its row of counts into exclusive prefixes over tiles and
//              writes the slot's total.
//   3. place:  each tile scans the slot totals (offsets), ranks its assignments stably (per-warp
//              runs with __match_any_sync, then a prefix over the warps) and writes permutation
//              and inverse; every block also fills its share of permutation's -1 tail.
// Output equals the CPU kernel bit for bit: within a slot, assignments keep ascending flat order.
#include "cuda/routing_flags.cuh"

namespace fomoe::cuda::routing {
namespace detail {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 4;                    // assignments per thread and tile
constexpr int kTile = kThreads * kItems;     // assignments per tile
constexpr int kWarpSpan = kTile / kWarps;    // contiguous assignments ranked by one warp

// Local slot of assignment i, or -1 when it is skipped: not held here, or (bad input) an expert
// id out of range (noted in *bad_id) or a resident_map entry out of range (check_map reports it).
__device__ __forceinline__ int slot_of(const int32_t* ids, int64_t i, const int32_t* map, int E, int L,
                                       bool* bad_id) {
  const int id = ids[i];
  if (id < 0 || id >= E) {
    *bad_id = true;
    return -1;
  }
  const int slot = map[id];
  return (slot >= 0 && slot < L) ? slot : -1;
}

// Every resident_map entry is checked once per launch (a block-strided share per block).
__device__ __forceinline__ void check_map(const int32_t* map, int E, int L, uint32_t* flags) {
  bool bad = false;
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < E; e += int64_t(gridDim.x) * kThreads) {
    const int slot = map[e];
    bad |= slot < -1 || slot >= L;
  }
  if (bad) raise_error(flags, kResidentMapOutOfRange);
}

__device__ __forceinline__ unsigned lanemask_lt() {
  unsigned m;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
}

// Exclusive scan of one int per thread over the block; *total gets the block's sum.
__device__ __forceinline__ int block_exclusive_scan(int v, int* total) {
  __shared__ int warp_sums[kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int incl = v;
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    const int o = __shfl_up_sync(kFullMask, incl, d);
    if (lane >= d) incl += o;
  }
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  int before = 0, sum = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    before += w < warp ? warp_sums[w] : 0;
    sum += warp_sums[w];
  }
  __syncthreads();  // warp_sums may be reused by a later call
  *total = sum;
  return before + incl - v;
}

__global__ void __launch_bounds__(kThreads)
    dispatch_count_kernel(const int32_t* __restrict__ ids, int64_t n, const int32_t* __restrict__ map, int E, int L,
                          int32_t* __restrict__ counts, int64_t tiles, uint32_t* flags) {
  extern __shared__ int hist[];  // [L]
  for (int s = threadIdx.x; s < L; s += kThreads) hist[s] = 0;
  check_map(map, E, L, flags);
  __syncthreads();
  const int lane = threadIdx.x % 32;
  const int64_t base = int64_t(blockIdx.x) * kTile;
  bool bad_id = false;
#pragma unroll
  for (int r = 0; r < kItems; ++r) {
    const int64_t i = base + r * kThreads + threadIdx.x;
    const int slot = i < n ? slot_of(ids, i, map, E, L, &bad_id) : -1;
    const unsigned same = __match_any_sync(kFullMask, slot);
    if (slot >= 0 && lane == __ffs(same) - 1) atomicAdd(&hist[slot], __popc(same));
  }
  if (bad_id) raise_error(flags, kExpertIdOutOfRange);
  __syncthreads();
  for (int s = threadIdx.x; s < L; s += kThreads) counts[int64_t(s) * tiles + blockIdx.x] = hist[s];
}

// One warp per slot: counts[slot][*] -> exclusive prefix over tiles; totals[slot] = the sum.
__global__ void __launch_bounds__(kThreads)
    dispatch_scan_kernel(int32_t* __restrict__ counts, int64_t tiles, int L, int32_t* __restrict__ totals) {
  const int64_t slot = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (slot >= L) return;  // whole warps leave together
  int32_t* row = counts + slot * tiles;
  int carry = 0;
  for (int64_t c = 0; c < tiles; c += 32) {
    const int64_t j = c + lane;
    const int v = j < tiles ? row[j] : 0;
    int incl = v;
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
      const int o = __shfl_up_sync(kFullMask, incl, d);
      if (lane >= d) incl += o;
    }
    if (j < tiles) row[j] = carry + incl - v;
    carry += __shfl_sync(kFullMask, incl, 31);
  }
  if (lane == 0) totals[slot] = carry;
}

__global__ void __launch_bounds__(kThreads)
    dispatch_place_kernel(const int32_t* __restrict__ ids, int64_t n, const int32_t* __restrict__ map, int E, int L,
                          const int32_t* __restrict__ tile_prefix, const int32_t* __restrict__ totals, int64_t tiles,
                          int32_t* __restrict__ permutation, int32_t* __restrict__ offsets,
                          int32_t* __restrict__ inverse) {
  extern __shared__ int smem[];
  int* slot_start = smem;      // [L]: offsets[slot]
  int* warp_run = smem + L;    // [kWarps][L]: per-warp counts, then per-warp starting rows
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  // Offsets: exclusive scan of the slot totals, each thread a contiguous run of slots.
  const int per = (L + kThreads - 1) / kThreads;
  const int lo = min(L, int(threadIdx.x) * per), hi = min(L, lo + per);
  int run_sum = 0;
  for (int s = lo; s < hi; ++s) run_sum += totals[s];
  int kept = 0;
  int run = block_exclusive_scan(run_sum, &kept);
  for (int s = lo; s < hi; ++s) {
    slot_start[s] = run;
    if (blockIdx.x == 0) offsets[s] = run;
    run += totals[s];
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) offsets[L] = kept;
  for (int x = threadIdx.x; x < kWarps * L; x += kThreads) warp_run[x] = 0;
  __syncthreads();

  // Stable ranks inside each warp's contiguous span: rounds of 32 in order, lanes in order.
  int* my_run = warp_run + warp * L;
  const int64_t span = int64_t(blockIdx.x) * kTile + warp * kWarpSpan;
  int slot[kItems], rank[kItems];
  bool bad_id = false;  // already reported by the count kernel
#pragma unroll
  for (int r = 0; r < kItems; ++r) {
    const int64_t i = span + r * 32 + lane;
    slot[r] = i < n ? slot_of(ids, i, map, E, L, &bad_id) : -1;
    const unsigned same = __match_any_sync(kFullMask, slot[r]);
    rank[r] = slot[r] >= 0 ? my_run[slot[r]] + __popc(same & lanemask_lt()) : 0;
    __syncwarp();
    if (slot[r] >= 0 && lane == __ffs(same) - 1) my_run[slot[r]] += __popc(same);
    __syncwarp();
  }
  __syncthreads();

  // Each slot: rows of this tile start at offsets[slot] + earlier tiles' counts; warps in order.
  for (int s = threadIdx.x; s < L; s += kThreads) {
    int row = slot_start[s] + tile_prefix[int64_t(s) * tiles + blockIdx.x];
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const int c = warp_run[w * L + s];
      warp_run[w * L + s] = row;
      row += c;
    }
  }
  __syncthreads();

#pragma unroll
  for (int r = 0; r < kItems; ++r) {
    const int64_t i = span + r * 32 + lane;
    if (i >= n) continue;
    if (slot[r] >= 0) {
      const int row = my_run[slot[r]] + rank[r];
      permutation[row] = static_cast<int32_t>(i);
      inverse[i] = row;
    } else {
      inverse[i] = -1;
    }
  }
  // Rows past the kept count hold -1 (disjoint from the rows written above).
  for (int64_t p = kept + int64_t(blockIdx.x) * kThreads + threadIdx.x; p < n; p += int64_t(gridDim.x) * kThreads)
    permutation[p] = -1;
}

// No assignments: offsets are all zero; the resident map is still checked.
__global__ void __launch_bounds__(kThreads)
    dispatch_empty_kernel(const int32_t* __restrict__ map, int E, int L, int32_t* __restrict__ offsets,
                          uint32_t* flags) {
  for (int s = threadIdx.x; s <= L; s += kThreads) offsets[s] = 0;
  check_map(map, E, L, flags);
}

constexpr size_t kStaticSmemReserve = 1024;  // block_exclusive_scan's and the runtime's static shared memory

size_t place_smem_bytes(int64_t L) { return size_t(L) * (kWarps + 1) * sizeof(int32_t); }

}  // namespace

cudaError_t take_sticky_flags_dispatch(uint32_t* flags, bool clear) { return take_this_files_sticky_flags(flags, clear); }

}  // namespace detail

size_t dispatch_workspace_bytes(int64_t assignments, int64_t num_local) {
  if (assignments <= 0 || num_local <= 0) return 0;
  const int64_t tiles = ceil_div(assignments, detail::kTile);
  return size_t(num_local) * size_t(tiles + 1) * sizeof(int32_t);
}

int64_t dispatch_max_local_experts() {
  int device = 0, optin = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) return 0;
  return (int64_t(optin) - int64_t(detail::kStaticSmemReserve)) / int64_t((detail::kWarps + 1) * sizeof(int32_t));
}

cudaError_t dispatch(const int32_t* ids, int64_t assignments, const int32_t* resident_map, int64_t num_experts,
                     int64_t num_local, int32_t* permutation, int32_t* offsets, int32_t* inverse, void* workspace,
                     size_t workspace_bytes, uint32_t* error_flags, cudaStream_t stream) {
  using namespace detail;
  if (assignments < 0 || assignments > INT32_MAX || num_experts < 1 || num_experts > INT32_MAX || num_local < 0 ||
      num_local > num_experts || num_local > dispatch_max_local_experts())
    return cudaErrorInvalidValue;
  const int E = static_cast<int>(num_experts), L = static_cast<int>(num_local);
  const int64_t n = assignments;
  if (n == 0) {
    dispatch_empty_kernel<<<1, kThreads, 0, stream>>>(resident_map, E, L, offsets, error_flags);
    return last_launch_error();
  }
  if (workspace_bytes < dispatch_workspace_bytes(n, L) || (L > 0 && workspace == nullptr)) return cudaErrorInvalidValue;
  const int64_t tiles = ceil_div(n, kTile);
  int32_t* counts = static_cast<int32_t*>(workspace);  // [L][tiles], then totals [L]
  int32_t* totals = counts + int64_t(L) * tiles;

  const size_t count_smem = size_t(L) * sizeof(int32_t);
  const size_t place_smem = place_smem_bytes(L);
  if (place_smem > 48 * 1024) {
    FOMOE_RETURN_IF_ERROR(cudaFuncSetAttribute(dispatch_place_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(place_smem)));
  }
  const unsigned grid = static_cast<unsigned>(tiles);
  dispatch_count_kernel<<<grid, kThreads, count_smem, stream>>>(ids, n, resident_map, E, L, counts, tiles,
                                                                error_flags);
  FOMOE_RETURN_IF_ERROR(last_launch_error());
  if (L > 0) {
    const unsigned scan_blocks = static_cast<unsigned>(ceil_div(int64_t(L) * 32, kThreads));
    dispatch_scan_kernel<<<scan_blocks, kThreads, 0, stream>>>(counts, tiles, L, totals);
    FOMOE_RETURN_IF_ERROR(last_launch_error());
  }
  dispatch_place_kernel<<<grid, kThreads, place_smem, stream>>>(ids, n, resident_map, E, L, counts, totals, tiles,
                                                                permutation, offsets, inverse);
  return last_launch_error();
}

}  // namespace fomoe::cuda::routing
