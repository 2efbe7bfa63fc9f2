// Typed handles of the fomoe ops, for kernels that call other fomoe ops through the
// dispatcher (autocast and autograd re-enter the library below their own key).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

namespace fomoe {

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace fomoe
