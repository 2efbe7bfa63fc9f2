// CPU kernels of fomoe::rms_norm and rms_norm_backward: one pass per row in the accumulation
// dtype; the weight gradient sums fixed chunks of rows, then the chunks in order, so the
// result does not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "checks.h"

namespace fomoe {
namespace {

constexpr int64_t kRowsPerChunk = 64;

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& delta_in,
                                                const at::Tensor& weight, double eps,
                                                std::optional<at::ScalarType> out_dtype) {
  const at::Tensor none;
  check_rms_norm("rms_norm", x_in, weight, {{delta_in ? &*delta_in : &none, "delta"}});
  const auto out_t = out_dtype.value_or(x_in.scalar_type());
  check_norm_companion("rms_norm", x_in.scalar_type(), out_t, "out_dtype");
  const auto x = x_in.contiguous();
  const auto acc = accum_dtype(x.scalar_type());
  const auto w = weight.to(acc).contiguous();
  const bool has_delta = delta_in.has_value() && delta_in->defined();
  const auto delta = has_delta ? delta_in->to(x.scalar_type()).contiguous() : at::Tensor();  // widening: exact
  auto s = has_delta ? at::empty_like(x) : at::empty({0}, x.options());
  auto normed = at::empty_like(x);
  const int64_t d = x.size(-1), rows = x.numel() / d;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fomoe_rms_norm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* dp = has_delta ? delta.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* sp = has_delta ? s.data_ptr<scalar_t>() : nullptr;
    scalar_t* np = normed.data_ptr<scalar_t>();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* src = xp + r * d;
        if (has_delta) {  // s is rounded to x's dtype, and normed is the norm of that s
          for (int64_t c = 0; c < d; ++c)
            sp[r * d + c] = static_cast<scalar_t>(acc_t(src[c]) + acc_t(dp[r * d + c]));
          src = sp + r * d;
        }
        acc_t ss = 0;
        for (int64_t c = 0; c < d; ++c) ss += acc_t(src[c]) * acc_t(src[c]);
        const acc_t inv = acc_t(1) / std::sqrt(ss / acc_t(d) + acc_t(eps));
        for (int64_t c = 0; c < d; ++c) np[r * d + c] = static_cast<scalar_t>(acc_t(src[c]) * inv * wp[c]);
      }
    });
  });
  return {s, out_t == normed.scalar_type() ? normed : normed.to(out_t)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_backward_cpu(
    const at::Tensor& grad_normed_in, const std::optional<at::Tensor>& grad_sum_in, const at::Tensor& s_in,
    const at::Tensor& weight, double eps, std::optional<at::ScalarType> delta_dtype) {
  const at::Tensor none;
  check_rms_norm("rms_norm_backward", s_in, weight,
                 {{&grad_normed_in, "grad_normed"}, {grad_sum_in ? &*grad_sum_in : &none, "grad_sum"}});
  if (delta_dtype) check_norm_companion("rms_norm_backward", s_in.scalar_type(), *delta_dtype, "delta_dtype");
  const auto s = s_in.contiguous();
  const auto dtype = s.scalar_type();
  const auto acc = accum_dtype(dtype);
  const auto w = weight.to(acc).contiguous();
  const auto g = grad_normed_in.to(dtype).contiguous();
  const bool has_sum = grad_sum_in.has_value() && grad_sum_in->defined();
  const auto gsum = has_sum ? grad_sum_in->to(dtype).contiguous() : at::Tensor();
  auto grad_s = at::empty_like(s);
  const int64_t d = s.size(-1), rows = s.numel() / d;
  const int64_t chunks = (rows + kRowsPerChunk - 1) / kRowsPerChunk;
  auto partial = at::zeros({chunks, d}, s.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "fomoe_rms_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* gsp = has_sum ? gsum.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out = grad_s.data_ptr<scalar_t>();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    acc_t* pp = partial.data_ptr<acc_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
      for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
        acc_t* wgrad = pp + chunk * d;
        const int64_t last = std::min(rows, (chunk + 1) * kRowsPerChunk);
        for (int64_t r = chunk * kRowsPerChunk; r < last; ++r) {
          const scalar_t* sr = sp + r * d;
          const scalar_t* gr = gp + r * d;
          acc_t ss = 0, gws = 0;
          for (int64_t c = 0; c < d; ++c) {
            ss += acc_t(sr[c]) * acc_t(sr[c]);
            gws += acc_t(gr[c]) * wp[c] * acc_t(sr[c]);
          }
          const acc_t inv = acc_t(1) / std::sqrt(ss / acc_t(d) + acc_t(eps));
          const acc_t proj = inv * inv * inv * gws / acc_t(d);
          for (int64_t c = 0; c < d; ++c) {
            acc_t v = inv * acc_t(gr[c]) * wp[c] - acc_t(sr[c]) * proj;
            if (has_sum) v += acc_t(gsp[r * d + c]);
            out[r * d + c] = static_cast<scalar_t>(v);
            wgrad[c] += acc_t(gr[c]) * acc_t(sr[c]) * inv;
          }
        }
      }
    });
    for (int64_t chunk = 1; chunk < chunks; ++chunk)
      for (int64_t c = 0; c < d; ++c) pp[c] += pp[chunk * d + c];
  });
  auto grad_weight = chunks > 0 ? partial[0].to(weight.scalar_type(), /*non_blocking=*/false, /*copy=*/true)
                                : at::zeros({d}, weight.options());
  auto grad_delta = delta_dtype ? grad_s.to(*delta_dtype, /*non_blocking=*/false, /*copy=*/true)
                                : at::empty({0}, s.options());
  return {grad_s, grad_delta, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(fomoe, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("rms_norm_backward", &rms_norm_backward_cpu);
}

}  // namespace fomoe
