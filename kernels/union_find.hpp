// SPDX-License-Identifier: Apache-2.0
//
// union_find_min: connected components of an edge list (merge pairs of
// segment ids), the representative of each component being its minimum id.
//
// The result, which must agree exactly with
// floodfilling.kernels_reference.union_find_reference
// (scipy.sparse.csgraph.connected_components): `ids`, the sorted distinct ids
// of the edges, and `roots`, for each id the minimum id of its component.
//
// Algorithm: the ids are sorted and deduplicated, each edge end is mapped to
// its index by binary search, and a union-find with path halving links the
// larger root under the smaller one (indices follow id order, so the root of
// a component is always its minimum id).  O(m log m) time for m edges, O(m)
// memory.
//
// Threading: serial (the binding, csrc/bind_reconcile.cpp, releases the GIL
// around it).
//
// Header-only C++17, no Python, no I/O, no exceptions (allocation failures
// aside).  Labels are unsigned integers (uint32 or uint64); arrays are flat
// C-order spans (the label arrays may have any ndim: only the flat order
// matters here).  Namespace ffn::kernels::reconcile, shared by the
// overlap-reconciliation family: count_pairs.hpp (with run_starts.hpp,
// dense_scratch.hpp, sparse_pair_count.hpp), union_find.hpp, relabel.hpp.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace ffn {
namespace kernels {
namespace reconcile {

/// Union-find over `m` edges (2*m uint64 values, row-major (m, 2)).
/// Fills `ids` with the sorted distinct ids of the edges and `roots` with,
/// for each id, the minimum id of its connected component.
inline void union_find_min(const uint64_t* edges, int64_t m, std::vector<uint64_t>& ids,
                           std::vector<uint64_t>& roots) {
  ids.assign(edges, edges + 2 * m);
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  const int64_t n = static_cast<int64_t>(ids.size());
  std::vector<int64_t> parent(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) parent[i] = i;
  auto find = [&parent](int64_t x) {
    while (parent[x] != x) {
      parent[x] = parent[parent[x]];  // path halving
      x = parent[x];
    }
    return x;
  };
  auto index_of = [&ids](uint64_t v) {
    return static_cast<int64_t>(std::lower_bound(ids.begin(), ids.end(), v) - ids.begin());
  };
  for (int64_t e = 0; e < m; ++e) {
    const int64_t ra = find(index_of(edges[2 * e]));
    const int64_t rb = find(index_of(edges[2 * e + 1]));
    // ids are sorted, so the smaller index is the smaller id: the root of a
    // component is always its minimum id.
    if (ra < rb)
      parent[rb] = ra;
    else if (rb < ra)
      parent[ra] = rb;
  }
  roots.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) roots[i] = ids[find(i)];
}

}  // namespace reconcile
}  // namespace kernels
}  // namespace ffn
