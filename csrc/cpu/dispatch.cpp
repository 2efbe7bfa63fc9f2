// CPU kernel of fomoe::dispatch: counting sort of the token-expert assignments by local
// expert, dropping assignments to experts this worker does not hold (skip-token).
#include <torch/library.h>

#include <vector>

#include "checks.h"

namespace fomoe {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> dispatch_cpu(const at::Tensor& ids_in, const at::Tensor& map_in,
                                                            int64_t num_local) {
  check_dispatch(ids_in, map_in, num_local);
  const auto ids = ids_in.contiguous();
  const auto map = map_in.contiguous();
  const int64_t n = ids.numel(), E = map.size(0), k = ids.size(1);
  const int32_t* id = ids.data_ptr<int32_t>();
  const int32_t* slot_of = map.data_ptr<int32_t>();
  for (int64_t e = 0; e < E; ++e)
    FOMOE_CHECK(slot_of[e] >= -1 && slot_of[e] < num_local, "fomoe.dispatch: resident_map[", e, "] = ", slot_of[e],
                " is not a local slot in [0, ", num_local, ") or -1");

  auto offsets = at::empty({num_local + 1}, ids.options());
  auto permutation = at::empty({n}, ids.options());
  auto inverse = at::empty({ids.size(0), k}, ids.options());
  int32_t* off = offsets.data_ptr<int32_t>();
  int32_t* perm = permutation.data_ptr<int32_t>();
  int32_t* inv = inverse.data_ptr<int32_t>();

  std::vector<int32_t> cursor(num_local + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    FOMOE_CHECK(id[i] >= 0 && id[i] < E, "fomoe.dispatch: expert id ", id[i], " at assignment ", i,
                " (token ", i / k, ") is out of range [0, ", E, ")");
    const int32_t slot = slot_of[id[i]];
    if (slot >= 0) ++cursor[slot + 1];
  }
  for (int64_t e = 0; e < num_local; ++e) cursor[e + 1] += cursor[e];
  std::copy(cursor.begin(), cursor.end(), off);
  // Stable: assignments of one expert keep their flat order t*k+s.
  for (int64_t i = 0; i < n; ++i) {
    const int32_t slot = slot_of[id[i]];
    if (slot < 0) {
      inv[i] = -1;
    } else {
      const int32_t row = cursor[slot]++;
      perm[row] = static_cast<int32_t>(i);
      inv[i] = row;
    }
  }
  std::fill(perm + off[num_local], perm + n, -1);
  return {permutation, offsets, inverse};
}

}  // namespace

TORCH_LIBRARY_IMPL(fomoe, CPU, m) { m.impl("dispatch", &dispatch_cpu); }

}  // namespace fomoe
