// Hopper grouped GEMM on CUTLASS 3 (ptr-array grouped kernel: TMA loads and stores, wgmma,
// warp-specialized persistent schedule). Included only by the gemm_sm90_<kind>_<tile>.cu
// translation units, each instantiating one variant.
//
// Per launch: a small kernel turns the device offsets into per-group problem shapes, operand
// pointers and strides in the workspace; CUTLASS then reads them on the device (no host
// copy of the shapes exists, so its persistent grid is sized by the SM count and the tile
// scheduler walks the groups itself). CUTLASS rewrites each group's TMA descriptors on the
// device, so ragged group sizes need no padding: loads past a group's rows read zeros and
// stores past them are clipped. Groups without rows get shape M = 0 and no tiles.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/bfloat16.h>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/operations.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/kernel_hardware_info.h>

#include <atomic>
#include <mutex>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/gemm_device.cuh"
#include "cuda/gemm_sm90_variants.h"

namespace fomoe::cuda::gemm::sm90 {

using Element = cutlass::bfloat16_t;
using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;  // (M, N, K) per group
using GroupShape = ProblemShape::UnderlyingProblemShape;

template <Sm90Tile>
struct TileConfig;

template <>
struct TileConfig<Sm90Tile::kLarge> {
  using Shape = cute::Shape<cute::_128, cute::_256, cute::_64>;
  using Cluster = cute::Shape<cute::_2, cute::_1, cute::_1>;
  using Mainloop = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using Epilogue = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
};

template <>
struct TileConfig<Sm90Tile::kSmall> {
  using Shape = cute::Shape<cute::_64, cute::_128, cute::_128>;
  using Cluster = cute::Shape<cute::_2, cute::_1, cute::_1>;
  using Mainloop = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
  using Epilogue = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
};

// The CUTLASS element type of an output of CUDA type OutT (bf16, or fp32 weight gradients).
template <typename OutT>
using OutputElement = std::conditional_t<std::is_same_v<OutT, float>, float, Element>;

template <Sm90Tile kTile, class LayoutA, class LayoutB, typename OutT = __nv_bfloat16>
struct Kernel {
  using Config = TileConfig<kTile>;
  using ElementD = OutputElement<OutT>;
  static constexpr int kAlign = 8;  // bf16 elements per 16 bytes: TMA's alignment unit
  static constexpr int kAlignD = 16 / static_cast<int>(sizeof(ElementD));

  // D = acc (no source operand: C is void, so nothing is read back).
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename Config::Shape, typename Config::Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, cutlass::layout::RowMajor*, kAlignD,
      ElementD, cutlass::layout::RowMajor*, kAlignD, typename Config::Epilogue,
      cutlass::epilogue::fusion::LinearCombination<ElementD, float, void, float>>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlign, Element, LayoutB*, kAlign,
      float, typename Config::Shape, typename Config::Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename Config::Mainloop>::CollectiveOp;

  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
  using StrideA = typename GemmKernel::InternalStrideA;
  using StrideB = typename GemmKernel::InternalStrideB;
  using StrideD = typename GemmKernel::InternalStrideD;
};

// A CuTe stride with one run-time mode (the leading dimension) and unit/zero static modes.
template <class Stride>
__device__ __forceinline__ Stride leading_stride(int64_t ld) {
  Stride s{};
  if constexpr (std::is_same_v<std::decay_t<decltype(cute::get<0>(s))>, int64_t>) {
    cute::get<0>(s) = ld;
  } else {
    cute::get<1>(s) = ld;
  }
  return s;
}

// Per-group argument arrays carved from the workspace; CUTLASS's own workspace comes first
// (its tensor maps want 64-byte alignment, the allocation gives more).
template <class K>
struct GroupArgs {
  void* cutlass_workspace;
  const Element** a;
  const Element** b;
  typename K::ElementD** d;
  typename K::StrideA* stride_a;
  typename K::StrideB* stride_b;
  typename K::StrideD* stride_d;
  GroupShape* shapes;
  size_t bytes;  // total used

  static GroupArgs carve(void* workspace, int groups, int sm_count) {
    auto round = [](size_t n) { return (n + 127) / 128 * 128; };
    char* base = static_cast<char*>(workspace);
    GroupArgs g{};
    size_t at = 0;
    auto take = [&](size_t n) {
      char* p = base + at;
      at += round(n);
      return p;
    };
    const size_t n = static_cast<size_t>(groups);
    g.cutlass_workspace = take(cutlass_workspace_bound(sm_count));
    g.a = reinterpret_cast<const Element**>(take(n * sizeof(void*)));
    g.b = reinterpret_cast<const Element**>(take(n * sizeof(void*)));
    g.d = reinterpret_cast<typename K::ElementD**>(take(n * sizeof(void*)));
    g.stride_a = reinterpret_cast<typename K::StrideA*>(take(n * sizeof(typename K::StrideA)));
    g.stride_b = reinterpret_cast<typename K::StrideB*>(take(n * sizeof(typename K::StrideB)));
    g.stride_d = reinterpret_cast<typename K::StrideD*>(take(n * sizeof(typename K::StrideD)));
    g.shapes = reinterpret_cast<GroupShape*>(take(n * sizeof(GroupShape)));
    g.bytes = at;
    return g;
  }
};

// Forward/dgrad: group e multiplies rows [start, end) of a by b[e].
template <class K>
__global__ void prepare_grouped_mm(GroupedMm<__nv_bfloat16> p, GroupArgs<K> g) {
  const auto* a = reinterpret_cast<const Element*>(p.a);
  const auto* b = reinterpret_cast<const Element*>(p.b);
  auto* out = reinterpret_cast<Element*>(p.out);
  for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < p.groups; e += gridDim.x * blockDim.x) {
    const RowRange r = group_rows(p.offsets, e, p.rows);
    g.shapes[e] = GroupShape(static_cast<int>(r.size()), static_cast<int>(p.m), static_cast<int>(p.k));
    g.a[e] = a + r.start * p.k;
    g.b[e] = b + static_cast<int64_t>(e) * p.k * p.m;
    g.d[e] = out + r.start * p.m;
    g.stride_a[e] = leading_stride<typename K::StrideA>(p.k);
    // b[e] viewed as CUTLASS's (N, K): row-major [K, M] has leading dimension M along K;
    // the transposed view (memory [M, K]) has leading dimension K along N.
    g.stride_b[e] = leading_stride<typename K::StrideB>(p.b_layout == BLayout::kRowMajor ? p.m : p.k);
    g.stride_d[e] = leading_stride<typename K::StrideD>(p.m);
  }
}

// Weight gradient: group e computes a_e^T b_e, an (k x m) GEMM over the group's rows (its K).
// Grid (zeroing blocks, groups): block (0, e) writes group e's arguments; an empty group gets
// M = 0 (no tiles) and its zeros from all blocks of its column (the same launch, not a second).
template <class K, typename OutT>
__global__ void prepare_grouped_mm_wgrad(GroupedMmWgrad<__nv_bfloat16, OutT> p, GroupArgs<K> g) {
  using ElementD = typename K::ElementD;
  const int e = blockIdx.y;
  const RowRange r = group_rows(p.offsets, e, p.rows);
  const int rows = static_cast<int>(r.size());
  auto* out = reinterpret_cast<ElementD*>(p.out) + static_cast<int64_t>(e) * p.k * p.m;
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    g.shapes[e] = GroupShape(rows > 0 ? static_cast<int>(p.k) : 0, static_cast<int>(p.m), rows);
    g.a[e] = reinterpret_cast<const Element*>(p.a) + r.start * p.k;  // column-major (k x rows): ld k
    g.b[e] = reinterpret_cast<const Element*>(p.b) + r.start * p.m;  // (m x rows), m fastest: ld m
    g.d[e] = out;
    g.stride_a[e] = leading_stride<typename K::StrideA>(p.k);
    g.stride_b[e] = leading_stride<typename K::StrideB>(p.m);
    g.stride_d[e] = leading_stride<typename K::StrideD>(p.m);
  }
  if (rows == 0) {
    const int64_t worker = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    zero_bytes(reinterpret_cast<char*>(out), 0, p.k * p.m * static_cast<int64_t>(sizeof(ElementD)), worker,
               static_cast<int64_t>(gridDim.x) * blockDim.x);
  }
}

// CUTLASS's host-side setup of a launch (its kernel parameters: TMA descriptor templates,
// scheduler arguments) is a pure function of the argument block, and that depends only on the
// workspace address, the group count, the SM count and the device (shapes, operand pointers and
// strides all live in the workspace). The caching allocator often hands a training loop the same
// workspaces step after step, so the setup is kept per variant and reused: a hit only launches.
template <class K>
class SetupCache {
 public:
  using Params = typename K::Gemm::Params;
  struct Key {
    const void* workspace;
    int groups, sm_count, device;
    bool operator==(const Key& o) const {
      return workspace == o.workspace && groups == o.groups && sm_count == o.sm_count && device == o.device;
    }
  };

  static SetupCache& instance() {
    static SetupCache cache;
    return cache;
  }
  bool find(const Key& key, Params& out) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (int i = 0; i < used_; ++i) {
      if (slots_[i].key == key) {
        out = slots_[i].params;
        return true;
      }
    }
    return false;
  }
  void insert(const Key& key, const Params& params) {
    std::lock_guard<std::mutex> lock(mutex_);
    Slot& slot = slots_[next_];
    slot.key = key;
    slot.params = params;
    next_ = (next_ + 1) % kSlots;
    if (used_ < kSlots) ++used_;
  }

 private:
  static constexpr int kSlots = 64;  // several layers' shapes, devices and workspace addresses; the oldest goes first
  struct Slot {
    Key key{};
    Params params{};
  };
  std::mutex mutex_;
  Slot slots_[kSlots];
  int used_ = 0, next_ = 0;
};

// The kernel's dynamic shared-memory opt-in, once per device (a property of the function in
// that device's context). CUTLASS's initialize() sets it on every call; doing it per launch
// costs host time on every GEMM and may wait for the function's queued launches.
template <class K>
cudaError_t opt_in_shared_memory(int device) {
  constexpr int kSmem = K::GemmKernel::SharedStorageSize;
  if constexpr (kSmem < (48 << 10)) {
    return cudaSuccess;
  } else {
    constexpr int kMaxDevices = 64;
    static std::atomic<bool> done[kMaxDevices] = {};
    const bool cached = device >= 0 && device < kMaxDevices;
    if (cached && done[device].load(std::memory_order_acquire)) return cudaSuccess;
    FOMOE_RETURN_IF_ERROR(cudaFuncSetAttribute(cutlass::device_kernel<typename K::GemmKernel>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
    if (cached) done[device].store(true, std::memory_order_release);
    return cudaSuccess;
  }
}

// What Gemm::run does for these kernels (a cluster launch of CUTLASS's device_kernel), less the
// cudaFuncSetAttribute(NonPortableClusterSizeAllowed) it makes before every launch: our
// clusters (2 CTAs) are portable, and a function attribute set per launch costs host time.
template <class K>
cudaError_t launch_cluster_kernel(const typename K::Gemm::Params& params, cudaStream_t stream) {
  using GemmKernel = typename K::GemmKernel;
  using Cluster = typename K::Config::Cluster;
  cudaLaunchAttribute cluster{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = cute::size<0>(Cluster{});
  cluster.val.clusterDim.y = cute::size<1>(Cluster{});
  cluster.val.clusterDim.z = cute::size<2>(Cluster{});
  cudaLaunchConfig_t config{};
  config.gridDim = K::Gemm::get_grid_shape(params);
  config.blockDim = GemmKernel::get_block_shape();
  config.dynamicSmemBytes = GemmKernel::SharedStorageSize;
  config.stream = stream;
  config.attrs = &cluster;
  config.numAttrs = 1;
  void* args[] = {const_cast<typename K::Gemm::Params*>(&params)};
  FOMOE_RETURN_IF_ERROR(
      cudaLaunchKernelExC(&config, reinterpret_cast<const void*>(&cutlass::device_kernel<GemmKernel>), args));
  return last_launch_error();
}

template <class K>
cudaError_t launch(int groups, const GroupArgs<K>& g, int sm_count, size_t workspace_bytes, cudaStream_t stream) {
  using Gemm = typename K::Gemm;
  using GemmKernel = typename K::GemmKernel;
  int device = 0;
  FOMOE_RETURN_IF_ERROR(cudaGetDevice(&device));
  FOMOE_RETURN_IF_ERROR(opt_in_shared_memory<K>(device));
  const typename SetupCache<K>::Key key{g.cutlass_workspace, groups, sm_count, device};
  typename SetupCache<K>::Params params{};
  if (!SetupCache<K>::instance().find(key, params)) {
    typename Gemm::Arguments args{};
    args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
    args.problem_shape = {groups, g.shapes, nullptr};  // shapes live on the device only
    args.mainloop = {g.a, g.stride_a, g.b, g.stride_b};
    args.epilogue.ptr_C = nullptr;
    args.epilogue.ptr_D = g.d;
    args.epilogue.dD = g.stride_d;
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;
    args.hw_info.device_id = device;
    args.hw_info.sm_count = sm_count;
    if (g.bytes > workspace_bytes || Gemm::get_workspace_size(args) > cutlass_workspace_bound(sm_count))
      return cudaErrorInvalidValue;
    if (Gemm::can_implement(args) != cutlass::Status::kSuccess) return cudaErrorNotSupported;
    // What Gemm::initialize does, less the function attribute (set above, once).
    if (GemmKernel::initialize_workspace(args, g.cutlass_workspace, stream, nullptr) != cutlass::Status::kSuccess) {
      const cudaError_t err = cudaGetLastError();
      return err != cudaSuccess ? err : cudaErrorInvalidConfiguration;
    }
    params = GemmKernel::to_underlying_arguments(args, g.cutlass_workspace);
    SetupCache<K>::instance().insert(key, params);
  }
  return launch_cluster_kernel<K>(params, stream);
}

inline unsigned prepare_blocks(int groups) { return static_cast<unsigned>((groups + 127) / 128); }

template <Sm90Tile kTile, BLayout kLayout>
cudaError_t run_grouped_mm(const GroupedMm<__nv_bfloat16>& p, int sm_count, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream) {
  using LayoutB = std::conditional_t<kLayout == BLayout::kRowMajor, cutlass::layout::RowMajor,
                                     cutlass::layout::ColumnMajor>;
  using K = Kernel<kTile, cutlass::layout::RowMajor, LayoutB>;
  if (p.groups == 0 || p.rows == 0 || p.m == 0) return cudaSuccess;
  if (p.b_layout != kLayout) return cudaErrorInvalidValue;
  const auto g = GroupArgs<K>::carve(workspace, p.groups, sm_count);
  if (g.bytes > workspace_bytes) return cudaErrorInvalidValue;
  prepare_grouped_mm<K><<<prepare_blocks(p.groups), 128, 0, stream>>>(p, g);
  FOMOE_RETURN_IF_ERROR(last_launch_error());
  return launch<K>(p.groups, g, sm_count, workspace_bytes, stream);
}

template <Sm90Tile kTile, typename OutT>
cudaError_t run_grouped_mm_wgrad(const GroupedMmWgrad<__nv_bfloat16, OutT>& p, int sm_count, void* workspace,
                                 size_t workspace_bytes, cudaStream_t stream) {
  using K = Kernel<kTile, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor, OutT>;
  if (p.groups == 0 || p.k == 0 || p.m == 0) return cudaSuccess;
  const auto g = GroupArgs<K>::carve(workspace, p.groups, sm_count);
  if (g.bytes > workspace_bytes) return cudaErrorInvalidValue;
  if (p.groups > 65535) return cudaErrorInvalidConfiguration;  // the grid's y extent
  const int64_t group_bytes = p.k * p.m * static_cast<int64_t>(sizeof(typename K::ElementD));
  const dim3 grid(static_cast<unsigned>(zero_blocks(group_bytes, 64)), static_cast<unsigned>(p.groups));
  prepare_grouped_mm_wgrad<K, OutT><<<grid, 256, 0, stream>>>(p, g);
  FOMOE_RETURN_IF_ERROR(last_launch_error());
  return launch<K>(p.groups, g, sm_count, workspace_bytes, stream);
}

}  // namespace fomoe::cuda::gemm::sm90

#define FOMOE_SM90_GROUPED_MM(TILE, LAYOUT)                                                                    \
  template cudaError_t fomoe::cuda::gemm::sm90::run_grouped_mm<fomoe::cuda::gemm::Sm90Tile::TILE,               \
                                                               fomoe::cuda::gemm::BLayout::LAYOUT>(             \
      const fomoe::cuda::gemm::GroupedMm<__nv_bfloat16>&, int, void*, size_t, cudaStream_t);
#define FOMOE_SM90_GROUPED_MM_WGRAD(TILE, OUT)                                                                 \
  template cudaError_t fomoe::cuda::gemm::sm90::run_grouped_mm_wgrad<fomoe::cuda::gemm::Sm90Tile::TILE, OUT>(   \
      const fomoe::cuda::gemm::GroupedMmWgrad<__nv_bfloat16, OUT>&, int, void*, size_t, cudaStream_t);
