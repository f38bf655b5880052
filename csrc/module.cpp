// SPDX-License-Identifier: Apache-2.0
//
// floodfilling._kernels: private native extension.  The public, documented
// API is floodfilling.kernels (Python); this module only exposes the raw
// entry points plus build/thread information.
#include <pybind11/pybind11.h>

#include "csrc/launch_omp.hpp"

namespace py = pybind11;

#ifndef FFN_COMPILER_INFO
#define FFN_COMPILER_INFO "unknown"
#endif

namespace ffn {
namespace bind {
void bind_fov_update(py::module_& m);
void bind_peaks(py::module_& m);
void bind_reconcile(py::module_& m);
}  // namespace bind
}  // namespace ffn

PYBIND11_MODULE(_kernels, m) {
  m.doc() = "floodfilling native kernels (private; use floodfilling.kernels)";
  ffn::bind::bind_fov_update(m);
  ffn::bind::bind_peaks(m);
  ffn::bind::bind_reconcile(m);
  m.def(
      "build_info",
      []() {
        py::dict d;
        d["openmp"] = ffn::launch::have_openmp();
        d["compiler"] = FFN_COMPILER_INFO;
#ifdef _OPENMP
        d["openmp_version"] = static_cast<int>(_OPENMP);
#else
        d["openmp_version"] = py::none();
#endif
        d["cxx_standard"] = static_cast<long>(__cplusplus);
        return d;
      },
      "Build configuration: {'openmp': bool, 'compiler': str, ...}.");
  m.def("set_num_threads", &ffn::launch::set_num_threads, py::arg("n"),
        "Threads used by the parallel kernels; n <= 0 restores the default.");
  m.def("get_num_threads", &ffn::launch::num_threads,
        "Threads used by the parallel kernels.");
  m.def("_set_parallel_grain", &ffn::launch::set_parallel_grain, py::arg("n"),
        "Testing hook: minimum elements per parallel chunk (n <= 0: default). "
        "Returns the previous value.");
}
