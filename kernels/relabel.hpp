// SPDX-License-Identifier: Apache-2.0
//
// relabel: in place, labels[i] := values[j] where keys[j] == labels[i],
// unchanged where no key matches (keys sorted, strictly increasing).
//
// The result must agree exactly with
// floodfilling.kernels_reference.relabel_reference (np.searchsorted).
//
//   * relabel_range (CPU launcher, csrc/launch_omp.cpp): a KeyValueMap built
//     once from the keys (open addressing, linear probing, load below 1/2,
//     mix64 hash) and a one-entry cache, so that a run of equal labels costs
//     one lookup.  O(k) to build for k keys, O(n) expected for n labels.
//   * relabel_one (device kernels: sycl/kernels.cpp, one work-item per
//     voxel): one label, binary search in the sorted keys,
//     O(log k), no allocation.
//
// Threading: the CPU launcher drops the keys above the label type's range,
// then splits the flat label range into chunks over its threads, all reading
// one KeyValueMap (read-only after construction).
//
// Header-only C++17, no Python, no I/O, no exceptions (allocation failures
// aside).  Labels are unsigned integers (uint32 or uint64); arrays are flat
// C-order spans (the label arrays may have any ndim: only the flat order
// matters here).  Namespace ffn::kernels::reconcile, shared by the
// overlap-reconciliation family: count_pairs.hpp (with run_starts.hpp,
// dense_scratch.hpp, sparse_pair_count.hpp), union_find.hpp, relabel.hpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace ffn {
namespace kernels {
namespace reconcile {

/// 64-bit finaliser (from the MurmurHash3 family): a cheap, well-mixing hash.
inline uint64_t mix64(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return x;
}

/// Device-friendly binary search: the first position in the sorted `keys`
/// (n of them) whose key is >= `key` (n when none).
inline int64_t lower_bound_index(const uint64_t* keys, int64_t n, uint64_t key) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (keys[mid] < key)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

/// Device-friendly single-voxel relabel: binary search in sorted `keys`.
template <class L>
inline L relabel_one(L v, const uint64_t* keys, const uint64_t* values, int64_t n) {
  const uint64_t key = static_cast<uint64_t>(v);
  const int64_t i = lower_bound_index(keys, n, key);
  return (i < n && keys[i] == key) ? static_cast<L>(values[i]) : v;
}

/// Open-addressing map uint64 key -> uint64 value built once from sorted
/// unique keys (used by the CPU relabel).
class KeyValueMap {
 public:
  KeyValueMap(const uint64_t* keys, const uint64_t* values, int64_t n) {
    size_t cap = 16;
    while (cap < static_cast<size_t>(n) * 2 + 1) cap <<= 1;
    keys_.assign(cap, 0);
    values_.assign(cap, 0);
    used_.assign(cap, 0);
    mask_ = cap - 1;
    for (int64_t i = 0; i < n; ++i) {
      size_t j = static_cast<size_t>(mix64(keys[i])) & mask_;
      while (used_[j]) j = (j + 1) & mask_;
      used_[j] = 1;
      keys_[j] = keys[i];
      values_[j] = values[i];
    }
  }

  /// Whether `key` is present; writes its value.
  bool find(uint64_t key, uint64_t* value) const {
    size_t j = static_cast<size_t>(mix64(key)) & mask_;
    while (used_[j]) {
      if (keys_[j] == key) {
        *value = values_[j];
        return true;
      }
      j = (j + 1) & mask_;
    }
    return false;
  }

 private:
  std::vector<uint64_t> keys_;
  std::vector<uint64_t> values_;
  std::vector<uint8_t> used_;
  size_t mask_ = 0;
};

/// Relabel labels[begin:end) in place through `map`.  A one-entry cache
/// handles runs of equal labels without a lookup.
template <class L>
inline void relabel_range(L* labels, int64_t begin, int64_t end, const KeyValueMap& map) {
  if (begin >= end) return;
  L last_in = labels[begin];
  uint64_t mapped = 0;
  L last_out = map.find(last_in, &mapped) ? static_cast<L>(mapped) : last_in;
  for (int64_t i = begin; i < end; ++i) {
    const L v = labels[i];
    if (v != last_in) {
      last_in = v;
      last_out = map.find(v, &mapped) ? static_cast<L>(mapped) : v;
    }
    labels[i] = last_out;
  }
}

}  // namespace reconcile
}  // namespace kernels
}  // namespace ffn
