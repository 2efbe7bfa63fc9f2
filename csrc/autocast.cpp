// Autocast behaviour of the fomoe ops: under torch.autocast the expert GEMMs run in the
// autocast dtype (bf16 by default) with fp32 accumulation inside the kernels, while gate
// weights and routing tables keep their dtype (and so do expert_ffn's weights: it casts them
// itself). Without this, fp32 activations would reach the kernels and silently take the slow
// fp32 path. The router (fomoe::route) needs no entry: it reads any float dtype and always
// computes in fp32. Ops not listed here fall through autocast and keep their inputs' dtypes.
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include "op_handle.h"

namespace fomoe {
namespace {

template <c10::DeviceType device>
struct AutocastScope {
  c10::impl::ExcludeDispatchKeyGuard no_autocast{
      c10::DispatchKeySet(at::autocast::get_autocast_dispatch_key_from_device_type(device))};
  at::ScalarType dtype = at::autocast::get_autocast_dtype(device);
  at::Tensor cast(const at::Tensor& t) const { return at::autocast::cached_cast(dtype, t, device); }
};

template <c10::DeviceType device>
std::tuple<at::Tensor, at::Tensor> expert_ffn_autocast(const at::Tensor& x, const at::Tensor& perm,
                                                       const at::Tensor& offsets, const at::Tensor& inv,
                                                       const at::Tensor& w13, const at::Tensor& w2,
                                                       const at::Tensor& gate, bool save_for_backward) {
  AutocastScope<device> scope;
  static auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, bool)>("fomoe::expert_ffn");
  // Only x is cast: the weights go in as they are and the op computes in x's dtype, returning
  // their gradients in their own dtype without a cast pass each way through the graph.
  return op.call(scope.cast(x), perm, offsets, inv, w13, w2, gate, save_for_backward);
}

template <c10::DeviceType device, const char* name>
at::Tensor two_operand_autocast(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets) {
  AutocastScope<device> scope;
  static auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(name);
  return op.call(scope.cast(a), scope.cast(b), offsets);
}

constexpr char kGroupedMm[] = "fomoe::grouped_mm";
constexpr char kGroupedMmWgrad[] = "fomoe::grouped_mm_wgrad";

template <c10::DeviceType device>
void register_autocast(torch::Library& m) {
  m.impl("expert_ffn", &expert_ffn_autocast<device>);
  m.impl("grouped_mm", &two_operand_autocast<device, kGroupedMm>);
  m.impl("grouped_mm_wgrad", &two_operand_autocast<device, kGroupedMmWgrad>);
}

}  // namespace

TORCH_LIBRARY_IMPL(fomoe, AutocastCPU, m) { register_autocast<c10::DeviceType::CPU>(m); }
TORCH_LIBRARY_IMPL(fomoe, AutocastCUDA, m) { register_autocast<c10::DeviceType::CUDA>(m); }

}  // namespace fomoe
