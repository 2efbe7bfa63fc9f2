// CPU kernels of the expert computation: row gather/combine between token order and expert
// order, grouped GEMMs over per-expert row ranges, and the fused expert FFN built from them.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"

namespace fomoe {
namespace {

// Reads and validates offsets: non-decreasing, inside [0, rows].
std::vector<int64_t> host_offsets(const char* op, const at::Tensor& offsets, int64_t rows) {
  const auto off = offsets.contiguous();
  const int32_t* p = off.data_ptr<int32_t>();
  std::vector<int64_t> out(off.numel());
  for (int64_t i = 0; i < off.numel(); ++i) {
    out[i] = p[i];
    FOMOE_CHECK(out[i] >= 0 && out[i] <= rows && (i == 0 || out[i] >= out[i - 1]), "fomoe.", op,
                ": offsets must be non-decreasing within [0, ", rows, "], got offsets[", i, "] = ", out[i]);
  }
  return out;
}

void check_table_values(const char* op, const at::Tensor& table, int64_t limit) {
  const auto t = table.contiguous();
  const int32_t* p = t.data_ptr<int32_t>();
  for (int64_t i = 0; i < t.numel(); ++i)
    FOMOE_CHECK(p[i] >= -1 && p[i] < limit, "fomoe.", op, ": routing table entry ", p[i], " at ", i,
                " is outside [-1, ", limit, ") (use the tables fomoe.dispatch returns)");
}

// out[j] = scale[perm[j]] * x[perm[j] / k]; zero rows where perm[j] == -1.
at::Tensor gather_impl(const at::Tensor& x_in, const at::Tensor& perm_in, int64_t k,
                       const std::optional<at::Tensor>& scale_in) {
  const auto x = x_in.contiguous();
  const auto perm = perm_in.contiguous();
  const int64_t n = perm.numel(), d = x.size(1);
  auto out = at::empty({n, d}, x.options());
  const auto acc = accum_dtype(x.scalar_type());
  const auto scale = scale_in ? std::optional<at::Tensor>(scale_in->to(acc).contiguous()) : std::nullopt;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fomoe_gather_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int32_t* p = perm.data_ptr<int32_t>();
    const acc_t* sc = scale ? scale->data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        scalar_t* row = dst + j * d;
        if (p[j] < 0) {
          std::fill(row, row + d, scalar_t(0));
          continue;
        }
        const scalar_t* srow = src + (p[j] / k) * d;
        if (sc == nullptr) {
          std::copy(srow, srow + d, row);
        } else {
          const acc_t s = sc[p[j]];
          for (int64_t c = 0; c < d; ++c) row[c] = static_cast<scalar_t>(s * static_cast<acc_t>(srow[c]));
        }
      }
    });
  });
  return out;
}

// y[t] = sum_s gate[t, s] * rows[inverse[t, s]], summed in slot order (deterministic).
at::Tensor combine_impl(const at::Tensor& rows_in, const at::Tensor& inv_in, const std::optional<at::Tensor>& gate_in) {
  const auto rows = rows_in.contiguous();
  const auto inv = inv_in.contiguous();
  const int64_t T = inv.size(0), k = inv.size(1), d = rows.size(1);
  auto y = at::empty({T, d}, rows.options());
  const auto acc = accum_dtype(rows.scalar_type());
  const auto gate = gate_in ? std::optional<at::Tensor>(gate_in->to(acc).contiguous()) : std::nullopt;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "fomoe_combine_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = rows.data_ptr<scalar_t>();
    scalar_t* dst = y.data_ptr<scalar_t>();
    const int32_t* iv = inv.data_ptr<int32_t>();
    const acc_t* g = gate ? gate->data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> accum(d);
      for (int64_t t = begin; t < end; ++t) {
        std::fill(accum.begin(), accum.end(), acc_t(0));
        for (int64_t s = 0; s < k; ++s) {
          const int32_t r = iv[t * k + s];
          if (r < 0) continue;
          const acc_t w = g ? g[t * k + s] : acc_t(1);
          const scalar_t* srow = src + r * d;
          for (int64_t c = 0; c < d; ++c) accum[c] += w * static_cast<acc_t>(srow[c]);
        }
        for (int64_t c = 0; c < d; ++c) dst[t * d + c] = static_cast<scalar_t>(accum[c]);
      }
    });
  });
  return y;
}

// grad_gate[t, s] = <grad_out[t], rows[inverse[t, s]]>, zero for skipped slots.
at::Tensor combine_gate_grad_impl(const at::Tensor& gy_in, const at::Tensor& rows_in, const at::Tensor& inv_in) {
  const auto rows = rows_in.contiguous();
  const auto gy = gy_in.to(rows.scalar_type()).contiguous();
  const auto inv = inv_in.contiguous();
  const int64_t T = inv.size(0), k = inv.size(1), d = rows.size(1);
  auto out = at::empty({T, k}, rows.options().dtype(accum_dtype(rows.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "fomoe_combine_gate_grad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* r = rows.data_ptr<scalar_t>();
    const scalar_t* g = gy.data_ptr<scalar_t>();
    const int32_t* iv = inv.data_ptr<int32_t>();
    acc_t* o = out.data_ptr<acc_t>();
    at::parallel_for(0, T * k, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        acc_t dot = 0;
        if (iv[i] >= 0) {
          const scalar_t* rr = r + int64_t(iv[i]) * d;
          const scalar_t* gg = g + (i / k) * d;
          for (int64_t c = 0; c < d; ++c) dot += static_cast<acc_t>(rr[c]) * static_cast<acc_t>(gg[c]);
        }
        o[i] = dot;
      }
    });
  });
  return out;
}

at::Tensor grouped_mm_impl(const at::Tensor& a, const at::Tensor& b, const std::vector<int64_t>& off) {
  auto out = at::zeros({a.size(0), b.size(2)}, a.options());
  for (size_t e = 0; e + 1 < off.size(); ++e) {
    const int64_t rows = off[e + 1] - off[e];
    if (rows == 0) continue;
    auto dst = out.narrow(0, off[e], rows);
    at::mm_out(dst, a.narrow(0, off[e], rows), b[e]);
  }
  return out;
}

at::Tensor grouped_mm_wgrad_impl(const at::Tensor& a, const at::Tensor& b, const std::vector<int64_t>& off) {
  const int64_t E = static_cast<int64_t>(off.size()) - 1;
  auto out = at::zeros({E, a.size(1), b.size(1)}, a.options());
  for (int64_t e = 0; e < E; ++e) {
    const int64_t rows = off[e + 1] - off[e];
    if (rows == 0) continue;
    auto dst = out[e];
    at::mm_out(dst, a.narrow(0, off[e], rows).t(), b.narrow(0, off[e], rows));
  }
  return out;
}

// SwiGLU on h = [h1 | h3]: silu(h1) * h3, computed in the accumulation dtype.
at::Tensor swiglu(const at::Tensor& h) {
  const int64_t f = h.size(1) / 2;
  const auto hh = h.to(accum_dtype(h.scalar_type()));
  return (at::silu(hh.narrow(1, 0, f)) * hh.narrow(1, f, f)).to(h.scalar_type());
}

at::Tensor swiglu_backward(const at::Tensor& grad_a, const at::Tensor& h) {
  const int64_t f = h.size(1) / 2;
  const auto acc = accum_dtype(h.scalar_type());
  const auto h1 = h.narrow(1, 0, f).to(acc), h3 = h.narrow(1, f, f).to(acc), ga = grad_a.to(acc);
  const auto sig = at::sigmoid(h1);
  const auto grad_h1 = ga * h3 * sig * (1 + h1 * (1 - sig));
  const auto grad_h3 = ga * h1 * sig;
  return at::cat({grad_h1, grad_h3}, 1).to(h.scalar_type());
}

// Gate weight of every row in expert order (zero for padding rows).
at::Tensor gate_of_rows(const at::Tensor& gate, const at::Tensor& perm) {
  const auto flat = gate.reshape(-1);
  const auto valid = perm.ge(0);
  return at::where(valid, flat.index_select(0, perm.clamp_min(0).to(at::kLong)), at::zeros({}, flat.options()));
}

// ---- registered ops -------------------------------------------------------------------

at::Tensor gather_cpu(const at::Tensor& x, const at::Tensor& perm, const at::Tensor& inv,
                      const std::optional<at::Tensor>& scale) {
  check_gather(x, perm, inv, scale);
  check_table_values("gather", perm, inv.numel());
  return gather_impl(x, perm, inv.size(1), scale);
}

at::Tensor combine_cpu(const at::Tensor& rows, const at::Tensor& perm, const at::Tensor& inv,
                       const std::optional<at::Tensor>& gate) {
  check_combine(rows, perm, inv, gate);
  check_table_values("combine", inv, rows.size(0));
  return combine_impl(rows, inv, gate);
}

at::Tensor combine_gate_grad_cpu(const at::Tensor& gy, const at::Tensor& rows, const at::Tensor& inv) {
  FOMOE_CHECK(gy.dim() == 2 && rows.dim() == 2 && inv.dim() == 2 && gy.size(0) == inv.size(0) &&
                  gy.size(1) == rows.size(1),
              "fomoe.combine_gate_grad: want grad_out [T, d], rows [N, d], inverse [T, k]; got ", gy.sizes(), ", ",
              rows.sizes(), ", ", inv.sizes());
  FOMOE_CHECK(inv.scalar_type() == at::kInt, "fomoe.combine_gate_grad: inverse must be int32");
  check_table_values("combine_gate_grad", inv, rows.size(0));
  return combine_gate_grad_impl(gy, rows, inv);
}

at::Tensor grouped_mm_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets) {
  check_grouped_mm(a, b, offsets);
  return grouped_mm_impl(a, b, host_offsets("grouped_mm", offsets, a.size(0)));
}

at::Tensor grouped_mm_wgrad_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets) {
  check_grouped_mm_wgrad(a, b, offsets);
  return grouped_mm_wgrad_impl(a, b, host_offsets("grouped_mm_wgrad", offsets, a.size(0)));
}

std::tuple<at::Tensor, at::Tensor> expert_ffn_cpu(const at::Tensor& x, const at::Tensor& perm,
                                                  const at::Tensor& offsets, const at::Tensor& inv,
                                                  const at::Tensor& w13, const at::Tensor& w2, const at::Tensor& gate,
                                                  bool save_for_backward) {
  check_expert_ffn(x, perm, offsets, inv, w13, w2, gate);
  check_table_values("expert_ffn", perm, inv.numel());
  check_table_values("expert_ffn", inv, perm.numel());
  const auto off = host_offsets("expert_ffn", offsets, perm.numel());
  const int64_t k = inv.size(1);
  const auto xg = gather_impl(x, perm, k, std::nullopt);
  auto h = grouped_mm_impl(xg, w13.to(x.scalar_type()), off);
  const auto o = grouped_mm_impl(swiglu(h), w2.to(x.scalar_type()), off);
  auto y = combine_impl(o, inv, gate);
  if (!save_for_backward) h = at::empty({0}, x.options());
  return {y, h};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> expert_ffn_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& perm, const at::Tensor& offsets,
    const at::Tensor& inv, const at::Tensor& w13_in, const at::Tensor& w2_in, const at::Tensor& gate, const at::Tensor& h,
    std::optional<at::ScalarType> weight_grad_dtype_in) {
  check_expert_ffn(x, perm, offsets, inv, w13_in, w2_in, gate);
  const auto grad_dtype = weight_grad_dtype(weight_grad_dtype_in, w13_in);
  const auto w13 = w13_in.to(x.scalar_type()), w2 = w2_in.to(x.scalar_type());
  FOMOE_CHECK(grad_y.sizes() == x.sizes(), "fomoe.expert_ffn_backward: grad_y must match x's shape ", x.sizes());
  FOMOE_CHECK(h.dim() == 2 && h.size(0) == perm.numel() && h.size(1) == w13.size(2),
              "fomoe.expert_ffn_backward: h must be the [T*k, 2*d_ff] tensor expert_ffn saved, got ", h.sizes());
  check_table_values("expert_ffn_backward", perm, inv.numel());
  check_table_values("expert_ffn_backward", inv, perm.numel());
  const auto off = host_offsets("expert_ffn_backward", offsets, perm.numel());
  const int64_t k = inv.size(1);
  const auto gy = grad_y.to(x.scalar_type());
  const auto xg = gather_impl(x, perm, k, std::nullopt);
  const auto gy_rows = gather_impl(gy, perm, k, std::nullopt);
  const auto a = swiglu(h);
  // Unweighted grad of the expert output wrt a: its row-dot with a is the gate's gradient.
  const auto g_a = grouped_mm_impl(gy_rows, w2.transpose(1, 2), off);
  const auto acc = accum_dtype(x.scalar_type());
  const auto gate_rows = gate_of_rows(gate.to(acc), perm).unsqueeze(1);
  const auto gate_grad_rows = (g_a.to(acc) * a.to(acc)).sum(1);
  const auto grad_gate =
      at::where(inv.ge(0), gate_grad_rows.index_select(0, inv.clamp_min(0).reshape(-1).to(at::kLong)).view(inv.sizes()),
                at::zeros({}, gate_grad_rows.options()))
          .to(gate.scalar_type());
  const auto grad_a = (g_a.to(acc) * gate_rows).to(x.scalar_type());
  const auto grad_w2 = grouped_mm_wgrad_impl((a.to(acc) * gate_rows).to(x.scalar_type()), gy_rows, off);
  const auto grad_h = swiglu_backward(grad_a, h);
  const auto grad_w13 = grouped_mm_wgrad_impl(xg, grad_h, off);
  const auto grad_x = combine_impl(grouped_mm_impl(grad_h, w13.transpose(1, 2), off), inv, std::nullopt);
  return {grad_x, grad_w13.to(grad_dtype), grad_w2.to(grad_dtype), grad_gate};
}

}  // namespace

TORCH_LIBRARY_IMPL(fomoe, CPU, m) {
  m.impl("gather", &gather_cpu);
  m.impl("combine", &combine_cpu);
  m.impl("combine_gate_grad", &combine_gate_grad_cpu);
  m.impl("grouped_mm", &grouped_mm_cpu);
  m.impl("grouped_mm_wgrad", &grouped_mm_wgrad_cpu);
  m.impl("expert_ffn", &expert_ffn_cpu);
  m.impl("expert_ffn_backward", &expert_ffn_backward_cpu);
}

}  // namespace fomoe
