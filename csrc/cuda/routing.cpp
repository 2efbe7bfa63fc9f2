// CUDA kernels of fomoe::route, route_backward, dispatch, gather, combine and combine_gate_grad:
// the torch side (checks, allocation, current stream) of the launchers in routing.h.
//
// Bad data never reaches memory out of bounds (routing.h): kernels skip entries they cannot use
// and raise a flag on the device. With FOMOE_VALIDATE=1 in the environment each op checks that
// flag synchronously afterwards and fails with a TORCH_CHECK naming the problem, like the CPU
// kernels do; that mode synchronises the host, so it is for debugging and tests, not for CUDA
// graph capture. Without it the hot path never synchronises.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <sstream>
#include <string>

#include "checks.h"
#include "cuda/glue.h"
#include "cuda/routing.h"
#include "cuda/routing_glue.h"

namespace fomoe::cuda {
namespace {

namespace rt = fomoe::cuda::routing;

rt::Score routing_score(c10::string_view name) {
  return parse_score(name) == Score::Softmax ? rt::Score::kSoftmax : rt::Score::kSigmoid;
}

bool validation_enabled() {
  const char* v = std::getenv("FOMOE_VALIDATE");
  return v != nullptr && *v != '\0' && std::string(v) != "0";
}

// In validation mode: a fresh device word for one op's ErrorFlag bits, checked after the launch.
class DeviceErrorCheck {
 public:
  DeviceErrorCheck(const char* op, const at::Tensor& like) : op_(op) {
    if (validation_enabled()) word_ = at::zeros({1}, like.options().dtype(at::kInt));
  }
  uint32_t* word() const { return word_.defined() ? reinterpret_cast<uint32_t*>(word_.data_ptr<int32_t>()) : nullptr; }

  // `limits` describes the valid ranges for the message, e.g. "num_experts=8".
  void finish(const std::string& limits) const {
    if (!word_.defined()) return;
    const auto bits = static_cast<uint32_t>(word_.item<int32_t>());
    if (bits == 0) return;
    std::ostringstream what;
    if (bits & rt::kExpertIdOutOfRange) what << " an expert id is out of range [0, num_experts);";
    if (bits & rt::kResidentMapOutOfRange) what << " a resident_map entry is not a local slot in [0, num_local) or -1;";
    if (bits & rt::kTableEntryOutOfRange)
      what << " a routing table entry is outside [-1, limit) (use the tables fomoe.dispatch returns);";
    FOMOE_CHECK(false, "fomoe.", op_, ":", what.str(), " (", limits, "; found on the device because FOMOE_VALIDATE=1)");
  }

 private:
  const char* op_;
  at::Tensor word_;
};

std::tuple<at::Tensor, at::Tensor> route_cuda(const at::Tensor& logits_in, int64_t top_k, c10::string_view score,
                                              bool renormalize) {
  check_cuda_tensor("route", logits_in, "logits");
  check_route(logits_in, top_k);
  const rt::Score sc = routing_score(score);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const auto logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  auto weights = at::empty({T, top_k}, logits.options().dtype(accum_dtype(logits.scalar_type())));
  auto ids = at::empty({T, top_k}, logits.options().dtype(at::kInt));
  check_launch(rt::route(logits.data_ptr(), routing_dtype("route", logits.scalar_type()), T, E, top_k, sc,
                         renormalize, weights.data_ptr(), ids.data_ptr<int32_t>(), current_stream()),
               "route");
  return {weights, ids};
}

at::Tensor route_backward_cuda(const at::Tensor& grad_weights_in, const at::Tensor& logits_in,
                               const at::Tensor& weights_in, const at::Tensor& ids_in, c10::string_view score,
                               bool renormalize) {
  check_cuda_tensor("route_backward", logits_in, "logits");
  check_route_backward(grad_weights_in, logits_in, weights_in, ids_in);
  const rt::Score sc = routing_score(score);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const auto logits = logits_in.contiguous();
  const auto acc = accum_dtype(logits.scalar_type());
  const auto grad_weights = grad_weights_in.to(acc).contiguous();
  const auto weights = weights_in.to(acc).contiguous();
  const auto ids = ids_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1), k = ids.size(1);
  auto grad = at::empty({T, E}, logits.options());
  const DeviceErrorCheck errors("route_backward", logits);
  check_launch(rt::route_backward(grad_weights.data_ptr(), logits.data_ptr(), weights.data_ptr(),
                                  ids.data_ptr<int32_t>(), routing_dtype("route_backward", logits.scalar_type()), T, E,
                                  k, sc, renormalize, grad.data_ptr(), errors.word(), current_stream()),
               "route_backward");
  errors.finish("num_experts=" + std::to_string(E));
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dispatch_cuda(const at::Tensor& ids_in, const at::Tensor& map_in,
                                                             int64_t num_local) {
  check_cuda_tensor("dispatch", ids_in, "ids");
  check_dispatch(ids_in, map_in, num_local);
  const c10::cuda::CUDAGuard guard(ids_in.device());
  const int64_t max_local = rt::dispatch_max_local_experts();
  FOMOE_CHECK(num_local <= max_local, "fomoe.dispatch: at most ", max_local,
              " local experts per call on this GPU (shared-memory bound), got num_local=", num_local);
  const auto ids = ids_in.contiguous();
  const auto map = map_in.contiguous();
  const int64_t n = ids.numel(), E = map.size(0);
  auto permutation = at::empty({n}, ids.options());
  auto offsets = at::empty({num_local + 1}, ids.options());
  auto inverse = at::empty({ids.size(0), ids.size(1)}, ids.options());
  const size_t scratch_bytes = rt::dispatch_workspace_bytes(n, num_local);
  at::Tensor scratch;
  if (scratch_bytes > 0) scratch = at::empty({static_cast<int64_t>(scratch_bytes)}, ids.options().dtype(at::kByte));
  const DeviceErrorCheck errors("dispatch", ids);
  check_launch(rt::dispatch(ids.data_ptr<int32_t>(), n, map.data_ptr<int32_t>(), E, num_local,
                            permutation.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(), inverse.data_ptr<int32_t>(),
                            scratch_bytes > 0 ? scratch.data_ptr() : nullptr, scratch_bytes, errors.word(),
                            current_stream()),
               "dispatch");
  errors.finish("num_experts=" + std::to_string(E) + ", num_local=" + std::to_string(num_local));
  return {permutation, offsets, inverse};
}

at::Tensor gather_cuda(const at::Tensor& x_in, const at::Tensor& perm_in, const at::Tensor& inv,
                       const std::optional<at::Tensor>& scale_in) {
  check_cuda_tensor("gather", x_in, "x");
  check_gather(x_in, perm_in, inv, scale_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const auto perm = perm_in.contiguous();
  const auto inverse = inv.contiguous();
  const auto acc = accum_dtype(x.scalar_type());
  const auto scale = scale_in ? std::optional<at::Tensor>(scale_in->to(acc).contiguous()) : std::nullopt;
  const int64_t n = perm.numel(), d = x.size(1);
  auto out = at::empty({n, d}, x.options());
  const DeviceErrorCheck errors("gather", x);
  auto p = gather_rows_args("gather", x, perm, inverse, scale.value_or(at::Tensor()), out);
  p.error_flags = errors.word();
  check_launch(rt::gather_rows(p, current_stream()), "gather");
  errors.finish("limit=tokens*top_k=" + std::to_string(inv.numel()));
  return out;
}

at::Tensor combine_cuda(const at::Tensor& rows_in, const at::Tensor& perm, const at::Tensor& inv_in,
                        const std::optional<at::Tensor>& gate_in) {
  check_cuda_tensor("combine", rows_in, "rows");
  check_combine(rows_in, perm, inv_in, gate_in);
  const c10::cuda::CUDAGuard guard(rows_in.device());
  const auto rows = rows_in.contiguous();
  const auto inv = inv_in.contiguous();
  const auto acc = accum_dtype(rows.scalar_type());
  const auto gate = gate_in ? std::optional<at::Tensor>(gate_in->to(acc).contiguous()) : std::nullopt;
  const int64_t T = inv.size(0), d = rows.size(1);
  auto out = at::empty({T, d}, rows.options());
  const DeviceErrorCheck errors("combine", rows);
  auto p = combine_rows_args("combine", rows, inv, gate.value_or(at::Tensor()), out);
  p.error_flags = errors.word();
  check_launch(rt::combine_rows(p, current_stream()), "combine");
  errors.finish("limit=rows=" + std::to_string(rows.size(0)));
  return out;
}

at::Tensor combine_gate_grad_cuda(const at::Tensor& grad_out_in, const at::Tensor& rows_in, const at::Tensor& inv_in) {
  check_cuda_tensor("combine_gate_grad", rows_in, "rows");
  check_combine_gate_grad(grad_out_in, rows_in, inv_in);
  const c10::cuda::CUDAGuard guard(rows_in.device());
  const auto rows = rows_in.contiguous();
  const auto grad_out = grad_out_in.to(rows.scalar_type()).contiguous();
  const auto inv = inv_in.contiguous();
  const int64_t T = inv.size(0), k = inv.size(1), d = rows.size(1);
  auto out = at::empty({T, k}, rows.options().dtype(accum_dtype(rows.scalar_type())));
  const DeviceErrorCheck errors("combine_gate_grad", rows);
  rt::CombineGateGrad p;
  p.grad_out = grad_out.data_ptr();
  p.grad_out_stride = d;
  p.rows = rows.data_ptr();
  p.rows_stride = d;
  p.num_rows = rows.size(0);
  p.inverse = inv.data_ptr<int32_t>();
  p.tokens = T;
  p.top_k = k;
  p.d = d;
  p.dtype = routing_dtype("combine_gate_grad", rows.scalar_type());
  p.grad_gate = out.data_ptr();
  p.error_flags = errors.word();
  check_launch(rt::combine_gate_grad(p, current_stream()), "combine_gate_grad");
  errors.finish("limit=rows=" + std::to_string(rows.size(0)));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fomoe, CUDA, m) {
  m.impl("route", &route_cuda);
  m.impl("route_backward", &route_backward_cuda);
  m.impl("dispatch", &dispatch_cuda);
  m.impl("gather", &gather_cuda);
  m.impl("combine", &combine_cuda);
  m.impl("combine_gate_grad", &combine_gate_grad_cuda);
}

}  // namespace fomoe::cuda
