// CPU kernel of fomoe::rotary: one pass over x's rows (any strides), pairs rotated in the
// accumulation dtype and written to a contiguous output.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"

namespace fomoe {
namespace {

at::Tensor rotary_cpu(const at::Tensor& x, const at::Tensor& cos_in, const at::Tensor& sin_in, bool inverse) {
  check_rotary(x, cos_in, sin_in);
  const auto acc = accum_dtype(x.scalar_type());
  const auto cos = cos_in.to(acc).contiguous();
  const auto sin = sin_in.to(acc).contiguous();
  auto out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t B = x.size(0), S = x.size(1), H = x.size(2), half = x.size(3) / 2;
  const int64_t sb = x.stride(0), ss = x.stride(1), sh = x.stride(2), sd = x.stride(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fomoe_rotary_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const acc_t* c = cos.const_data_ptr<acc_t>();
    const acc_t* s = sin.const_data_ptr<acc_t>();
    const acc_t sign = inverse ? acc_t(-1) : acc_t(1);
    at::parallel_for(0, B * S * H, 256, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / (S * H), t = (row / H) % S, h = row % H;
        const scalar_t* in = src + b * sb + t * ss + h * sh;
        scalar_t* o = dst + row * 2 * half;
        for (int64_t i = 0; i < half; ++i) {
          const acc_t x1 = in[i * sd], x2 = in[(i + half) * sd];
          const acc_t ci = c[t * half + i], si = sign * s[t * half + i];
          o[i] = static_cast<scalar_t>(x1 * ci - x2 * si);
          o[i + half] = static_cast<scalar_t>(x2 * ci + x1 * si);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fomoe, CPU, m) { m.impl("rotary", &rotary_cpu); }

}  // namespace fomoe
