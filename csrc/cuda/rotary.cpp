// CUDA glue of fomoe::rotary: checks, fp32 (fp64) tables, contiguous output, current stream.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/gemm_glue.h"
#include "cuda/rotary.h"

namespace fomoe::cuda {
namespace {

at::Tensor rotary_cuda(const at::Tensor& x, const at::Tensor& cos_in, const at::Tensor& sin_in, bool inverse) {
  check_rotary(x, cos_in, sin_in);
  check_cuda_tensor("rotary", x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = accum_dtype(x.scalar_type());
  const auto cos = cos_in.to(acc).contiguous();  // [seq, head_dim/2]: a no-op for fp32 tables
  const auto sin = sin_in.to(acc).contiguous();
  auto out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const rope::RotaryShape shape{x.size(0),   x.size(1),   x.size(2),   x.size(3) / 2,
                                x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  with_cuda_dtype(x.scalar_type(), "rotary", [&](auto tag) {
    using T = decltype(tag);
    using A = rope::accum_t<T>;
    check_launch(rope::rotary<T>(ptr<T>(x), mutable_ptr<T>(out), ptr<A>(cos), ptr<A>(sin), shape, inverse,
                                 current_stream()),
                 "rotary");
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fomoe, CUDA, m) { m.impl("rotary", &rotary_cuda); }

}  // namespace fomoe::cuda
