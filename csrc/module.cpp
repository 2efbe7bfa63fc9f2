// The Python module fomoe._C: importing it registers the fomoe op library (static
// initialisers in the kernel files) and exposes a few facts about this build.
#include <pybind11/pybind11.h>

#ifndef FOMOE_TORCH_VERSION
#define FOMOE_TORCH_VERSION "unknown"
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "fomoe compiled extension: the fomoe op library (torch.ops.fomoe) and build facts";
  m.attr("torch_version") = FOMOE_TORCH_VERSION;
#ifdef FOMOE_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
