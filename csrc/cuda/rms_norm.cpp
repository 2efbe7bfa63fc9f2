// CUDA glue of fomoe::rms_norm and rms_norm_backward: checks, dtype dispatch, contiguous
// operands, the weight gradient's partial sums added in order.
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <type_traits>

#include "checks.h"
#include "cuda/gemm_glue.h"
#include "cuda/rms_norm.h"

namespace fomoe::cuda {
namespace {

// f(tag) with the CUDA type of t, a companion of the stream's type T (checks.h).
template <typename T, typename F>
void with_companion_dtype(at::ScalarType t, F&& f) {
  if constexpr (std::is_same_v<T, float>) {
    if (t == at::kHalf) return f(__half{});
    if (t == at::kBFloat16) return f(__nv_bfloat16{});
  }
  f(T{});
}

template <typename P>
const P* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? ptr<P>(t) : nullptr;
}

std::tuple<at::Tensor, at::Tensor> rms_norm_cuda(const at::Tensor& x_in, const std::optional<at::Tensor>& delta_in,
                                                 const at::Tensor& weight, double eps,
                                                 std::optional<at::ScalarType> out_dtype) {
  const char* op = "rms_norm";
  const at::Tensor none;
  const bool has_delta = delta_in.has_value() && delta_in->defined();
  check_rms_norm(op, x_in, weight, {{has_delta ? &*delta_in : &none, "delta"}});
  check_cuda_tensor(op, x_in, "x");
  const auto stream_t = x_in.scalar_type();
  const auto out_t = out_dtype.value_or(stream_t);
  check_norm_companion(op, stream_t, out_t, "out_dtype");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const auto w = weight.to(accum_dtype(stream_t)).contiguous();
  const auto delta = has_delta ? delta_in->contiguous() : at::Tensor();
  auto s = has_delta ? at::empty_like(x) : at::empty({0}, x.options());
  auto normed = at::empty_like(x, x.options().dtype(out_t));
  const int64_t d = x.size(-1), rows = x.numel() / d;
  with_cuda_dtype(stream_t, op, [&](auto t_tag) {
    using T = decltype(t_tag);
    with_companion_dtype<T>(has_delta ? delta.scalar_type() : stream_t, [&](auto d_tag) {
      using D = decltype(d_tag);
      with_companion_dtype<T>(out_t, [&](auto o_tag) {
        using O = decltype(o_tag);
        check_launch(norm::rms_norm_forward<T, D, O>(ptr<T>(x), ptr_or_null<D>(delta), ptr<norm::accum_t<T>>(w),
                                                     has_delta ? mutable_ptr<T>(s) : nullptr, mutable_ptr<O>(normed),
                                                     rows, d, eps, current_stream()),
                     op);
      });
    });
  });
  return {s, normed};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_backward_cuda(
    const at::Tensor& grad_normed_in, const std::optional<at::Tensor>& grad_sum_in, const at::Tensor& s_in,
    const at::Tensor& weight, double eps, std::optional<at::ScalarType> delta_dtype) {
  const char* op = "rms_norm_backward";
  const at::Tensor none;
  const bool has_sum = grad_sum_in.has_value() && grad_sum_in->defined();
  check_rms_norm(op, s_in, weight, {{&grad_normed_in, "grad_normed"}, {has_sum ? &*grad_sum_in : &none, "grad_sum"}});
  check_cuda_tensor(op, s_in, "s");
  const auto stream_t = s_in.scalar_type();
  if (delta_dtype) check_norm_companion(op, stream_t, *delta_dtype, "delta_dtype");
  const c10::cuda::CUDAGuard guard(s_in.device());
  const auto s = s_in.contiguous();
  const auto acc = accum_dtype(stream_t);
  const auto w = weight.to(acc).contiguous();
  const auto g = grad_normed_in.contiguous();
  const auto grad_sum = has_sum ? grad_sum_in->to(stream_t).contiguous() : at::Tensor();  // widening: exact
  auto grad_s = at::empty_like(s);
  auto grad_delta = delta_dtype ? at::empty_like(s, s.options().dtype(*delta_dtype)) : at::empty({0}, s.options());
  const int64_t d = s.size(-1), rows = s.numel() / d;
  auto rstd = at::empty({rows}, s.options().dtype(acc));
  auto partial = at::empty({norm::rms_norm_backward_partials(rows), d}, s.options().dtype(acc));
  with_cuda_dtype(stream_t, op, [&](auto t_tag) {
    using T = decltype(t_tag);
    using A = norm::accum_t<T>;
    with_companion_dtype<T>(g.scalar_type(), [&](auto o_tag) {
      using O = decltype(o_tag);
      with_companion_dtype<T>(delta_dtype.value_or(stream_t), [&](auto d_tag) {
        using D = decltype(d_tag);
        check_launch(norm::rms_norm_backward<T, D, O>(ptr<O>(g), ptr_or_null<T>(grad_sum), ptr<T>(s), ptr<A>(w),
                                                      mutable_ptr<T>(grad_s),
                                                      delta_dtype ? mutable_ptr<D>(grad_delta) : nullptr,
                                                      mutable_ptr<A>(rstd), mutable_ptr<A>(partial), rows, d, eps,
                                                      current_stream()),
                     op);
      });
    });
  });
  // The partial sums, added over a fixed [partials, d] shape: the same order every call.
  return {grad_s, grad_delta, partial.sum(0).to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fomoe, CUDA, m) {
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("rms_norm_backward", &rms_norm_backward_cuda);
}

}  // namespace fomoe::cuda
