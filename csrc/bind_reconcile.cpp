// SPDX-License-Identifier: Apache-2.0
//
// Bindings of the overlap-reconciliation family: count_pairs, union_find,
// relabel.  floodfilling.kernels makes inputs contiguous and normalises the
// key/value dtypes; the checks here keep direct calls safe too.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <vector>

#include "csrc/bind_common.hpp"
#include "csrc/launch_omp.hpp"
#include "kernels/count_pairs.hpp"
#include "kernels/union_find.hpp"

namespace ffn {
namespace bind {

namespace {

py::tuple count_pairs(py::handle a_obj, py::handle b_obj, bool ignore_zero) {
  py::array a = require_array(a_obj, "a");
  py::array b = require_array(b_obj, "b");
  const int abits = label_bits(a, "a");
  const int bbits = label_bits(b, "b");
  bool same = a.ndim() == b.ndim();
  for (py::ssize_t i = 0; same && i < a.ndim(); ++i) same = a.shape(i) == b.shape(i);
  if (!same) fail("b: shape " + shape_str(b) + " does not match a's shape " + shape_str(a));
  require_c_contiguous(a, "a");
  require_c_contiguous(b, "b");
  const int64_t n = static_cast<int64_t>(a.size());
  std::vector<launch::PairSlot> entries;
  {
    py::gil_scoped_release release;
    entries = launch::count_pairs(a.data(), abits, b.data(), bbits, n, ignore_zero);
  }
  const int64_t m = static_cast<int64_t>(entries.size());
  py::array_t<uint64_t> pairs({m, int64_t(2)});
  py::array_t<int64_t> counts(m);
  uint64_t* pp = pairs.mutable_data();
  int64_t* cp = counts.mutable_data();
  for (int64_t i = 0; i < m; ++i) {
    pp[2 * i] = entries[i].a;
    pp[2 * i + 1] = entries[i].b;
    cp[i] = entries[i].count;
  }
  return py::make_tuple(std::move(pairs), std::move(counts));
}

py::tuple union_find(py::handle edges_obj) {
  py::array edges = require_array(edges_obj, "edges");
  if (!has_dtype<uint64_t>(edges))
    fail("edges: expected dtype uint64, got " + dtype_str(edges));
  if (edges.ndim() != 2 || edges.shape(1) != 2)
    fail("edges: expected shape (M, 2), got " + shape_str(edges));
  require_c_contiguous(edges, "edges");
  std::vector<uint64_t> ids, roots;
  {
    py::gil_scoped_release release;
    kernels::reconcile::union_find_min(static_cast<const uint64_t*>(edges.data()),
                                       edges.shape(0), ids, roots);
  }
  const int64_t n = static_cast<int64_t>(ids.size());
  py::array_t<uint64_t> ids_out(n), roots_out(n);
  std::copy(ids.begin(), ids.end(), ids_out.mutable_data());
  std::copy(roots.begin(), roots.end(), roots_out.mutable_data());
  return py::make_tuple(std::move(ids_out), std::move(roots_out));
}

void relabel(py::handle labels_obj, py::handle keys_obj, py::handle values_obj) {
  RelabelArgs a = check_relabel_args(labels_obj, keys_obj, values_obj);
  py::gil_scoped_release release;
  launch::relabel(a.labels.mutable_data(), a.bits, static_cast<int64_t>(a.labels.size()), a.keys,
                  a.values, a.nk);
}

}  // namespace

void bind_reconcile(py::module_& m) {
  m.def("count_pairs", &count_pairs, py::arg("a"), py::arg("b"), py::arg("ignore_zero"),
        "Distinct (a, b) label pairs (uint64 (M, 2), lexicographic) and counts "
        "(int64 (M,)).");
  m.def("_set_count_pairs_grain", &launch::set_count_pairs_grain, py::arg("n"),
        "Testing hook: minimum voxels per count_pairs thread (n <= 0: default). "
        "Returns the previous value.");
  m.def(
      "_set_count_pairs_simd",
      [](bool allowed) { return kernels::reconcile::scan_simd_allowed().exchange(allowed); },
      py::arg("allowed"),
      "Testing hook: whether count_pairs may use its SIMD run scan (where the CPU has "
      "it). Returns the previous value.");
  m.def("union_find", &union_find, py::arg("edges"),
        "Sorted distinct ids of uint64 (M, 2) edges and their component minimum.");
  m.def("relabel", &relabel, py::arg("labels"), py::arg("keys"), py::arg("values"),
        "In place: labels equal to keys[j] become values[j].");
}

}  // namespace bind
}  // namespace ffn
