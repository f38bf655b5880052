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

// count_pairs threading.  Counting runs at about 1.5 ns per voxel and is
// largely bound by reading the labels from memory; a second core adds read
// bandwidth (64x256x256 uint64 pairs on this 2-core machine: 6.1 ms on one
// thread, 4.0 ms on two, also with a niced job on the other core), at the cost
// of a separate label table, matrix and merge.  Threads are used from
// kDefaultPairGrain voxels per thread; pieces of the range are claimed
// dynamically, so a thread that starts late (descheduled) takes less.
constexpr int64_t kDefaultPairGrain = int64_t(1) << 21;

std::atomic<int64_t>& pair_grain() {
  static std::atomic<int64_t> grain{kDefaultPairGrain};
  return grain;
}

int64_t set_count_pairs_grain(int64_t n) {
  return pair_grain().exchange(n > 0 ? n : kDefaultPairGrain, std::memory_order_relaxed);
}

template <class TA, class TB>
std::vector<launch::PairSlot> count_pairs_typed(const TA* a, const TB* b, int64_t n,
                                               bool ignore_zero) {
  using kernels::reconcile::PairCounter;
  const int64_t grain = pair_grain().load(std::memory_order_relaxed);
  const int threads =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(launch::num_threads(), n / grain)));
  std::vector<PairCounter> counters;
  counters.reserve(static_cast<size_t>(threads));
  for (int t = 0; t < threads; ++t) counters.emplace_back(static_cast<size_t>(n / threads));
  if (threads == 1) {
    kernels::reconcile::count_pairs_range(a, b, 0, n, ignore_zero, counters[0]);
  } else {
    const int64_t pieces = 4 * static_cast<int64_t>(threads);
    std::atomic<int64_t> next{0};
    launch::parallel_for(threads, threads, [&](int64_t t) {
      for (int64_t k; (k = next.fetch_add(1)) < pieces;)
        kernels::reconcile::count_pairs_range(a, b, n * k / pieces, n * (k + 1) / pieces,
                                              ignore_zero, counters[static_cast<size_t>(t)]);
    });
  }
  return kernels::reconcile::finish_counts(counters);
}

std::vector<launch::PairSlot> count_pairs_any(const void* a, int a_bits, const void* b,
                                              int b_bits, int64_t n, bool ignore_zero) {
  if (a_bits == 32 && b_bits == 32)
    return count_pairs_typed(static_cast<const uint32_t*>(a), static_cast<const uint32_t*>(b),
                             n, ignore_zero);
  if (a_bits == 32)
    return count_pairs_typed(static_cast<const uint32_t*>(a), static_cast<const uint64_t*>(b),
                             n, ignore_zero);
  if (b_bits == 32)
    return count_pairs_typed(static_cast<const uint64_t*>(a), static_cast<const uint32_t*>(b),
                             n, ignore_zero);
  return count_pairs_typed(static_cast<const uint64_t*>(a), static_cast<const uint64_t*>(b), n,
                           ignore_zero);
}

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
    entries = count_pairs_any(a.data(), abits, b.data(), bbits, n, ignore_zero);
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
  m.def("_set_count_pairs_grain", &set_count_pairs_grain, py::arg("n"),
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
