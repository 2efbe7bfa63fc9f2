// CUDA glue of the grouped GEMMs: fomoe::grouped_mm and fomoe::grouped_mm_wgrad, and the
// shared launch helpers the expert FFN glue uses (gemm_glue.h).
//
// Path: bf16 operands whose rows are multiples of 8 elements run the Hopper kernels
// (wgmma + TMA) when the build has sm_90a code for the current GPU; everything else runs the
// portable SIMT kernels. Which path runs is announced once per process. Development knobs
// (tests, benchmarks): FOMOE_GEMM_BACKEND=simt forces the portable kernels; FOMOE_SM90_TILE=
// large|small overrides the Hopper tile choice.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdio>
#include <cstdlib>
#include <atomic>
#include <string_view>

#include "checks.h"
#include "cuda/gemm.h"
#include "cuda/gemm_glue.h"

namespace fomoe::cuda {
namespace {

bool simt_forced() {
  const char* v = std::getenv("FOMOE_GEMM_BACKEND");
  return v != nullptr && std::string_view(v) == "simt";
}

// One line on stderr, once per process: plain stdio (the first call may come from any
// thread, inside graph capture, with or without Python's warning machinery around it).
void announce_path(bool hopper, bool forced) {
  int device = 0, major = 0, minor = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  cudaGetLastError();  // a failed query only blurs the message
  if (hopper) {
    std::fprintf(stderr,
                 "fomoe: expert GEMMs on CUDA device %d (sm_%d%d) run the Hopper wgmma/TMA kernels for bf16; other "
                 "dtypes and rows that are not a multiple of 8 elements run the portable SIMT kernels\n",
                 device, major, minor);
  } else {
    std::fprintf(stderr,
                 "fomoe: WARNING: expert GEMMs on CUDA device %d (sm_%d%d) run the portable SIMT kernels (correct, "
                 "much slower than the Hopper path): %s\n",
                 device, major, minor,
                 forced ? "FOMOE_GEMM_BACKEND=simt is set"
                        : "this build has no sm_90a code for this GPU (that needs a Hopper GPU and 90a in "
                          "FOMOE_CUDA_ARCHS at build time)");
  }
}

bool hopper_path() {
  const bool available = gemm::sm90_available();
  const bool forced = simt_forced();
  static std::atomic<bool> announced{false};
  if (!announced.exchange(true)) announce_path(available && !forced, forced);
  return available && !forced;
}

// The tile heuristic's choice unless FOMOE_SM90_TILE overrides it.
gemm::Sm90Tile pick_tile(bool small) {
  const char* v = std::getenv("FOMOE_SM90_TILE");
  if (v != nullptr && std::string_view(v) == "large") return gemm::Sm90Tile::kLarge;
  if (v != nullptr && std::string_view(v) == "small") return gemm::Sm90Tile::kSmall;
  return small ? gemm::Sm90Tile::kSmall : gemm::Sm90Tile::kLarge;
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; }

// Multiprocessors of the current device (the persistent kernels' grid), cached per device.
int sm_count() {
  constexpr int kMaxDevices = 64;
  static int counts[kMaxDevices] = {};  // 0: not read yet (a benign race: every writer agrees)
  int device = 0;
  check_launch(cudaGetDevice(&device), "grouped GEMM");
  const bool cached = device < kMaxDevices && counts[device] != 0;
  if (cached) return counts[device];
  int n = 0;
  check_launch(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device), "grouped GEMM");
  if (device < kMaxDevices) counts[device] = n;
  return n;
}

void check_int32_extent(const char* op, int64_t v, const char* what) {
  FOMOE_CHECK(v < (int64_t{1} << 31), "fomoe.", op, ": ", what, " = ", v, " exceeds the kernels' 2^31-1 limit");
}

at::Tensor sm90_workspace(const at::Tensor& like, int groups) {
  const auto bytes = static_cast<int64_t>(gemm::sm90_workspace_bytes(groups, sm_count()));
  return at::empty({bytes}, like.options().dtype(at::kByte));
}

}  // namespace

void grouped_mm_into(const char* op, const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets,
                     at::Tensor& out, bool zero_tail) {
  const int64_t rows = a.size(0), k = a.size(1), m = b.size(2), groups = b.size(0);
  for (auto [v, what] : {std::pair{rows, "rows"}, {k, "K"}, {m, "M"}, {groups, "experts"}})
    check_int32_extent(op, v, what);
  if (rows == 0 || m == 0) return;
  if (k == 0 || groups == 0) {  // every product is empty: zeros throughout
    out.zero_();
    return;
  }
  const cudaStream_t stream = current_stream();
  const int g = static_cast<int>(groups);
  const int32_t* off = offsets.const_data_ptr<int32_t>();

  bool done = false;
  if (a.scalar_type() == at::kBFloat16 && k % 8 == 0 && m % 8 == 0 && hopper_path()) {
    at::Tensor bb = b;
    gemm::BLayout layout = gemm::BLayout::kRowMajor;
    if (b.transpose(1, 2).is_contiguous() && !b.is_contiguous()) {
      layout = gemm::BLayout::kTransposed;  // what grouped_mm's backward passes: no copy
    } else if (!b.is_contiguous()) {
      bb = b.contiguous();  // any other strided view: one copy, then the row-major kernel
    }
    if (aligned16(a) && aligned16(bb) && aligned16(out)) {
      const gemm::GroupedMm<__nv_bfloat16> p{ptr<__nv_bfloat16>(a), ptr<__nv_bfloat16>(bb),
                                             mutable_ptr<__nv_bfloat16>(out), off, g, rows, k, m, layout};
      // Big tiles idle on small groups; the ping-pong kernel with 64-row tiles fits them.
      const auto tile = pick_tile(rows / groups < 192 || m <= 128);
      at::Tensor ws = sm90_workspace(a, g);
      check_launch(gemm::sm90_grouped_mm(p, tile, sm_count(), ws.mutable_data_ptr(), ws.numel(), stream), op);
      done = true;
    }
  }
  if (!done) {
    with_cuda_dtype(a.scalar_type(), op, [&](auto tag) {
      using T = decltype(tag);
      const gemm::GroupedMm<T> p{ptr<T>(a), ptr<T>(b), mutable_ptr<T>(out), off, g, rows, k, m,
                                 gemm::BLayout::kRowMajor};
      check_launch(gemm::simt_grouped_mm<T>(p, b.stride(0), b.stride(1), b.stride(2), stream), op);
    });
  }
  if (zero_tail) {
    with_cuda_dtype(a.scalar_type(), op, [&](auto tag) {
      using T = decltype(tag);
      check_launch(gemm::zero_rows_past_kept<T>(mutable_ptr<T>(out), rows, m, off, g, stream), op);
    });
  }
}

at::Tensor grouped_weight_grad(const char* op, const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets,
                               at::ScalarType out_dtype) {
  const int64_t rows = a.size(0), k = a.size(1), m = b.size(1), groups = offsets.size(0) - 1;
  for (auto [v, what] : {std::pair{rows, "rows"}, {k, "K"}, {m, "M"}, {groups, "experts"}})
    check_int32_extent(op, v, what);
  FOMOE_CHECK(groups <= 65535, "fomoe.", op, ": at most 65535 experts per call, got ", groups);
  const bool hopper = a.scalar_type() == at::kBFloat16 && k % 8 == 0 && m % 8 == 0 && aligned16(a) &&
                      aligned16(b) && hopper_path();
  const bool direct = out_dtype == a.scalar_type() || (hopper && out_dtype == at::kFloat);
  if (groups * k * m == 0 || rows == 0) return at::zeros({groups, k, m}, a.options().dtype(out_dtype));
  auto out = at::empty({groups, k, m}, a.options().dtype(direct ? out_dtype : a.scalar_type()));
  const cudaStream_t stream = current_stream();
  const int g = static_cast<int>(groups);
  const int32_t* off = offsets.const_data_ptr<int32_t>();

  if (hopper) {
    const auto tile = pick_tile(k <= 128 || m <= 128);
    at::Tensor ws = sm90_workspace(a, g);
    auto run = [&](auto out_tag) {
      using OutT = decltype(out_tag);
      const gemm::GroupedMmWgrad<__nv_bfloat16, OutT> p{ptr<__nv_bfloat16>(a), ptr<__nv_bfloat16>(b),
                                                        mutable_ptr<OutT>(out), off, g, rows, k, m};
      check_launch(gemm::sm90_grouped_mm_wgrad(p, tile, sm_count(), ws.mutable_data_ptr(), ws.numel(), stream), op);
    };
    if (out.scalar_type() == at::kFloat) run(float{});
    else run(__nv_bfloat16{});
  } else {
    with_cuda_dtype(a.scalar_type(), op, [&](auto tag) {
      using T = decltype(tag);
      const gemm::GroupedMmWgrad<T> p{ptr<T>(a), ptr<T>(b), mutable_ptr<T>(out), off, g, rows, k, m};
      check_launch(gemm::simt_grouped_mm_wgrad<T>(p, stream), op);
    });
  }
  return out.to(out_dtype);  // a no-op where the kernel wrote out_dtype
}

namespace {

at::Tensor grouped_mm_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets) {
  check_grouped_mm(a, b, offsets);
  check_cuda_tensor("grouped_mm", a, "a");
  const c10::cuda::CUDAGuard guard(a.device());
  auto out = at::empty({a.size(0), b.size(2)}, a.options());
  grouped_mm_into("grouped_mm", a.contiguous(), b, offsets.contiguous(), out, /*zero_tail=*/true);
  return out;
}

at::Tensor grouped_mm_wgrad_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets) {
  check_grouped_mm_wgrad(a, b, offsets);
  check_cuda_tensor("grouped_mm_wgrad", a, "a");
  const c10::cuda::CUDAGuard guard(a.device());
  return grouped_weight_grad("grouped_mm_wgrad", a.contiguous(), b.contiguous(), offsets.contiguous(),
                             a.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fomoe, CUDA, m) {
  m.impl("grouped_mm", &grouped_mm_cuda);
  m.impl("grouped_mm_wgrad", &grouped_mm_wgrad_cuda);
}

}  // namespace fomoe::cuda
